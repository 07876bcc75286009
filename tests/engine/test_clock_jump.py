"""The system clock jumping back (NTP step, a VM restored from a snapshot): injected through the
clock the state store and the engine take. Deployments, rollbacks, warm instances, locks and
the audit chain keep working; "newest" means the order things happened, not their timestamps."""

from __future__ import annotations

from castiron.engine.deploy import DeployResult
from castiron.engine.rollback import choose, rollback

from .conftest import World


def _deploy(world: World, tag: str, version: str) -> DeployResult:
    world.environ["APP_VERSION"] = version
    result = world.deploy("staging", tag)
    assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    return result


def test_deploys_rollbacks_and_reaping_survive_the_clock_going_back(world: World) -> None:
    first = _deploy(world, "v1", "1")
    second = _deploy(world, "v2", "1")
    world.clock.advance(-3 * 3600)  # three hours back
    third = _deploy(world, "v1", "3")

    history = world.store.list_deployments("staging")
    assert [d.to_release for d in history[:3]] == [third.release, second.release, first.release]
    assert choose(world.engine().context, "staging").release.id == second.release
    warm = {r.release for r in world.store.list_instances("staging") if r.status == "warm"}
    assert warm == {second.release}  # the release just left, not the older one

    back = rollback(world.engine().context, "staging")
    assert back.release == second.release and back.outcome == "succeeded"
    running = {r.release for r in world.store.list_instances("staging") if r.status == "running"}
    assert running == {second.release}

    world.clock.advance(-3600)  # and back again, while instances are warm
    world.engine().housekeeping("staging")
    assert {r.status for r in world.store.list_instances("staging")} == {"running", "warm"}
    world.clock.advance(4 * 3600 + 601)  # the clock catches up: keep_warm runs out once
    world.engine().housekeeping("staging")
    assert {r.status for r in world.store.list_instances("staging")} == {"running"}

    report = world.store.verify_audit()
    assert report.ok, report
