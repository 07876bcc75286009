"""The executor runs exactly the operations a plan shows, and journals each as before.

On the fake runtime and router, for blue-green, rolling, canary, a cold rollback and a drift
fix: the operations the deployment ran are the plan's, and its journal holds the steps those
operations write, in their order; ``down`` runs its plan through the same executor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from castiron.engine.deploy import DeployResult, Teardown
from castiron.engine.drift import fix_drift
from castiron.engine.execute import execute
from castiron.engine.operations import Desired, Operation, Serving, plan_drift_fix, plan_rollback
from castiron.engine.rollback import rollback
from castiron.errors import UsageError

from .conftest import SPEC, World
from .test_canary import ANALYSIS, CANARY_ENV, GOOD_STEPS, LoadTraffic

STEPS_OF: dict[str, tuple[str, ...]] = {
    "wait_healthy": ("health",),
    "switch": ("switch", "switched"),
    "set_weight": ("switch", "switched"),
    "analyse": ("analysis",),
    "drain": ("drain",),
    "destroy": (),
}


def journal_of(operations: Sequence[Operation]) -> list[str]:
    """The journal steps a deployment running ``operations`` writes."""
    steps = ["start"]
    for op in operations:
        steps += ["create", "created"] * op.count if op.kind == "create" else STEPS_OF[op.kind]
    return [*steps, "finish"]


def deploy_as_planned(world: World, environment: str, tag: str) -> DeployResult:
    engine = world.engine()
    target = engine.resolve(world.spec(), environment, tag)
    plan = engine.plan(target)
    result = engine.deploy(target)
    assert result.outcome == "succeeded"
    assert plan.operations and result.operations == plan.operations
    steps = [s.step for s in world.store.steps(str(result.deployment))]
    assert steps == journal_of(plan.operations)
    return result


@pytest.mark.parametrize("environment", ["staging", "cold", "rolling"])
def test_a_deployment_runs_its_plan(world: World, environment: str) -> None:
    first = deploy_as_planned(world, environment, "v1")
    assert "drain" not in [op.kind for op in first.operations]
    second = deploy_as_planned(world, environment, "v2")
    assert second.operations[-1].kind in ("drain", "destroy")


def test_rolling_switches_batch_by_batch_and_drains_the_previous_set_once(world: World) -> None:
    deploy_as_planned(world, "rolling", "v1")
    result = deploy_as_planned(world, "rolling", "v2")
    switches = [(op.count, op.keep, op.final) for op in result.operations if op.kind == "switch"]
    assert switches == [(1, 2, False), (2, 1, False), (3, 0, True)]
    assert [op.kind for op in result.operations].count("drain") == 1
    assert {r.status for r in world.store.list_instances("rolling")} == {"running", "warm"}


def test_a_canary_runs_its_steps_as_planned(world: World) -> None:
    spec = SPEC + CANARY_ENV.format(steps=GOOD_STEPS, analysis=ANALYSIS)
    (world.root / "castiron.yaml").write_text(spec)
    world.traffic = LoadTraffic()
    first = deploy_as_planned(world, "canary", "v1")
    assert "set_weight" not in [op.kind for op in first.operations]
    result = deploy_as_planned(world, "canary", "v2")
    assert [(op.kind, op.weight) for op in result.operations if op.weight is not None] == [
        ("set_weight", 10),
        ("set_weight", 50),
    ]


def test_a_cold_rollback_runs_the_blue_green_it_plans(world: World) -> None:
    deploy_as_planned(world, "cold", "v1")
    v2 = deploy_as_planned(world, "cold", "v2")
    engine = world.engine()
    result = rollback(engine.context, "cold")
    previous = engine.load_release(result.release)
    expected = plan_rollback(
        Serving(v2.release, previous.config.replicas),
        Desired(result.release, previous.config.replicas, keep_warm=0.0),
    )
    assert result.operations == expected
    steps = [s.step for s in world.store.steps(str(result.deployment))]
    assert steps == journal_of(expected)


def test_a_drift_fix_runs_the_replacement_it_plans(world: World, tmp_path: Path) -> None:
    deploy_as_planned(world, "staging", "v1")
    first, second = sorted(
        r.id for r in world.store.list_instances("staging") if r.status == "running"
    )
    world.driver.kill(first)
    result = fix_drift(world.engine().context, "staging", baselines=tmp_path)
    assert result.replaced == (first,) and len(result.created) == 1
    release = world.store.list_deployments("staging", limit=1)[0].to_release
    expected = plan_drift_fix(release, kept=1, replace=1)
    steps = [s.step for s in world.store.steps(str(result.deployment))]
    assert steps == journal_of(expected)
    route = world.traffic.routes["staging"]
    assert route.stable is not None
    assert sorted(b.id for b in route.stable.backends) == sorted([second, *result.created])


def test_down_runs_its_plan_through_the_executor(world: World) -> None:
    deploy_as_planned(world, "staging", "v1")
    deploy_as_planned(world, "staging", "v2")
    rows = sorted(r.id for r in world.store.list_instances("staging"))
    assert len(rows) == 4  # two serving, two warm
    destroyed = world.engine().down("staging")
    assert sorted(destroyed) == rows
    assert "staging" not in world.traffic.routes
    assert world.store.list_instances("staging") == []
    assert set(rows) <= set(world.driver.destroyed)


def test_taking_down_creates_nothing(world: World) -> None:
    teardown = Teardown(world.engine().context, "staging", None, [])  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="creates, routes and drains nothing"):
        execute(teardown, (Operation("create", "r", 1),))
