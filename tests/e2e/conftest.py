"""End-to-end fixtures: a project on disk, the real CLI in subprocesses, the local runtime,
a client load through the router — and a finalizer that kills whatever a test started.

The app is a tiny stdlib HTTP server: ``/`` answers ``$VERSION``, ``/healthz`` answers 200
unless ``$HEALTHY`` is ``0`` (then 503, after printing a line the failure report must show).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from castiron.engine.journal import STEPS
from castiron.ports import free_port
from testkit import wait_for

APP = textwrap.dedent(
    """
    import os, signal, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/healthz":
                ok = os.environ.get("HEALTHY", "1") != "0"
                if not ok:
                    print("healthz: refusing, HEALTHY=0", flush=True)
                body, status = (b"ok\\n", 200) if ok else (b"sick\\n", 503)
            else:
                body, status = (os.environ.get("VERSION", "?") + "\\n").encode(), 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("app listening on", os.environ["PORT"], flush=True)
    server.serve_forever(poll_interval=0.1)
    """
)

SPEC = """
app: e2e
image:
  context: ./app
  entrypoint: ["python3", "app.py"]
service:
  port: 8000
  replicas: {replicas}
  health: {{http: /healthz, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
    HEALTHY: ${{HEALTHY:-1}}
environments:
  staging:
    listen: 127.0.0.1:{port}
    deploy_timeout: {deploy_timeout}
    drain_timeout: 2s
    keep_warm: 10m
    isolation: none
"""


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` from 127.0.0.1:``port``; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@dataclass
class Load:
    """Sequential GETs through the router from a thread, counting failures (bounded)."""

    port: int
    max_requests: int = 20000
    max_seconds: float = 120.0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    bodies: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while not self._stop.is_set() and sent < self.max_requests and time.monotonic() < deadline:
            sent += 1
            try:
                status, body = get(self.port)
            except OSError as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            else:
                if status == 200:
                    self.ok += 1
                    self.bodies.add(body.strip())
                else:
                    self.failed += 1
                    self.errors.append(f"HTTP {status}")
            time.sleep(0.005)

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@dataclass
class Project:
    """A project directory with its own CASTIRON_HOME, driven through the real CLI."""

    root: Path
    port: int
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.root / ".castiron"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "castiron.cli.main", *args]

    def run(
        self, *args: str, extra: dict[str, str] | None = None, timeout: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``castiron ARGS`` to completion."""
        return subprocess.run(
            self.argv(*args),
            cwd=self.root,
            env={**self.env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start ``castiron ARGS`` in the background."""
        return subprocess.Popen(
            self.argv(*args),
            cwd=self.root,
            env={**self.env, **(extra or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str, extra: dict[str, str] | None = None) -> str:
        """Run ``castiron ARGS`` and require exit 0; returns stdout."""
        proc = self.run(*args, extra=extra)
        assert proc.returncode == 0, f"castiron {' '.join(args)}: {proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def json(self, *args: str, extra: dict[str, str] | None = None) -> dict[str, object]:
        return dict(json.loads(self.ok(*args, "--json", extra=extra)))

    def bake(self, tag: str) -> None:
        (self.root / "app" / "tag.txt").write_text(tag + "\n")
        self.ok("bake", "--tag", tag)

    def deploy(self, tag: str, version: str, **extra: str) -> dict[str, object]:
        return self.json(
            "deploy", "staging", "--image", tag, "--yes", extra={"VERSION": version, **extra}
        )

    def served(self) -> str:
        return get(self.port)[1].strip()

    def status(self) -> dict[str, object]:
        data = self.json("status", "staging")
        envs = data["environments"]
        assert isinstance(envs, list)
        return dict(envs[0])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def reap_home(home: Path) -> None:
    """Kill every process left for ``home``: agent, fd keeper, instances, data plane."""
    agent_dir = home / "agent"
    with contextlib.suppress(OSError, ValueError):
        records = json.loads((agent_dir / "instances.json").read_text())["instances"]
        for record in records:
            with contextlib.suppress(KeyError, TypeError, ProcessLookupError, PermissionError):
                os.killpg(int(record["pid"]), signal.SIGKILL)
    for name in ("agent.pid", "fdkeeper.pid"):
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            pid = int((agent_dir / name).read_text())
            if "castiron" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
    # What outlives a killed agent by design (its HAProxy data plane, router workers) names a
    # path under the home on its command line.
    marker = str(agent_dir) + "/"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and marker in _cmdline(int(entry.name)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def project_env(root: Path, app_vars: tuple[str, ...] = ("VERSION", "HEALTHY")) -> dict[str, str]:
    """The environment a project's CLI runs with: this process's, without any castiron setting
    or the app variables tests set per command, plus the project's home and fixed identity."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_") and k not in app_vars
    }
    env.update(
        {
            "CASTIRON_HOME": str(root / ".castiron"),
            "CASTIRON_ACTOR": "e2e@test",
            "NO_COLOR": "1",
            "SOURCE_DATE_EPOCH": "1700000000",
        }
    )
    return env


@pytest.fixture
def make_project(tmp_path: Path) -> Iterator[Callable[..., Project]]:
    """Build a project (spec + app) on a free router port; everything is killed afterwards."""
    made: list[Project] = []

    def _make(replicas: int = 2, deploy_timeout: str = "20s") -> Project:
        root = tmp_path / f"project{len(made)}"
        (root / "app").mkdir(parents=True)
        (root / "app" / "app.py").write_text(APP)
        port = free_port()
        (root / "castiron.yaml").write_text(
            SPEC.format(replicas=replicas, port=port, deploy_timeout=deploy_timeout)
        )
        project = Project(root, port, project_env(root))
        made.append(project)
        return project

    yield _make
    for project in made:
        reap_home(project.home)


def kill_mid_deploy_and_recover(project: Project, step: str) -> dict[str, object]:
    """Deploy v1 ("one"), start deploying "two", SIGKILL the CLI where it pauses at journal
    ``step``, and let the next command (``status``) recover; check that the old or the new
    release served at every instant and after, and that history records the recovery.
    Returns the status after recovery (the caller checks its runtime for leaks)."""
    project.bake("v1")
    first = project.deploy("v1", "one")
    proc = project.start(
        "deploy", "staging", "--yes", extra={"VERSION": "two", "CASTIRON_TEST_PAUSE_AT": step}
    )
    try:
        wait_for(lambda: (project.home / f"paused-at-{step}").exists(), what=f"pause at {step}")
        # The environment serves the old or the new release at every instant.
        assert get(project.port)[1].strip() in ("one", "two")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    status = project.status()  # the next command recovers
    after_switch = STEPS.index(step) >= STEPS.index("switched")
    assert project.served() == ("two" if after_switch else "one")
    if not after_switch:
        assert status["release"] == first["release"]
    history = project.json("history", "staging")["deployments"]
    assert isinstance(history, list)
    assert history[0]["outcome"] == ("succeeded" if after_switch else "aborted")
    assert history[0]["recovered"] is True
    return status
