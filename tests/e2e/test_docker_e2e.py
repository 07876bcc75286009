"""The engine on the real Docker runtime, through the real CLI, with client load through the
router: zero failed requests across blue-green and rolling deploys, a refused release and a
warm rollback; ``kill -9`` of the CLI mid-deploy recovered by the next command; strays in
``status``; ``down`` removing every container of an environment.

The image is baked by castiron from ``/bin/busybox`` (busybox-static) and runs with a
read-only root on the host network: the container writes ``$VERSION`` into ``/tmp/www`` (its
private tmpfs) and serves it with ``busybox httpd`` on ``$HOST:$PORT``. With ``HEALTHY=0`` it
serves nothing, so ``GET /`` answers 404 and the health check fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from castiron.engine.journal import STEPS

from .conftest import (
    Load,
    Project,
    free_port,
    kill_mid_deploy_and_recover,
    project_env,
    reap_home,
    wait_for,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

RUN = f"{os.getpid():x}"
"""Names and labels carry this run's id, so runs of this file at the same time on one engine
(and their clean-ups) never touch each other's containers or images."""
APP = f"e2edocker-{RUN}"
IMAGE_LABEL = "castiron-test.e2e"
BUSYBOX = Path("/bin/busybox")
SCRIPT = (
    'mkdir -p /tmp/www; if [ "$HEALTHY" = 0 ]; then echo "refusing to serve: HEALTHY=0"; '
    'else echo "$VERSION" > /tmp/www/index.html; echo "serving $VERSION"; fi; '
    'exec /bin/busybox httpd -f -p "$HOST:$PORT" -h /tmp/www'
)
SPEC = """
app: {app}
image:
  context: ./app
  workdir: /
  entrypoint: ["/bin/busybox", "sh", "-c", {script}]
  labels: {{{label}: "{run}"}}
service:
  port: 8000
  replicas: {replicas}
  health: {{http: /, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
    HEALTHY: ${{HEALTHY:-1}}
environments:
  staging:
    runtime: docker
    network: host
    listen: 127.0.0.1:{port}
    deploy_timeout: {deploy_timeout}
    drain_timeout: 1s
    keep_warm: 10m
    strategy: {{type: {strategy}, batch: 1}}
"""


def _remove_containers(client: Any) -> None:
    # The low-level calls: listing through the models inspects each container and fails when
    # one disappears meanwhile.
    for label in (f"castiron.app={APP}", f"castiron-e2e-docker={RUN}"):
        for summary in client.api.containers(all=True, filters={"label": label}):
            with contextlib.suppress(Exception):
                client.api.remove_container(summary["Id"], force=True, v=True)


@pytest.fixture(scope="module")
def docker(docker_engine: Any) -> Iterator[Any]:
    """The SDK client; at the end, every container and image these tests made is removed."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing: install busybox-static")
    yield docker_engine
    _remove_containers(docker_engine)
    for image in docker_engine.images.list(filters={"label": f"{IMAGE_LABEL}={RUN}"}):
        with contextlib.suppress(Exception):
            docker_engine.images.remove(image.id, force=True)


@pytest.fixture
def make_project(tmp_path: Path, docker: Any) -> Iterator[Callable[..., Project]]:
    """A project deploying to Docker (``staging``) on a free router port; cleaned up after."""
    made: list[Project] = []

    def _make(
        replicas: int = 2, deploy_timeout: str = "20s", strategy: str = "blue-green"
    ) -> Project:
        root = tmp_path / f"project{len(made)}"
        (root / "app" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, root / "app" / "bin" / "busybox")
        port = free_port()
        (root / "castiron.yaml").write_text(
            SPEC.format(
                app=APP,
                script=json.dumps(SCRIPT),
                label=IMAGE_LABEL,
                run=RUN,
                replicas=replicas,
                port=port,
                deploy_timeout=deploy_timeout,
                strategy=strategy,
            )
        )
        project = Project(root, port, project_env(root))
        made.append(project)
        return project

    try:
        yield _make
    finally:
        try:
            for project in made:
                reap_home(project.home)
        finally:
            _remove_containers(docker)


def containers(docker: Any) -> dict[str, str]:
    """Containers labelled for the app: instance id -> status."""
    found = docker.api.containers(all=True, filters={"label": f"castiron.app={APP}"})
    return {
        c["Labels"].get("castiron.instance") or c["Names"][0].lstrip("/"): c["State"] for c in found
    }


def recorded(status: dict[str, Any]) -> set[str]:
    """Instance ids castiron records for the environment (serving and warm)."""
    warm = [i["id"] for w in status["warm"] for i in w["instances"]]
    return {i["id"] for i in status["instances"]} | set(warm)


def test_blue_green_deploy_and_warm_rollback_with_zero_failed_requests(
    make_project: Callable[..., Project], docker: Any
) -> None:
    project = make_project()
    project.bake("v1")
    first = project.deploy("v1", "one")
    assert first["outcome"] == "succeeded"
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
    assert status["runtime"] == "docker" and status["release"] == first["release"]
    assert len(status["instances"]) == 2 and all(i["healthy"] for i in status["instances"])
    assert status["strays"] == []
    # Every container castiron made is recorded: 2 serving + 2 warm, all running.
    running = containers(docker)
    assert set(running) == recorded(status) and len(running) == 4
    assert set(running.values()) == {"running"}
    # Hardened and on the host network, each replica on its own port.
    serving = [docker.containers.get(f"{APP}.staging.{i['id']}") for i in status["instances"]]
    assert all(c.attrs["HostConfig"]["ReadonlyRootfs"] for c in serving)
    assert {c.attrs["HostConfig"]["NetworkMode"] for c in serving} == {"host"}
    assert len({i["address"] for i in status["instances"]}) == 2
    history = project.json("history", "staging")["deployments"]
    assert [d["strategy"] for d in history] == ["rollback", "blue-green", "blue-green"]


def test_rolling_deploy_with_zero_failed_requests(
    make_project: Callable[..., Project], docker: Any
) -> None:
    project = make_project(replicas=3, strategy="rolling")
    project.bake("v1")
    project.deploy("v1", "one")
    with Load(project.port) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        result = project.deploy("v1", "two")
        wait_for(lambda: load.ok > 20, what="more load")
    assert result["outcome"] == "succeeded"
    assert load.failed == 0, load.errors[:5]
    assert {"one", "two"} <= load.bodies
    assert project.served() == "two"
    status = project.status()
    assert len(status["instances"]) == 3 and all(i["healthy"] for i in status["instances"])
    assert set(containers(docker)) == recorded(status)
    history = project.json("history", "staging")["deployments"]
    assert [d["strategy"] for d in history] == ["rolling", "rolling"]


def test_unhealthy_release_is_refused_with_zero_failed_requests(
    make_project: Callable[..., Project], docker: Any
) -> None:
    project = make_project(deploy_timeout="3s")
    project.bake("v1")
    first = project.deploy("v1", "one")
    before = set(containers(docker))
    with Load(project.port) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two", "HEALTHY": "0"})
        wait_for(lambda: load.ok > 10, what="more load")
    assert proc.returncode == 1, proc.stderr
    assert "not healthy after 3s" in proc.stderr
    assert "refusing to serve: HEALTHY=0" in proc.stderr  # the container's last output
    assert load.failed == 0, load.errors[:5]
    assert load.bodies == {"one"}
    assert project.status()["release"] == first["release"]
    assert set(containers(docker)) == before  # the refused release's containers are gone
    releases = project.json("releases", "staging")["releases"]
    assert isinstance(releases, list)
    assert [r["last_outcome"] for r in releases] == ["failed", "succeeded"]


def test_logs_show_each_containers_output(
    make_project: Callable[..., Project], docker: Any
) -> None:
    project = make_project(replicas=2)
    project.bake("v1")
    project.deploy("v1", "one")
    ids = sorted(i["id"] for i in project.status()["instances"])
    wait_for(
        lambda: project.run("logs", "staging").stdout.count("serving one") == 2,
        what="both containers' output",
    )
    shown = project.run("logs", "staging").stdout.splitlines()
    assert sorted(shown) == sorted(f"{iid} | serving one" for iid in ids)
    data = project.json("logs", "staging", "--instance", ids[0])
    (only,) = data["instances"]
    assert only["id"] == ids[0] and only["lines"] == ["serving one"]
    missing = project.run("logs", "staging", "--instance", "nope")
    assert missing.returncode == 2 and "no instance 'nope'" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("step", [s for s in STEPS if s not in ("start", "finish")])
def test_kill_9_mid_deploy_is_recovered_by_the_next_command(
    make_project: Callable[..., Project], docker: Any, step: str
) -> None:
    project = make_project(replicas=1)
    status = kill_mid_deploy_and_recover(project, step)
    # nothing leaked: the engine runs exactly the recorded containers
    assert set(containers(docker)) == recorded(status)
    assert status["strays"] == []


def test_strays_are_reported_and_down_removes_every_container(
    make_project: Callable[..., Project], docker: Any
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    serving = project.status()["instances"][0]["id"]
    image_id = docker.containers.get(f"{APP}.staging.{serving}").image.id
    sleeper = ["/bin/busybox", "sleep", "300"]
    # A container carrying only some of castiron's labels, and one started by hand from the
    # release's image.
    partial = docker.containers.run(
        image_id,
        entrypoint=sleeper,
        network_mode="host",
        detach=True,
        labels={"castiron.app": APP, "castiron.env": "staging"},
        name=f"{APP}-partial",
    )
    by_hand = docker.containers.run(
        image_id,
        entrypoint=sleeper,
        network_mode="host",
        detach=True,
        labels={"castiron-e2e-docker": RUN},
        name=f"{APP}-by-hand",
    )
    status = project.status()
    strays = {s["handle"]: s for s in status["strays"]}
    assert set(strays) == {partial.id, by_hand.id}
    assert strays[by_hand.id]["name"] == f"{APP}-by-hand"
    assert {s["state"] for s in strays.values()} == {"running"}
    text = project.ok("status", "staging")
    assert "strays: " in text and f"{APP}-by-hand (running)" in text

    down = project.json("down", "staging", "--yes")
    assert serving in down["destroyed"]
    assert containers(docker) == {}  # every container labelled for the environment is gone
    by_hand.reload()
    assert by_hand.status == "running"  # one started by hand is the user's, left alone
    after = project.status()
    assert after["instances"] == [] and after["release"] is None
    assert [s["handle"] for s in after["strays"]] == [by_hand.id]


def test_status_without_a_docker_engine_says_so(
    make_project: Callable[..., Project], docker: Any, tmp_path: Path
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    dead = f"unix://{tmp_path / 'no-docker.sock'}"
    data = project.json("status", "staging", extra={"DOCKER_HOST": dead})
    envs = data["environments"]
    assert isinstance(envs, list) and envs[0]["strays"] is None
    proc = project.run("down", "staging", "--yes", extra={"DOCKER_HOST": dead})
    assert proc.returncode == 1
    assert f"no Docker engine at {dead}" in proc.stderr
    assert "Traceback" not in proc.stderr
    project.ok("down", "staging", "--yes")  # really down, with the engine back
