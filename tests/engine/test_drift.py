"""Drift detection and remedy on the fake runtime and router: each kind of finding, secrets by
name only, the fix by replacement (route switched atomically, drifted instances destroyed,
strays removed, a wrong route re-applied), its audit entry — and the spec's drift section."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from castiron.engine.drift import (
    DriftRules,
    detect_drift,
    fix_drift,
)
from castiron.errors import DeployFailedError, NotFoundError, SpecError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, ReleaseId
from castiron.spec.load import load_spec
from castiron.traffic.base import Backend, BackendSet

from .conftest import World


def _serving(world: World, environment: str = "staging") -> list[str]:
    return sorted(r.id for r in world.store.list_instances(environment) if r.status == "running")


def _detect(world: World, tmp_path: Path, environment: str = "staging") -> list[tuple[str, ...]]:
    report = detect_drift(world.engine().context, environment, baselines=tmp_path / "drift")
    return [(f.kind, f.instance, f.path, str(f.expected), str(f.actual)) for f in report.findings]


def _recreate(world: World, instance_id: str, **changes: object) -> None:
    """Destroy an instance and start another under its id with ``changes``, as by hand."""
    row = next(r for r in world.store.list_instances("staging") if r.id == instance_id)
    release = world.engine().load_release(row.release)
    digest = Digest(str(changes.pop("digest", release.digest)))
    stored = world.images.image(digest)
    old = world.driver.inspect(
        Instance(row.id, "hello", "staging", row.release, "local", row.address, "", digest)
    )
    env = dict(old.config["env"])  # type: ignore[call-overload]
    env.update(changes.pop("env", {}))  # type: ignore[call-overload]
    for name in changes.pop("drop", ()):  # type: ignore[attr-defined]
        env.pop(name, None)
    world.driver.destroy(old.instance, grace=0)
    world.driver.ensure_image(ImageRef(digest, stored.config_digest, world.images.root))
    world.driver.create(
        InstanceSpec(
            id=instance_id,
            app="hello",
            environment="staging",
            release=row.release,
            image=ImageRef(digest, stored.config_digest, world.images.root),
            command=tuple(old.config["command"]),  # type: ignore[call-overload]
            env=env,
            workdir="/",
            port=int(row.address.rpartition(":")[2]),
        )
    )


def test_a_fresh_deployment_has_no_drift(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    assert _detect(world, tmp_path) == []


def test_an_environment_never_deployed_is_not_found(world: World, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="'staging' was never deployed"):
        detect_drift(world.engine().context, "staging", baselines=tmp_path)


def test_env_drift_is_a_config_finding(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    first = _serving(world)[0]
    _recreate(world, first, env={"APP_VERSION": "hacked", "EXTRA": "1"})
    assert sorted(_detect(world, tmp_path)) == [
        ("config", first, "env.APP_VERSION", "1", "hacked"),
        ("config", first, "env.EXTRA", "None", "1"),
    ]


def test_secrets_are_compared_by_name_and_their_values_never_shown(
    world: World, tmp_path: Path
) -> None:
    world.deploy("staging", "v1")
    first, second = _serving(world)
    _recreate(world, first, env={"TOKEN": "another-value"})  # a changed value: not seen
    _recreate(world, second, drop=("TOKEN",))
    report = detect_drift(world.engine().context, "staging", baselines=tmp_path)
    text = json.dumps(report.to_json())
    assert "s3cret-value" not in text and "another-value" not in text
    assert [(f.instance, f.path, f.expected, f.actual) for f in report.findings] == [
        (second, "secrets.TOKEN", "set", None)
    ]


def test_another_image_is_an_image_finding(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    first = _serving(world)[0]
    _recreate(world, first, digest=world.digests["v2"])
    assert ("image", first, "image", world.digests["v1"], world.digests["v2"]) in _detect(
        world, tmp_path
    )


def test_membership_findings(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    first, second = _serving(world)
    world.driver.kill(first)
    stray = Instance("by-hand", "hello", "staging", ReleaseId(""), "local", "", "h1", Digest(""))
    world.driver.add_stray(stray)
    release = world.store.get_environment("staging").current_release  # type: ignore[union-attr]
    world.traffic.switch(
        "staging",
        "127.0.0.1:18080",
        BackendSet(str(release), (Backend(second, "x:1"), Backend("ghost", "127.0.0.1:9"))),
    )
    found = _detect(world, tmp_path)
    assert ("membership", first, "state", "running", "exited (status 137)") in found
    assert ("membership", first, "route", "routed", "not routed") not in found  # replaced anyway
    assert ("membership", "ghost", "route", "None", "routed (127.0.0.1:9)") in found
    assert ("membership", "by-hand", "stray", "None", "running h1") in found


def test_fix_replaces_drifted_instances_and_audits_it(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    first, second = _serving(world)
    world.driver.kill(first)
    _recreate(world, second, env={"APP_VERSION": "hacked"})
    world.driver.add_stray(
        Instance("by-hand", "hello", "staging", ReleaseId(""), "local", "", "h1", Digest(""))
    )
    result = fix_drift(world.engine().context, "staging", baselines=tmp_path)
    assert sorted(result.replaced) == sorted([first, second])
    assert len(result.created) == 2 and result.strays_destroyed == ("by-hand",)
    now = _serving(world)
    assert sorted(now) == sorted(result.created)
    route = world.traffic.routes["staging"]
    assert sorted(b.id for b in route.stable.backends) == sorted(now)  # one atomic switch
    assert {first, second, "by-hand"} <= set(world.driver.destroyed)
    assert _detect(world, tmp_path) == []
    entries = [e for e in world.store.audit_entries("staging") if e.action == "drift.fix"]
    assert len(entries) == 1 and sorted(entries[0].details["replaced"]) == sorted([first, second])
    actions = [e.action for e in world.store.audit_entries("staging")]
    assert actions.index("drift.stray.destroy") < actions.index("drift.fix")
    history = world.store.list_deployments("staging", limit=1)[0]
    assert (history.strategy, history.outcome) == ("drift-fix", "succeeded")
    assert history.from_release == history.to_release  # the same release, fresh instances


def test_fix_reapplies_a_wrong_route_without_replacing(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    serving = _serving(world)
    world.traffic.switch("staging", "127.0.0.1:18080", BackendSet("other", ()))
    result = fix_drift(world.engine().context, "staging", baselines=tmp_path)
    assert result.route_reapplied and result.replaced == () and result.created == ()
    route = world.traffic.routes["staging"]
    assert sorted(b.id for b in route.stable.backends) == serving
    assert _detect(world, tmp_path) == []


def test_a_replacement_that_is_not_healthy_is_undone(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    first, second = _serving(world)
    world.driver.kill(first)
    route_before = world.traffic.routes["staging"]
    world.driver.fail_creates = 1
    with pytest.raises(DeployFailedError, match="failed and was undone"):
        fix_drift(world.engine().context, "staging", baselines=tmp_path)
    assert world.traffic.routes["staging"] == route_before
    assert _serving(world) == sorted([first, second])
    assert world.store.list_deployments("staging", limit=1)[0].outcome == "failed"


def test_a_clean_environment_is_left_alone(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    before = len(world.store.audit_entries("staging"))
    result = fix_drift(world.engine().context, "staging", baselines=tmp_path)
    assert not result.acted and result.report.clean
    assert all(e.action.startswith("lock.") for e in world.store.audit_entries("staging")[before:])


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ("{watch: 0s}", "must be at least 1s"),
        ("{watch: soon}", "is not a duration"),
        ("{fix: true, ignre: []}", "ignre"),
    ],
)
def test_the_drift_section_is_validated(world: World, drift: str, message: str) -> None:
    spec = world.root / "castiron.yaml"
    spec.write_text(spec.read_text().replace("deploy_timeout: 5s,", f"drift: {drift},"))
    with pytest.raises(SpecError, match=message):
        load_spec(spec, world.environ)


def test_the_drift_section_defaults_and_values(world: World) -> None:
    spec = world.root / "castiron.yaml"
    text = spec.read_text().replace(
        "deploy_timeout: 5s,", 'drift: {watch: 1m, fix: true, ignore: ["*.pyc"]},'
    )
    spec.write_text(text)
    loaded = load_spec(spec, world.environ).spec
    got = loaded.environments["staging"].drift
    assert (got.watch, got.fix, got.ignore) == (60.0, True, ("*.pyc",))
    cold = loaded.environments["cold"].drift
    assert (cold.watch, cold.fix, cold.ignore) == (None, False, ())
    assert replace(DriftRules(), fix=True).fix


def test_building_drivers_does_not_load_the_drift_scanner() -> None:
    """``status`` and ``deploy`` build the local driver (wrapped to take baselines); the drift
    scanner is loaded only when an instance is created or a scan runs."""
    code = (
        "import sys, castiron.compose, castiron.engine.baselines; "
        "print(sorted(m for m in sys.modules if m.startswith(('castiron.engine.drift', "
        "'castiron.engine.fsdrift'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
