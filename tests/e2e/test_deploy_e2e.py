"""The engine on the real local runtime, through the real CLI, with client load through the
router: zero failed requests across deploys, refused releases and rollbacks; the lock; an
instance killed by hand; and ``kill -9`` of the CLI at every journal step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable

import pytest

from castiron.engine.journal import STEPS

from .conftest import Load, Project, kill_mid_deploy_and_recover, wait_for

pytestmark = pytest.mark.slow


def test_zero_downtime_deploy_and_rollback(make_project: Callable[..., Project]) -> None:
    project = make_project()
    project.bake("v1")
    first = project.deploy("v1", "one")
    assert first["outcome"] == "succeeded"
    assert set(first) >= {"environment", "release", "digest", "outcome", "duration_s"}
    assert project.served() == "one"
    with Load(project.port) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        second = project.deploy("v1", "two")
        wait_for(lambda: project.served() == "two", what="v2 to serve")
        back = project.json("rollback", "staging")
        wait_for(lambda: load.ok > 20, what="more load")
    assert load.failed == 0, load.errors[:5]
    assert {"one", "two"} <= load.bodies
    assert second["outcome"] == "succeeded" and back["release"] == first["release"]
    assert project.served() == "one"
    status = project.status()
    assert status["release"] == first["release"]
    assert status["listen"] == f"127.0.0.1:{project.port}"
    instances = status["instances"]
    assert isinstance(instances, list) and len(instances) == 2
    assert all(i["healthy"] for i in instances)
    history = project.json("history", "staging")["deployments"]
    assert isinstance(history, list)
    assert [d["strategy"] for d in history] == ["rollback", "blue-green", "blue-green"]


def test_unhealthy_release_is_refused_with_zero_failed_requests(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(deploy_timeout="3s")
    project.bake("v1")
    first = project.deploy("v1", "one")
    with Load(project.port) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two", "HEALTHY": "0"})
        wait_for(lambda: load.ok > 10, what="more load")
    assert proc.returncode == 1, proc.stderr
    assert "not healthy after 3s" in proc.stderr
    assert "healthz: refusing, HEALTHY=0" in proc.stderr  # the instance's own output
    assert load.failed == 0, load.errors[:5]
    assert load.bodies == {"one"}
    status = project.status()
    assert status["release"] == first["release"]
    releases = project.json("releases", "staging")["releases"]
    assert isinstance(releases, list)
    assert [r["last_outcome"] for r in releases] == ["failed", "succeeded"]


def test_concurrent_deploys_are_serialised_by_the_lock(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    paused = project.start(
        "deploy", "staging", "--yes", extra={"VERSION": "two", "CASTIRON_TEST_PAUSE_AT": "health"}
    )
    try:
        wait_for(lambda: (project.home / "paused-at-health").exists(), what="the pause")
        second = project.run("deploy", "staging", "--yes", extra={"VERSION": "three"})
        assert second.returncode == 4, second.stderr
        assert "locked by e2e@test" in second.stderr
    finally:
        paused.kill()
        paused.communicate(timeout=30)


def test_an_instance_killed_by_hand_is_replaced(make_project: Callable[..., Project]) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    before = project.status()["instances"]
    assert isinstance(before, list)
    old_id = before[0]["id"]
    records = json.loads((project.home / "agent" / "instances.json").read_text())["instances"]
    pid = next(r["pid"] for r in records if r["id"] == old_id)
    os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        instances = project.status()["instances"]
        assert isinstance(instances, list)
        ids = {i["id"] for i in instances if i["healthy"] and i.get("in_route")}
        return bool(ids) and old_id not in ids

    wait_for(replaced, timeout=90, what="a replacement instance in the route")
    assert project.served() == "one"


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("start", "finish")])
def test_kill_9_at_each_journal_step_recovers(
    make_project: Callable[..., Project], step: str
) -> None:
    project = make_project(replicas=1)
    status = kill_mid_deploy_and_recover(project, step)
    # nothing leaked: the agent runs exactly the recorded instances
    agent = subprocess.run(
        project.argv("agent", "status", "--json"),
        env=project.env,
        capture_output=True,
        text=True,
        check=True,
    )
    running = json.loads(agent.stdout)["status"]["running_instances"]
    warm = status["warm"]
    assert isinstance(warm, list) and isinstance(status["instances"], list)
    recorded = len(status["instances"]) + sum(len(w["instances"]) for w in warm)
    assert running == recorded
