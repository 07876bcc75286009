"""Warm rollback as one flip of the traffic controller, and the cold path when it is refused."""

from __future__ import annotations

from castiron.engine.deploy import DeployResult
from castiron.engine.rollback import rollback

from .conftest import World


def _served(world: World) -> str:
    routing = world.traffic.current("staging")
    assert routing is not None and routing.stable is not None
    return routing.stable.release


def test_warm_rollback_journals_the_switch_before_one_flip(world: World) -> None:
    first = world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    assert isinstance(first, DeployResult)
    switches = len(world.traffic.history)
    result = rollback(world.engine().context, "staging")
    assert result.release == first.release and _served(world) == first.release
    assert len(world.traffic.history) == switches + 1  # one route change, nothing else
    latest = world.store.list_deployments("staging")[0]
    steps = [s.step for s in world.store.steps(latest.id)]
    assert steps[:3] == ["start", "switch", "switched"] and steps[-1] == "finish"
    running = {r.release for r in world.store.list_instances("staging") if r.status == "running"}
    assert running == {first.release}


def test_a_refused_flip_leaves_traffic_alone_and_deploys_afresh(world: World) -> None:
    first = world.deploy("staging", "v1")
    second = world.deploy("staging", "v2")
    assert isinstance(first, DeployResult) and isinstance(second, DeployResult)
    world.traffic.refuse_flip = "i-1: GET /healthz: connection refused"
    created = len(world.driver.created)
    result = rollback(world.engine().context, "staging")
    assert result.outcome == "succeeded" and result.release == first.release
    assert len(world.driver.created) > created  # the cold path started new instances
    assert _served(world) == first.release
    cold, refused = world.store.list_deployments("staging")[:2]
    assert refused.outcome == "aborted" and refused.strategy == "rollback"
    assert refused.details["refused"] == "i-1: GET /healthz: connection refused"
    assert cold.outcome == "succeeded" and cold.strategy == "rollback"
    assert cold.from_release == second.release  # traffic never moved before the cold path
