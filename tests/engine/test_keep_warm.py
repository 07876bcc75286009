"""Warm instances never pile up: at most ``keep_warm_releases`` previous releases stay warm,
whatever the number of deployments within ``keep_warm``."""

from __future__ import annotations

import pytest

from castiron.engine.deploy import DeployResult, surplus_warm
from castiron.engine.rollback import rollback
from castiron.model import ReleaseId
from castiron.state.base import InstanceRow

from .conftest import World


def _row(iid: str, release: str, status: str = "warm", until: str = "") -> InstanceRow:
    return InstanceRow(
        iid, "staging", ReleaseId(release), "127.0.0.1:1", "local", status, {"warm_until": until}
    )


def _two(release: str) -> int:
    return 2


@pytest.mark.parametrize(
    ("rows", "keep", "surplus"),
    [
        ([], 1, []),
        # one previous release: kept
        ([_row("a1", "A", "running"), _row("b1", "B", until="t2")], 1, []),
        # two previous releases: the older goes
        ([_row("b1", "B", until="t2"), _row("c1", "C", until="t1")], 1, ["c1"]),
        ([_row("b1", "B", until="t2"), _row("c1", "C", until="t1")], 2, []),
        ([_row("b1", "B", until="t2"), _row("c1", "C", until="t1")], 0, ["b1", "c1"]),
        # a warm copy of the release now serving is nobody's rollback target
        ([_row("a0", "A", until="t1"), _row("a1", "A", "running")], 1, ["a0"]),
        # a release kept warm twice: only its newest replicas stay
        (
            [_row(f"b{i}", "B", until=f"t{i}") for i in range(1, 5)],
            1,
            ["b2", "b1"],
        ),
        # the deployments' order wins over warm_until (equal within a clock tick)
        ([_row("b1", "B", until="t"), _row("c1", "C", until="t")], "drained C, B", ["b1"]),
        # stopping and running instances are not this rule's business
        ([_row("s1", "S", "stopping"), _row("r1", "R", "running")], 0, []),
    ],
    ids=["empty", "one", "older", "keep-2", "keep-0", "current", "twice", "order", "others"],
)
def test_surplus_warm(rows: list[InstanceRow], keep: int | str, surplus: list[str]) -> None:
    drained: list[ReleaseId] = []
    if isinstance(keep, str):  # "drained X, Y": the deployments' order, newest first
        drained = [ReleaseId(r) for r in keep.removeprefix("drained ").split(", ")]
        keep = 1
    got = surplus_warm(rows, ReleaseId("A"), keep, _two, drained)
    assert [r.id for r in got] == surplus


def test_twenty_alternating_deploys_keep_one_warm_release(world: World) -> None:
    for i in range(20):
        world.environ["APP_VERSION"] = str(i % 2)
        world.deploy("staging", "v1")
    by_status: dict[str, set[str]] = {}
    for row in world.store.list_instances("staging"):
        by_status.setdefault(row.status, set()).add(row.release)
    rows = world.store.list_instances("staging")
    assert len(rows) == 4  # replicas 2 serving + 2 warm
    assert len(by_status["running"]) == 1 and len(by_status["warm"]) == 1
    assert by_status["running"] != by_status["warm"]
    assert len(set(world.driver.created) - set(world.driver.destroyed)) == 4
    assert len(world.driver.created) == 40
    reaps = [e for e in world.store.audit_entries("staging") if e.action == "instance.reap"]
    assert reaps and reaps[-1].details["why"] == "beyond keep_warm_releases"


def test_rollback_still_flips_to_the_warm_release(world: World) -> None:
    first = world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    world.environ["APP_VERSION"] = "9"
    third = world.deploy("staging", "v2")
    assert isinstance(first, DeployResult) and isinstance(third, DeployResult)
    warm = {r.release for r in world.store.list_instances("staging") if r.status == "warm"}
    assert first.release not in warm and len(warm) == 1  # v1 went: older than keep_warm_releases
    created = len(world.driver.created)
    result = rollback(world.engine().context, "staging")
    assert result.outcome == "succeeded" and len(world.driver.created) == created
    back = {r.release for r in world.store.list_instances("staging") if r.status == "running"}
    assert back == warm
