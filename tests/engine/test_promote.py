"""Promotion and policy gates in the engine, against the fake runtime and a manual clock:
every gate passing, the soak rule's periods, approvals, checks, and nothing created or moved
when a gate refuses."""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

from castiron.engine.deploy import DeployResult
from castiron.engine.policy import (
    approval_payload,
    check_soak,
    human_duration,
    run_check,
    serving_periods,
)
from castiron.engine.promote import Promotion, approve, prepare, promote
from castiron.engine.resolve import cached_resolve_spec, resolve_spec
from castiron.errors import PolicyRefusedError, UsageError
from castiron.images.sign import load_signer
from castiron.model import Digest, Identity, ReleaseId
from castiron.settings import current_os_user
from castiron.state.base import ApprovalRow, AuditDraft, StateTx
from castiron.state.sqlite import open_state

from .conftest import World
from .promotekit import gated, make_keys, sign, write_policy

__all__ = ["gated"]

PY = sys.executable


def approve_as(
    world: World, os_user: str, key: str, release: str, actor: str = "anyone@anywhere"
) -> bool:
    """Approve ``release`` for production as ``os_user`` with ``keys/KEY.key``; True when
    it was added."""
    store = open_state(world.root / ".castiron" / "state.db", actor=actor, clock=world.clock)
    policy = resolve_spec(world.spec()).environment("production").gates
    signer = load_signer(world.root / "keys" / f"{key}.key")
    with store:
        return approve(store, policy, release, signer, os_user).added


def promotion(world: World, source: str = "staging", release: str | None = None) -> Promotion:
    engine = world.engine()
    return prepare(engine.context, world.spec(), source, "production", release=release)


def test_promotion_through_every_gate_deploys_the_same_digest(gated: World) -> None:
    world = gated
    keys = make_keys(world, "prod")
    sign(world, "v1", keys)
    check = [PY, "-c", "import os, sys; print('smoke ok', sys.argv[1], os.environ['URL'])"]
    write_policy(
        world,
        {
            "soak": "10m",
            "require_signature": ["keys/prod.pub"],
            "approvals": 1,
            "approvers": ["keys/alice.pub"],
            "checks": [[*check, "${URL}"], [PY, "-c", "pass"]],
        },
    )
    make_keys(world, "alice")
    staged = world.deploy("staging", "v1")
    assert isinstance(staged, DeployResult)
    world.clock.advance(11 * 60)
    engine = world.engine()
    prepared = prepare(engine.context, world.spec(), "staging", "production")
    assert prepared.source_release.id == staged.release
    target = prepared.target
    assert target.release.digest == staged.digest and target.release.id != staged.release
    approve_as(world, "alice", "alice", target.release.id)
    result = promote(engine.context, prepared)
    assert result.result.outcome == "succeeded"
    assert [g["gate"] for g in result.gates] == [
        "require_signature", "promote_from", "soak", "approvals", "checks",
    ]  # fmt: skip
    assert all(g["passed"] for g in result.gates)
    env = world.store.get_environment("production")
    assert env is not None and env.current_release == target.release.id
    released = world.store.get_release(ReleaseId(target.release.id))
    assert released is not None and released.digest == staged.digest
    assert released.config["environment"] == "production"
    deployment = world.store.list_deployments("production")[0]
    evaluation = deployment.details["gates"]["evaluation"]
    rows = world.store.gate_results(evaluation=evaluation)
    assert [r.gate for r in rows] == [g["gate"] for g in result.gates]
    checks = rows[-1].data["checks"]
    assert checks[0]["exit_code"] == 0
    assert "smoke ok http://127.0.0.1:18080 http://127.0.0.1:18080" in checks[0]["output"]
    passed = [e for e in world.store.audit_entries("production") if e.action == "policy.pass"]
    assert len(passed) == 1 and passed[0].details["evaluation"] == evaluation
    assert result.to_json()["from"] == "staging" and result.to_json()["to"] == "production"


def test_plain_deploy_to_a_gated_environment_is_gated_too(gated: World) -> None:
    world = gated
    write_policy(world, {"approvals": 1, "approvers": ["keys/alice.pub"]})
    make_keys(world, "alice")
    world.deploy("staging", "v1")
    with pytest.raises(PolicyRefusedError) as err:
        world.deploy("production", "v2")
    assert err.value.rule == "promote_from"  # v2 never ran in staging
    assert "also refused by approvals" in str(err.value)
    assert world.store.list_deployments("production") == []
    assert world.store.list_instances("production") == []
    assert world.traffic.current("production") is None


def test_a_refusal_creates_nothing_and_moves_no_traffic(gated: World) -> None:
    world = gated
    write_policy(world, {"soak": "1h"})
    world.deploy("staging", "v1")
    before = list(world.traffic.history)
    created = len(world.driver._records)
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine().context, promotion(world))
    assert err.value.rule == "soak"
    assert "less than the soak of 1h" in str(err.value)
    assert world.traffic.history == before
    assert len(world.driver._records) == created
    refused = [e for e in world.store.audit_entries("production") if e.result == "refused"]
    assert len(refused) == 1 and refused[0].action == "policy.refuse"
    assert refused[0].details["rule"] == "soak"


def test_soak_counts_the_period_the_digest_served_until_replaced(gated: World) -> None:
    world = gated
    v1 = Digest(world.digests["v1"])
    first = world.deploy("staging", "v1")
    assert isinstance(first, DeployResult)
    world.clock.advance(300)
    world.environ["APP_VERSION"] = "2"
    world.deploy("staging", "v1")  # another release of the same digest: the period goes on
    world.clock.advance(300)
    world.deploy("staging", "v2")  # replaced after 10 minutes
    world.clock.advance(3600)
    now = world.clock.now()
    periods = serving_periods(world.store, "staging", v1, now)
    assert len(periods) == 1
    assert (periods[0][1] - periods[0][0]).total_seconds() == pytest.approx(600, abs=1)
    assert check_soak(world.store, "staging", v1, 600, now).passed
    refused = check_soak(world.store, "staging", v1, 601, now)
    assert not refused.passed and "served staging for 10m," in refused.reason
    v2 = Digest(world.digests["v2"])
    assert check_soak(world.store, "staging", v2, 3600, now).passed  # still serving
    never = check_soak(world.store, "staging", Digest("sha256:" + "0" * 64), 1, now)
    assert not never.passed and "never served staging" in never.reason


def test_down_ends_a_soak_period(gated: World) -> None:
    world = gated
    world.deploy("staging", "v1")
    world.clock.advance(60)
    world.engine().down("staging")
    world.clock.advance(3600)
    v1 = Digest(world.digests["v1"])
    periods = serving_periods(world.store, "staging", v1, world.clock.now())
    assert [(b - a).total_seconds() for a, b in periods] == [pytest.approx(60, abs=1)]


def approvers(world: World, approvals: int = 2) -> None:
    write_policy(
        world,
        {
            "approvals": approvals,
            "approvers": ["keys/alice.pub", "keys/bob.pub", "keys/carol.pub", "keys/dave.pub"],
        },
    )
    for name in ("alice", "bob", "carol", "dave", "mallory"):
        make_keys(world, name)


def test_approvals_count_distinct_keys_and_users_other_than_the_deployer(gated: World) -> None:
    world = gated
    approvers(world)
    world.deploy("staging", "v1")
    prepared = promotion(world)
    release = prepared.target.release.id
    deployer = current_os_user()
    # Whatever label each one claims, these are one key or one user (or the deployer).
    assert approve_as(world, deployer, "alice", release, actor="alice@a")
    assert approve_as(world, "bob", "bob", release, actor="bob@b")
    assert not approve_as(world, "bob", "bob", release, actor="robert@b")  # one key: once
    assert approve_as(world, "bob", "carol", release, actor="carol@c")  # one user, two keys
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine().context, prepared)
    assert err.value.rule == "approvals"
    assert str(err.value) == (
        f"refused by policy (approvals): release {release} for production needs 2 "
        "approval(s) signed by approver keys of distinct users (or by distinct approver API "
        "tokens) other than the deployer "
        f"({deployer}), it has 1 (bob (keys/bob.pub)); not counted: "
        f"{deployer}: the deployer's own approval does not count; bob: already counted with "
        f"another key: run `castiron approve production {release} --key KEY`"
    )
    assert approve_as(world, "dave", "dave", release)
    done = promote(world.engine().context, prepared)
    assert done.result.outcome == "succeeded"
    approvals = [
        e for e in world.store.audit_entries("production") if e.action == "release.approve"
    ]
    assert [e.details["added"] for e in approvals] == [True, True, False, True, True]
    assert approvals[1].details["identity"].startswith("key:sha256:")
    assert approvals[1].details["os_user"] == "bob"


def test_a_label_or_a_forged_signature_never_counts(gated: World) -> None:
    world = gated
    approvers(world, approvals=1)
    world.deploy("staging", "v1")
    prepared = promotion(world)
    release = ReleaseId(prepared.target.release.id)
    alice = load_signer(world.root / "keys" / "alice.key")
    bob = load_signer(world.root / "keys" / "bob.key")
    good = base64.b64encode(alice.sign(approval_payload("production", release, "alice")))
    other_release = base64.b64encode(bob.sign(approval_payload("production", "0" * 16, "bob")))
    rows = [
        # A label, as `CASTIRON_ACTOR=alice castiron approve` once recorded.
        ApprovalRow("production", release, "alice@h", world.clock.now()),
        # alice's signature claimed by another OS user.
        ApprovalRow(
            "production", release, "x", world.clock.now(), "", Identity("key", alice.keyid),
            "eve", good.decode(),
        ),
        # bob's signature of another release.
        ApprovalRow(
            "production", release, "y", world.clock.now(), "", Identity("key", bob.keyid),
            "bob", other_release.decode(),
        ),
    ]  # fmt: skip

    def insert(tx: StateTx) -> None:
        for row in rows:
            assert tx.add_approval(row)

    world.store.mutate(AuditDraft("test.forge", environment="production"), insert)
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine().context, prepared)
    reason = str(err.value)
    assert "it has 0; not counted: alice@h: not signed" in reason
    assert "eve: the signature by keys/alice.pub does not verify" in reason
    assert "bob: the signature by keys/bob.pub does not verify" in reason


def test_only_an_approver_key_may_approve(gated: World) -> None:
    world = gated
    approvers(world, approvals=1)
    mallory = load_signer(world.root / "keys" / "mallory.key")
    with pytest.raises(UsageError) as err:
        approve_as(world, "mallory", "mallory", "0123456789abcdef")
    assert str(err.value) == (
        f"key {mallory.keyid} is not an approver of 'production' "
        "(policy.approvers: keys/alice.pub, keys/bob.pub, keys/carol.pub, keys/dave.pub)"
    )


def test_approve_needs_a_release_id(gated: World) -> None:
    approvers(gated, approvals=1)
    with pytest.raises(UsageError, match="not a release id"):
        approve_as(gated, "alice", "alice", "v1")


def test_promote_from_another_environment_is_refused(gated: World) -> None:
    world = gated
    write_policy(world)
    world.deploy("dev", "v1")
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine().context, promotion(world, source="dev"))
    assert err.value.rule == "promote_from"
    assert "accepts releases from staging only" in str(err.value)


def test_without_promote_from_the_environment_promoted_from_is_the_source(gated: World) -> None:
    world = gated
    write_policy(world, {"soak": "1m"}, promote_from=None)
    world.deploy("dev", "v1")
    prepared = promotion(world, source="dev")
    gates = prepared.gates
    assert gates.source == "dev" and gates.active == ["promote_from", "soak"]
    with pytest.raises(PolicyRefusedError, match=r"\(soak\)"):
        promote(world.engine().context, prepared)
    world.clock.advance(61)
    assert promote(world.engine().context, prepared).result.outcome == "succeeded"


def test_promote_a_named_release_and_nothing_to_promote(gated: World) -> None:
    world = gated
    write_policy(world)
    with pytest.raises(UsageError, match="serves no release"):
        promotion(world)
    first = world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    assert isinstance(first, DeployResult)
    named = promotion(world, release=first.release[:6])
    assert named.source_release.id == first.release
    with pytest.raises(UsageError, match="no release 'ffff'"):
        promotion(world, release="ffff")


def test_gates_from_the_cached_resolved_spec(gated: World) -> None:
    world = gated
    write_policy(
        world,
        {
            "soak": "90s",
            "approvals": 2,
            "approvers": ["keys/a.pub", "keys/b.pub"],
            "require_signature": True,
        },
    )
    spec = cached_resolve_spec(world.root / "castiron.yaml", {}, world.root / ".castiron" / "c")
    gates = spec.environment("production").gates
    assert gates.source == "staging" and gates.soak == 90 and gates.approvals == 2
    assert gates.approvers == ("keys/a.pub", "keys/b.pub")
    assert gates.require_signature is True
    assert spec.environment("staging").gates.active == []


def test_require_signature_true_trusts_the_keys_in_castiron_home(gated: World) -> None:
    world = gated
    write_policy(world, {"require_signature": True}, promote_from=None)
    with pytest.raises(PolicyRefusedError, match="there is no public key in"):
        world.deploy("production", "v1")
    home_keys = world.root / ".castiron" / "keys"
    home_keys.mkdir()
    make_keys(world, "prod")
    for suffix in ("pub",):
        (home_keys / f"prod.{suffix}").write_bytes(
            (world.root / "keys" / f"prod.{suffix}").read_bytes()
        )
    with pytest.raises(PolicyRefusedError, match="has no signature by any key in"):
        world.deploy("production", "v1")
    sign(world, "v1", make_keys(world, "other"))
    with pytest.raises(PolicyRefusedError, match="signed by another key"):
        world.deploy("production", "v1")


def test_checks_get_the_url_time_out_and_keep_secrets_out(tmp_path: Path) -> None:
    ok = run_check(
        [PY, "-c", "import os,sys; print(sys.argv[1], os.environ['URL'], os.environ['T'])",
         "${URL}/health"],
        url="http://127.0.0.1:9",
        environ={"T": "s3cret"},
        cwd=tmp_path,
        masks=["s3cret"],
    )  # fmt: skip
    assert ok.ok and ok.output == "http://127.0.0.1:9/health http://127.0.0.1:9 (secret)\n"
    slow = run_check(
        [PY, "-c", "import time; print('started', flush=True); time.sleep(30)"],
        url="u",
        environ={},
        cwd=tmp_path,
        timeout=0.5,
    )
    assert not slow.ok and slow.error == "timed out after 0.5s" and "started" in slow.output
    missing = run_check(["./nope.sh"], url="u", environ={}, cwd=tmp_path)
    assert missing.exit_code is None and "cannot run './nope.sh'" in (missing.error or "")
    big = run_check([PY, "-c", "print('x' * 10000)"], url="u", environ={}, cwd=tmp_path)
    assert big.ok and big.output.startswith("...") and len(big.output) <= 4096 + 3


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.5, "0.5s"), (45, "45s"), (252, "4m12s"), (600, "10m"), (3600, "1h"), (7260, "2h01m")],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text
