"""The deploy engine against the fake runtime and router: strategies, failure, journal,
recovery from a crash at every step, rollback, reaping and ``down``."""

from __future__ import annotations

import pytest

from castiron.engine.deploy import DeployResult
from castiron.engine.journal import STEPS
from castiron.engine.rollback import choose, rollback
from castiron.errors import DeployFailedError, LockedError, UsageError
from castiron.state.locks import LockManager

from .conftest import Crash, Recorder, World


def served_release(world: World, environment: str = "staging") -> str:
    routing = world.traffic.current(environment)
    assert routing is not None and routing.stable is not None
    assert routing.canary_weight == 0
    return routing.stable.release


def statuses(world: World, environment: str = "staging") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in world.store.list_instances(environment):
        out.setdefault(row.status, []).append(row.release)
    return out


def test_first_deploy_switches_traffic_to_healthy_new_instances(world: World) -> None:
    recorder = Recorder()
    result = world.deploy("staging", "v1", recorder)
    assert isinstance(result, DeployResult)
    assert result.outcome == "succeeded"
    assert result.digest == world.digests["v1"]
    routing = world.traffic.current("staging")
    assert routing is not None and routing.stable is not None
    assert routing.listen == "127.0.0.1:18080"
    assert routing.stable.release == result.release
    assert len(routing.stable.backends) == 2
    env = world.store.get_environment("staging")
    assert env is not None
    assert env.current_release == env.known_good_release == result.release
    assert statuses(world) == {"running": [result.release, result.release]}
    deployment = world.store.list_deployments("staging")[0]
    assert deployment.outcome == "succeeded"
    steps = [s.step for s in world.store.steps(deployment.id)]
    assert steps == [
        "start", "create", "created", "create", "created", "health", "switch", "switched",
        "finish",
    ]  # fmt: skip
    assert recorder.steps == steps[:-1]  # "finish" is the outcome itself, not a step to watch
    # instances got the image's env, the release's env and the resolved secret
    record = world.driver._records[routing.stable.backends[0].id]
    assert record.env["BAKED"] == "yes" and record.env["TOKEN"] == "s3cret-value"
    assert record.command == ("python3", "server.py")


def test_secret_values_never_reach_the_state_store(world: World) -> None:
    world.deploy("staging", "v1")
    world.store.close()
    data = (world.root / ".castiron" / "state.db").read_bytes()
    wal = world.root / ".castiron" / "state.db-wal"
    if wal.exists():
        data += wal.read_bytes()
    assert b"s3cret-value" not in data


def test_second_deploy_keeps_the_previous_release_warm(world: World) -> None:
    first = world.deploy("staging", "v1")
    second = world.deploy("staging", "v2")
    assert isinstance(first, DeployResult) and isinstance(second, DeployResult)
    assert served_release(world) == second.release
    assert statuses(world) == {
        "running": [second.release] * 2,
        "warm": [first.release] * 2,
    }
    assert world.driver.destroyed == []


def test_deploying_what_runs_changes_nothing(world: World) -> None:
    world.deploy("staging", "v1")
    again = world.deploy("staging", "v1")
    assert isinstance(again, DeployResult) and again.outcome == "unchanged"
    assert len(world.store.list_deployments("staging")) == 1


def test_plan_shows_the_diff_and_changes_nothing(world: World) -> None:
    world.deploy("staging", "v1")
    engine = world.engine()
    target = engine.resolve(world.spec(), "staging", "v2")
    before = world.store.audit_entries()
    plan = engine.plan(target)
    assert plan.has_changes and plan.create == 2 and plan.destroy == 2
    assert [c.field for c in plan.changes] == ["image"]
    assert world.store.audit_entries() == before


def test_unhealthy_release_is_refused_and_traffic_never_moves(world: World) -> None:
    first = world.deploy("staging", "v1")
    assert isinstance(first, DeployResult)
    history_before = list(world.traffic.history)
    world.environ["SICK"] = "1"
    with pytest.raises(DeployFailedError) as err:
        world.deploy("staging", "v2")
    message = str(err.value)
    assert "not healthy after 5s" in message and "503" in message
    assert "error: database unreachable" in message  # the instance's last output
    assert world.traffic.history == history_before
    assert served_release(world) == first.release
    assert statuses(world) == {"running": [first.release] * 2}
    assert len(world.driver.destroyed) == 2  # the new instances, not the old ones
    failed = world.store.list_deployments("staging")[0]
    assert failed.outcome == "failed"
    env = world.store.get_environment("staging")
    assert env is not None and env.current_release == env.known_good_release == first.release


def test_a_create_failure_is_undone(world: World) -> None:
    world.deploy("staging", "v1")
    world.driver.fail_creates = 1
    world.driver.created.clear()
    with pytest.raises(DeployFailedError, match="injected create failure"):
        world.deploy("staging", "v2")
    assert world.driver.destroyed == world.driver.created  # the one that was made
    assert world.store.list_deployments("staging")[0].outcome == "failed"


def test_rolling_replaces_in_batches_without_losing_capacity(world: World) -> None:
    first = world.deploy("rolling", "v1")
    assert isinstance(first, DeployResult)
    world.traffic.history.clear()
    second = world.deploy("rolling", "v2")
    assert isinstance(second, DeployResult)
    shapes = [
        (
            len(c.stable.backends) if c.stable else 0,
            len(c.canary.backends) if c.canary else 0,
            c.canary_weight,
        )
        for c in world.traffic.history
    ]
    assert shapes == [(2, 1, 33), (1, 2, 67), (3, 0, 0)]
    assert served_release(world, "rolling") == second.release
    assert statuses(world, "rolling") == {
        "running": [second.release] * 3,
        "warm": [first.release] * 3,
    }


@pytest.mark.parametrize("step", STEPS[:-1])
def test_a_crash_at_any_step_is_recovered_by_the_next_command(world: World, step: str) -> None:
    first = world.deploy("staging", "v1")
    assert isinstance(first, DeployResult)
    with pytest.raises(Crash):
        world.deploy("staging", "v2", Recorder(crash_at=step))
    crashed = world.store.list_deployments("staging")[0]
    assert crashed.outcome == "running"
    recovered = world.engine().recover("staging")
    assert [d.id for d in recovered] == [crashed.id]
    outcome = recovered[0].outcome
    after_switch = STEPS.index(step) >= STEPS.index("switched")
    assert outcome == ("succeeded" if after_switch else "aborted")
    expected = crashed.to_release if after_switch else first.release
    assert served_release(world) == expected
    env = world.store.get_environment("staging")
    assert env is not None and env.current_release == expected
    running = statuses(world)["running"]
    assert running == [expected, expected]
    live = {o.instance.id for o in world.driver.observe("hello", "staging")}
    assert {r.id for r in world.store.list_instances("staging")} == live  # nothing leaked
    actions = [e.action for e in world.store.audit_entries("staging")]
    assert actions[-1] == "deploy.recover"


def test_the_next_deploy_recovers_first(world: World) -> None:
    world.deploy("staging", "v1")
    with pytest.raises(Crash):
        world.deploy("staging", "v2", Recorder(crash_at="health"))
    result = world.deploy("staging", "v2")
    assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    outcomes = [d.outcome for d in world.store.list_deployments("staging")]
    assert outcomes == ["succeeded", "aborted", "succeeded"]


def test_a_live_lock_holder_is_respected(world: World) -> None:
    held = LockManager(world.store).acquire("staging", "someone else", heartbeat=False)
    try:
        with pytest.raises(LockedError, match="someone else"):
            world.deploy("staging", "v1")
    finally:
        held.release()


def test_warm_rollback_is_a_pointer_flip(world: World) -> None:
    first = world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    assert isinstance(first, DeployResult)
    created = len(world.driver.created)
    result = rollback(world.engine().context, "staging")
    assert result.outcome == "succeeded" and result.release == first.release
    assert len(world.driver.created) == created  # nothing new was started
    assert served_release(world) == first.release
    latest = world.store.list_deployments("staging")[0]
    assert latest.strategy == "rollback" and latest.details["warm"] is True
    env = world.store.get_environment("staging")
    assert env is not None and env.current_release == first.release


def test_rollback_skips_failed_releases(world: World) -> None:
    first = world.deploy("staging", "v1")
    second = world.deploy("staging", "v2")
    assert isinstance(first, DeployResult) and isinstance(second, DeployResult)
    world.environ["APP_VERSION"] = "3"
    world.environ["SICK"] = "1"
    with pytest.raises(DeployFailedError):
        world.deploy("staging", "v2")
    choice = choose(world.engine().context, "staging")
    assert choice.release.id == first.release
    failed = world.store.list_deployments("staging")[0].to_release
    with pytest.raises(UsageError, match="never deployed successfully"):
        choose(world.engine().context, "staging", failed)


def test_rollback_without_a_known_good_target_is_refused(world: World) -> None:
    world.deploy("staging", "v1")
    with pytest.raises(UsageError, match="no known-good release"):
        rollback(world.engine().context, "staging")


def test_cold_rollback_deploys_the_stored_release_afresh(world: World) -> None:
    first = world.deploy("cold", "v1")
    world.deploy("cold", "v2")
    assert isinstance(first, DeployResult)
    assert statuses(world, "cold") == {
        "running": [world.store.list_deployments("cold")[0].to_release] * 2
    }
    created = len(world.driver.created)
    result = rollback(world.engine().context, "cold")
    assert result.release == first.release and result.outcome == "succeeded"
    assert len(world.driver.created) == created + 2
    assert served_release(world, "cold") == first.release
    assert world.store.list_deployments("cold")[0].strategy == "rollback"


def test_warm_instances_are_reaped_after_keep_warm(world: World) -> None:
    first = world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    assert isinstance(first, DeployResult)
    engine = world.engine()
    engine.housekeeping("staging")
    assert "warm" in statuses(world)
    world.clock.advance(601)
    engine.housekeeping()
    assert "warm" not in statuses(world)
    assert len(world.driver.destroyed) == 2
    assert world.store.audit_entries("staging")[-2].action == "instance.reap"


def test_down_removes_the_route_and_every_instance(world: World) -> None:
    world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    destroyed = world.engine().down("staging")
    assert len(destroyed) == 4
    assert world.traffic.current("staging") is None
    assert world.store.list_instances("staging") == []
    assert world.driver.observe("hello", "staging") == []
    env = world.store.get_environment("staging")
    assert env is not None and env.current_release is None
    assert [e.action for e in world.store.audit_entries("staging")][-2:] == [
        "env.down",
        "lock.release",
    ]


def test_unknown_environment_and_missing_image_are_usage_errors(world: World) -> None:
    engine = world.engine()
    with pytest.raises(UsageError, match="no environment 'prod'"):
        engine.resolve(world.spec(), "prod")
    target = engine.resolve(world.spec(), "staging")  # default: the newest baked image
    assert target.release.digest == world.digests["v2"]
    world.environ.pop("HELLO_TOKEN")
    with pytest.raises(UsageError, match="HELLO_TOKEN"):
        world.engine().deploy(target)
    assert world.store.list_deployments("staging") == []
