"""Canary deployments through the real CLI, the real agent and router, with client load:
on the local runtime (real processes) and on Docker (``runtime: docker``, host network).

The app fails a set fraction of requests, deterministically: with ``FAIL_RATE=0.2`` every
5th request to ``/`` on each instance answers 500. A release with 20 % errors is aborted at
its first step, and the failures the load generator saw stay within that step's weight x the
error rate (plus a small margin); a good release reaches 100 % with no failed request; a
``pause: manual`` step waits for ``castiron deploy ENV --continue``; ``castiron abort`` undoes
a canary mid-step. An aborted canary leaves no instance behind.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Load, Project, free_port, get, project_env, reap_home, wait_for

pytestmark = pytest.mark.slow

APP = textwrap.dedent(
    """
    import os, signal, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    rate = float(os.environ.get("FAIL_RATE", "0") or 0)
    every = round(1 / rate) if rate > 0 else 0
    lock = threading.Lock()
    count = 0

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            global count
            status, body = 200, (os.environ.get("VERSION", "?") + "\\n").encode()
            if self.path == "/healthz":
                body = b"ok\\n"
            else:
                with lock:
                    count += 1
                    failing = every and count % every == 0
                if failing:
                    status, body = 500, b"injected failure\\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.1)
    """
)

SPEC = """
app: {app}
image:
{image}
service:
  port: 8000
  replicas: 2
  health: {{http: {health}, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
    FAIL_RATE: ${{FAIL_RATE:-0}}
environments:
  staging:
    runtime: {runtime}
    listen: 127.0.0.1:{port}
    deploy_timeout: 30s
    drain_timeout: 1s
    keep_warm: 10m
{extra}
    strategy:
      type: canary
      steps: {steps}
      analysis: {{max_error_rate: 0.05, min_requests: 20}}
"""

LOCAL_IMAGE = """  context: ./app
  entrypoint: ["python3", "app.py"]"""

Factory = Callable[..., Project]


def _env(root: Path) -> dict[str, str]:
    return project_env(root, ("VERSION", "FAIL_RATE"))


@pytest.fixture
def local_project(tmp_path: Path) -> Iterator[Factory]:
    """A canary project on the local runtime; every process it started is killed after."""
    made: list[Project] = []

    def _make(steps: str) -> Project:
        root = tmp_path / f"project{len(made)}"
        (root / "app").mkdir(parents=True)
        (root / "app" / "app.py").write_text(APP)
        port = free_port()
        spec = SPEC.format(
            app="canarye2e",
            image=LOCAL_IMAGE,
            health="/healthz",
            runtime="local",
            port=port,
            extra="    isolation: none",
            steps=steps,
        )
        (root / "castiron.yaml").write_text(spec)
        project = Project(root, port, _env(root))
        made.append(project)
        return project

    yield _make
    for project in made:
        reap_home(project.home)


def deploy(
    project: Project, version: str, fail_rate: str = "0", *flags: str
) -> subprocess.CompletedProcess[str]:
    return project.run(
        "deploy",
        "staging",
        "--image",
        "v1",
        "--yes",
        "--json",
        *flags,
        extra={"VERSION": version, "FAIL_RATE": fail_rate},
    )


def start_deploy(project: Project, version: str) -> subprocess.Popen[str]:
    return project.start(
        "deploy", "staging", "--image", "v1", "--yes", "--json", extra={"VERSION": version}
    )


def instances(project: Project) -> tuple[set[str], set[str]]:
    """(releases of recorded instances, ids of strays) after the command's housekeeping."""
    status = project.status()
    warm = [i for w in status["warm"] for i in w["instances"]]  # type: ignore[attr-defined]
    rows = [*status["instances"], *warm]  # type: ignore[misc]
    return {str(r["release"]) for r in rows}, {str(s) for s in status.get("strays") or []}  # type: ignore[union-attr]


def first_release(project: Project) -> str:
    project.bake("v1")
    first = project.deploy("v1", "one")  # nothing to compare with: switched at once
    assert first["outcome"] == "succeeded"
    return str(first["release"])


def check_bad_release_is_aborted_at_the_first_step(project: Project) -> None:
    stable = first_release(project)
    with Load(project.port, max_seconds=60) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        proc = deploy(project, "two", fail_rate="0.2")
        after = load.ok
        wait_for(lambda: load.ok > after + 20, what="more load")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["outcome"] == "aborted"
    assert result["analysis"]["step"] == 1 and result["analysis"]["weight"] == 20
    assert result["analysis"]["canary"]["error_rate"] > 0.05
    assert "aborted at step 1/2 (weight 20%)" in proc.stderr
    # The failures seen by clients: at most weight x error rate of the requests, plus margin.
    total = load.ok + load.failed
    assert 1 <= load.failed <= 0.2 * 0.2 * total + 3, (load.failed, total, load.errors[:5])
    assert project.served() == "one"
    releases, strays = instances(project)
    assert releases == {stable} and strays == set()
    history = project.json("history", "staging")["deployments"]
    assert [d["outcome"] for d in history] == ["aborted", "succeeded"]  # type: ignore[index]


def check_good_release_reaches_all_traffic(project: Project) -> None:
    first_release(project)
    with Load(project.port, max_seconds=60) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        proc = deploy(project, "two", "0", "--watch")
        wait_for(lambda: project.served() == "two", what="v2 to serve")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outcome"] == "succeeded"
    assert load.failed == 0, load.errors[:5]
    assert {"one", "two"} <= load.bodies
    # --watch without a terminal: plain lines with each release's figures.
    assert "step 1/2 weight 20% (holding" in proc.stderr
    assert "step 2/2 weight 50% (passed" in proc.stderr and "| stable " in proc.stderr
    assert {get(project.port)[1].strip() for _ in range(20)} == {"two"}


LOCAL_STEPS = "[{weight: 20, pause: 2s}, {weight: 50, pause: 1s}]"
MANUAL_STEPS = "[{weight: 50, pause: manual}]"


def test_local_bad_release_is_aborted_at_the_first_step(local_project: Factory) -> None:
    check_bad_release_is_aborted_at_the_first_step(local_project(LOCAL_STEPS))


def test_local_good_release_reaches_all_traffic(local_project: Factory) -> None:
    check_good_release_reaches_all_traffic(local_project(LOCAL_STEPS))


def test_manual_pause_waits_for_continue(local_project: Factory) -> None:
    project = local_project(MANUAL_STEPS)
    first_release(project)
    proc = start_deploy(project, "two")
    try:
        wait_for(
            lambda: "two" in {get(project.port)[1].strip() for _ in range(4)},
            what="the canary to take its share",
        )
        assert proc.poll() is None  # still waiting at the manual step
        asked = project.json("deploy", "staging", "--continue")
        assert asked["requested"] == "continue"
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)["outcome"] == "succeeded"
    assert project.served() == "two"


def test_abort_during_a_step(local_project: Factory) -> None:
    project = local_project(MANUAL_STEPS)
    stable = first_release(project)
    proc = start_deploy(project, "two")
    try:
        wait_for(
            lambda: "two" in {get(project.port)[1].strip() for _ in range(4)},
            what="the canary to take its share",
        )
        result = project.json("abort", "staging")
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert result["outcome"] == "aborted" and result["release"] == stable
    assert proc.returncode == 1 and "abort requested by e2e@test" in err
    assert json.loads(out)["outcome"] == "aborted"
    assert {get(project.port)[1].strip() for _ in range(10)} == {"one"}
    releases, strays = instances(project)
    assert releases == {stable} and strays == set()
    nothing = project.run("abort", "staging")
    assert nothing.returncode == 2 and "no deployment of 'staging' is running" in nothing.stderr


def test_abort_recovers_a_canary_whose_process_died(local_project: Factory) -> None:
    project = local_project(MANUAL_STEPS)
    stable = first_release(project)
    proc = start_deploy(project, "two")
    try:
        wait_for(
            lambda: "two" in {get(project.port)[1].strip() for _ in range(4)},
            what="the canary to take its share",
        )
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    result = project.json("abort", "staging")
    assert result["outcome"] == "aborted"
    assert {get(project.port)[1].strip() for _ in range(10)} == {"one"}
    releases, _ = instances(project)
    assert releases == {stable}


# --- Docker ------------------------------------------------------------------------------------

BUSYBOX = Path("/bin/busybox")
DOCKER_APP = "canarydocker"
IMAGE_LABEL = "castiron-test.canary"
# busybox httpd serves /www; `/` has no index.html, so it runs /www/cgi-bin/index.cgi, which
# fails every Nth request of its container (a counter in the container's private /tmp).
CGI = textwrap.dedent(
    """\
    #!/bin/busybox sh
    case "$FAIL_RATE" in 0.2) every=5;; 0.5) every=2;; *) every=0;; esac
    n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > /tmp/count
    if [ "$every" -gt 0 ] && [ $((n % every)) -eq 0 ]; then
      printf 'HTTP/1.0 500 Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nfailure\\n'
    else
      printf 'HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n\\r\\n%s\\n' "$VERSION"
    fi
    """
)
SCRIPT = 'exec /bin/busybox httpd -f -p "$HOST:$PORT" -h /www'


@pytest.fixture
def docker_project(tmp_path: Path, docker_engine: Any) -> Iterator[Factory]:
    """A canary project on the Docker runtime (host network); containers removed after."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing: install busybox-static")
    made: list[Project] = []

    def remove() -> None:
        for c in docker_engine.containers.list(
            all=True, filters={"label": f"castiron.app={DOCKER_APP}"}
        ):
            with contextlib.suppress(Exception):
                c.remove(force=True, v=True)

    def _make(steps: str) -> Project:
        root = tmp_path / f"project{len(made)}"
        (root / "app" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, root / "app" / "bin" / "busybox")
        cgi = root / "app" / "www" / "cgi-bin" / "index.cgi"
        cgi.parent.mkdir(parents=True)
        cgi.write_text(CGI)
        cgi.chmod(0o755)
        (root / "app" / "www" / "healthz.txt").write_text("ok\n")
        port = free_port()
        image = (
            "  context: ./app\n  workdir: /\n"
            f'  entrypoint: ["/bin/busybox", "sh", "-c", {json.dumps(SCRIPT)}]\n'
            f'  labels: {{{IMAGE_LABEL}: "yes"}}'
        )
        spec = SPEC.format(
            app=DOCKER_APP,
            image=image,
            health="/healthz.txt",
            runtime="docker",
            port=port,
            extra="    network: host",
            steps=steps,
        )
        (root / "castiron.yaml").write_text(spec)
        project = Project(root, port, _env(root))
        made.append(project)
        return project

    yield _make
    for project in made:
        reap_home(project.home)
    remove()
    for image in docker_engine.images.list(filters={"label": IMAGE_LABEL}):
        with contextlib.suppress(Exception):
            docker_engine.images.remove(image.id, force=True)


def _docker_containers(docker_engine: Any) -> set[str]:
    found = docker_engine.containers.list(all=True, filters={"label": f"castiron.app={DOCKER_APP}"})
    return {c.labels.get("castiron.release", "") for c in found}


@pytest.mark.docker
def test_docker_bad_release_is_aborted_and_leaves_no_container(
    docker_project: Factory, docker_engine: Any
) -> None:
    project = docker_project(LOCAL_STEPS)
    check_bad_release_is_aborted_at_the_first_step(project)
    releases, _ = instances(project)
    assert _docker_containers(docker_engine) == releases


@pytest.mark.docker
def test_docker_good_release_reaches_all_traffic(
    docker_project: Factory, docker_engine: Any
) -> None:
    project = docker_project(LOCAL_STEPS)
    check_good_release_reaches_all_traffic(project)
    assert len(_docker_containers(docker_engine)) == 2  # the new release and the warm one
