"""Promotion and policy gates in the engine, against the fake runtime and a manual clock:
every gate passing, the soak rule's periods, approvals, checks, and nothing created or moved
when a gate refuses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from castiron.engine.deploy import DeployResult
from castiron.engine.policy import (
    check_soak,
    gate_policy,
    human_duration,
    run_check,
    serving_periods,
)
from castiron.engine.promote import Promotion, approve, prepare, promote
from castiron.engine.release import cached_deploy_spec
from castiron.errors import PolicyRefusedError, UsageError
from castiron.model import Digest, ReleaseId
from castiron.state.sqlite import open_state

from .conftest import World
from .promotekit import gated, make_keys, sign, write_policy

__all__ = ["gated"]

PY = sys.executable


def approve_as(world: World, actor: str, environment: str, release: str) -> None:
    store = open_state(world.root / ".castiron" / "state.db", actor=actor, clock=world.clock)
    with store:
        approve(store, environment, release)


def promotion(world: World, source: str = "staging", release: str | None = None) -> Promotion:
    engine = world.engine()
    return prepare(engine, world.spec(), source, "production", release=release)


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
            "checks": [[*check, "${URL}"], [PY, "-c", "pass"]],
        },
    )
    staged = world.deploy("staging", "v1")
    assert isinstance(staged, DeployResult)
    world.clock.advance(11 * 60)
    engine = world.engine()
    prepared = prepare(engine, world.spec(), "staging", "production")
    assert prepared.source_release.id == staged.release
    target = prepared.target
    assert target.release.digest == staged.digest and target.release.id != staged.release
    approve_as(world, "bob@elsewhere", "production", target.release.id)
    result = promote(engine, prepared)
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
    write_policy(world, {"approvals": 1})
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
        promote(world.engine(), promotion(world))
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


def test_approvals_count_distinct_actors_other_than_the_deployer(gated: World) -> None:
    world = gated
    write_policy(world, {"approvals": 2})
    world.deploy("staging", "v1")
    prepared = promotion(world)
    release = prepared.target.release.id
    approve_as(world, "tester@testhost", "production", release)  # the deployer
    approve_as(world, "bob@a", "production", release)
    approve_as(world, "bob@a", "production", release)  # twice counts once
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine(), prepared)
    assert err.value.rule == "approvals"
    assert "it has 1 (bob@a)" in str(err.value)
    assert "tester@testhost's own approval does not count" in str(err.value)
    approve_as(world, "carol@b", "production", release)
    done = promote(world.engine(), prepared)
    assert done.result.outcome == "succeeded"
    approvals = [
        e for e in world.store.audit_entries("production") if e.action == "release.approve"
    ]
    assert len(approvals) == 4 and [e.details["added"] for e in approvals].count(False) == 1


def test_approve_needs_a_release_id(gated: World) -> None:
    with pytest.raises(UsageError, match="not a release id"):
        approve(gated.store, "production", "v1")


def test_promote_from_another_environment_is_refused(gated: World) -> None:
    world = gated
    write_policy(world)
    world.deploy("dev", "v1")
    with pytest.raises(PolicyRefusedError) as err:
        promote(world.engine(), promotion(world, source="dev"))
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
        promote(world.engine(), prepared)
    world.clock.advance(61)
    assert promote(world.engine(), prepared).result.outcome == "succeeded"


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


def test_gate_policy_from_the_cached_deploy_spec(gated: World) -> None:
    world = gated
    write_policy(world, {"soak": "90s", "approvals": 2, "require_signature": True})
    spec = cached_deploy_spec(world.root / "castiron.yaml", {}, world.root / ".castiron" / "c")
    gates = gate_policy(spec, "production", {})
    assert gates.source == "staging" and gates.soak == 90 and gates.approvals == 2
    assert gates.require_signature is True
    assert gate_policy(spec, "staging", {}).active == []


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
