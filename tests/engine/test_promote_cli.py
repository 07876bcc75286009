"""Every policy refusal through the real CLI: exit 5, the rule named in the ``error:`` line,
an audit entry with result ``refused`` and the gate results recorded, and nothing created.

The source environment is deployed in-process on the fake runtime, sharing the project's
state directory with the CLI; refusals happen before the CLI needs any runtime."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest

from castiron.images import oci
from castiron.model import Digest
from castiron.settings import current_os_user

from .conftest import World
from .promotekit import forge, gated, make_keys, sign, write_policy

__all__ = ["gated"]

PY = sys.executable
Run = Callable[..., Any]


@pytest.fixture
def cli(gated: World, run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> Run:
    """``castiron ARGS`` in-process on the project (as ``tester@testhost`` unless ``actor``)."""
    monkeypatch.setenv("CASTIRON_HOME", str(gated.root / ".castiron"))
    monkeypatch.setenv("CASTIRON_SPEC", str(gated.root / "castiron.yaml"))
    monkeypatch.setenv("HELLO_TOKEN", "s3cret-value")

    def run(*args: str, actor: str = "tester@testhost") -> Any:
        monkeypatch.setenv("CASTIRON_ACTOR", actor)
        return run_cli(*args)

    return run


def assert_refused(world: World, result: Any, rule: str, *needles: str) -> dict[str, Any]:
    """Exit 5 naming ``rule``; audited as refused; nothing created in production."""
    assert result.exit_code == 5, (result.stdout, result.stderr)
    assert f"error: refused by policy ({rule}): " in result.stderr
    for needle in needles:
        assert needle in result.stderr
    entries = [e for e in world.store.audit_entries("production") if e.action == "policy.refuse"]
    assert entries and entries[-1].result == "refused"
    details = dict(entries[-1].details)
    assert details["rule"] == rule
    rows = world.store.gate_results(evaluation=details["evaluation"])
    assert any(r.gate == rule and not r.passed for r in rows)
    assert world.store.list_deployments("production") == []
    assert world.store.list_instances("production") == []
    return details


def promote(cli: Run, *extra: str) -> Any:
    return cli("promote", "staging", "production", "--yes", *extra)


def signed_policy(world: World) -> None:
    write_policy(world, {"require_signature": ["keys/prod.pub"]})
    world.deploy("staging", "v1")


def test_unsigned_image_is_refused(gated: World, cli: Run) -> None:
    make_keys(gated, "prod")
    signed_policy(gated)
    result = promote(cli)
    assert_refused(
        gated,
        result,
        "require_signature",
        f"image {gated.digests['v1']} has no signature by keys/prod.pub",
    )


def test_signature_by_another_key_is_refused(gated: World, cli: Run) -> None:
    make_keys(gated, "prod")
    sign(gated, "v1", make_keys(gated, "stranger"))
    signed_policy(gated)
    assert_refused(gated, promote(cli), "require_signature", "signed by another key")


def test_tampered_payload_is_refused(gated: World, cli: Run) -> None:
    keys = make_keys(gated, "prod")
    artifact = sign(gated, "v1", keys)
    layer = gated.images.read_json(artifact)["layers"][0]
    payload = json.loads(gated.images.read_blob(layer["digest"]))
    payload["optional"]["creator"] = "someone else"
    forge(gated.images, artifact, payload=oci.canonical_json(payload))
    signed_policy(gated)
    assert_refused(gated, promote(cli), "require_signature", "payload tampered")


def test_signature_made_for_another_digest_is_refused(gated: World, cli: Run) -> None:
    keys = make_keys(gated, "prod")
    artifact = sign(gated, "v2", keys)
    forge(gated.images, artifact, subject=Digest(gated.digests["v1"]))
    signed_policy(gated)
    details = assert_refused(
        gated,
        promote(cli),
        "require_signature",
        f"signature for another digest: it signs {gated.digests['v2']}",
    )
    assert "signature for another digest" in details["reason"]


def test_a_digest_that_never_succeeded_in_the_source_is_refused(gated: World, cli: Run) -> None:
    write_policy(gated)
    gated.deploy("staging", "v1")
    result = cli("deploy", "production", "--image", "v2", "--yes")
    assert_refused(
        gated,
        result,
        "promote_from",
        f"image {gated.digests['v2']} has not been deployed successfully to staging",
    )


def test_promotion_from_the_wrong_environment_is_refused(gated: World, cli: Run) -> None:
    write_policy(gated)
    gated.deploy("dev", "v1")
    result = cli("promote", "dev", "production", "--yes")
    assert_refused(gated, result, "promote_from", "accepts releases from staging only")


def test_soak_not_elapsed_is_refused(gated: World, cli: Run) -> None:
    write_policy(gated, {"soak": "1h"})
    gated.deploy("staging", "v1")
    details = assert_refused(gated, promote(cli), "soak", "less than the soak of 1h")
    assert details["gates"][1]["gate"] == "soak"


def test_failing_check_is_refused_with_its_exit_code_and_output(gated: World, cli: Run) -> None:
    check = [PY, "-c", "import sys; print('smoke failed at', sys.argv[1]); sys.exit(3)", "${URL}"]
    write_policy(gated, {"checks": [check]})
    gated.deploy("staging", "v1")
    result = promote(cli)
    details = assert_refused(
        gated, result, "checks", "exited 3: smoke failed at http://127.0.0.1:18080"
    )
    row = next(
        r for r in gated.store.gate_results(evaluation=details["evaluation"]) if r.gate == "checks"
    )
    run = row.data["checks"][0]
    assert run["exit_code"] == 3
    assert run["output"] == "smoke failed at http://127.0.0.1:18080\n"
    assert run["argv"][-1] == "http://127.0.0.1:18080"


def approvers(world: World, approvals: int) -> None:
    write_policy(world, {"approvals": approvals, "approvers": ["keys/alice.pub", "keys/bob.pub"]})
    for name in ("alice", "bob", "mallory"):
        make_keys(world, name)


def test_a_label_is_not_an_identity_and_the_deployers_own_approval_never_counts(
    gated: World, cli: Run
) -> None:
    approvers(gated, 1)
    gated.deploy("staging", "v1")
    assert_refused(gated, promote(cli), "approvals", "needs 1 approval(s)")
    plan = promote(cli)
    release = plan.stderr.split("run `castiron approve production ")[1].split(" ")[0]
    me = current_os_user()
    # Claiming to be alice, then bob, through CASTIRON_ACTOR: still one OS user, the deployer.
    first = cli(
        "approve", "production", release, "--key", f"{gated.root}/keys/alice.key", actor="alice@h"
    )
    assert first.exit_code == 0, first.stderr
    assert first.stdout.startswith(f"{me} approved release {release} for production with key ")
    second = cli(
        "approve",
        "production",
        release,
        "--key",
        f"{gated.root}/keys/bob.key",
        "--json",
        actor="bob@h",
    )
    data = json.loads(second.stdout)
    assert data["os_user"] == me and data["actor"] == "bob@h" and data["added"] is True
    assert data["identity"]["kind"] == "key" and data["identity"]["id"].startswith("sha256:")
    assert [a["os_user"] for a in data["approvals"]] == [me, me]
    assert_refused(
        gated,
        promote(cli),
        "approvals",
        f"it has 0; not counted: {me}: the deployer's own approval does not count; "
        f"{me}: the deployer's own approval does not count",
    )
    approvals = [
        e for e in gated.store.audit_entries("production") if e.action == "release.approve"
    ]
    assert [e.details["os_user"] for e in approvals] == [me, me]


def test_one_key_approving_twice_is_recorded_once(gated: World, cli: Run) -> None:
    approvers(gated, 2)
    gated.deploy("staging", "v1")
    plan = cli("plan", "production", "--image", "v1")
    assert plan.exit_code == 0, plan.stderr
    release = plan.stdout.split(" -> ")[1].split(" ")[0]
    once = cli(
        "approve", "production", release, "--key", f"{gated.root}/keys/bob.key", actor="bob@h"
    )
    twice = cli(
        "approve", "production", release, "--key", f"{gated.root}/keys/bob.key", actor="robert@h"
    )
    assert once.exit_code == twice.exit_code == 0, twice.stderr
    assert "(this key had already approved it; counted once)" in twice.stdout
    assert len(gated.store.approvals("production", release)) == 1


def test_approve_checks_its_arguments(gated: World, cli: Run) -> None:
    approvers(gated, 1)
    key = ("--key", f"{gated.root}/keys/alice.key")
    bad_env = cli("approve", "nowhere", "0123456789abcdef", *key)
    assert bad_env.exit_code == 2 and "no environment 'nowhere'" in bad_env.stderr
    bad_release = cli("approve", "production", "v1", *key)
    assert bad_release.exit_code == 2 and "not a release id" in bad_release.stderr
    no_key = cli("approve", "production", "0123456789abcdef")
    assert no_key.exit_code == 2 and "Missing option '--key'" in no_key.stderr
    other = cli(
        "approve", "production", "0123456789abcdef", "--key", f"{gated.root}/keys/mallory.key"
    )
    assert other.exit_code == 2
    assert other.stderr.startswith("error: key sha256:")
    assert other.stderr.endswith(
        " is not an approver of 'production' (policy.approvers: keys/alice.pub, keys/bob.pub)\n"
    )
    write_policy(gated, {})
    ungated = cli("approve", "production", "0123456789abcdef", *key)
    assert ungated.stderr == (
        "error: environment 'production' lists no approvers (policy.approvers): an approval "
        "would count for nothing there\n"
    )


def test_plan_shows_the_gates(gated: World, cli: Run) -> None:
    write_policy(
        gated,
        {
            "soak": "10m",
            "approvals": 1,
            "approvers": ["keys/alice.pub"],
            "checks": [["true"]],
            "require_signature": True,
        },
    )
    make_keys(gated, "alice")
    gated.deploy("staging", "v1")
    human = cli("plan", "production", "--image", "v1")
    assert human.exit_code == 0, human.stderr
    assert "gates of production" in human.stdout
    assert "soak 10m in staging: would refuse" in human.stdout
    assert "promote_from staging: ok: deployed successfully to staging" in human.stdout
    assert "checks: 1 command(s) against http://127.0.0.1:18080: run when deploying" in (
        human.stdout
    )
    data = json.loads(cli("plan", "production", "--image", "v1", "--json").stdout)
    assert data["gates"]["active"] == [
        "require_signature", "promote_from", "soak", "approvals", "checks",
    ]  # fmt: skip
    assert [g["passed"] for g in data["gates"]["preview"]] == [False, True, False, False]
    assert gated.store.gate_results("production") == []  # a plan records nothing
