"""Fixtures for the engine's tests: a spec and a baked image on disk, a fake runtime.

The engine runs against a real SQLite state store and a real image store, with
:class:`castiron.drivers.fake.FakeDriver` and :class:`castiron.traffic.controller.MemoryTraffic`
as runtime and router, a health prober steered by the instances' env (``SICK=1`` fails), and
a fake monotonic clock that ``sleep`` advances (so timeouts pass instantly), and a Prometheus
query API on loopback for canary analysis (:class:`FakePrometheus`).
"""

from __future__ import annotations

import json
import os
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from castiron.drivers.fake import FakeDriver
from castiron.engine.deploy import Engine
from castiron.engine.driftwatch import DriftWatches
from castiron.errors import UsageError
from castiron.health import ProbeResult
from castiron.images.build import BakeOptions, bake
from castiron.images.store import ImageStore
from castiron.model import HealthCheck, Instance
from castiron.spec.load import LoadedSpec, load_spec
from castiron.state.base import JsonObject, ManualClock, StateStore
from castiron.state.sqlite import open_state
from castiron.traffic.controller import MemoryTraffic

SPEC = textwrap.dedent(
    """
    app: hello
    image:
      context: ./app
      entrypoint: ["python3", "server.py"]
      env: {BAKED: "yes"}
    service:
      port: 8000
      replicas: 2
      health: {http: /healthz, interval: 100ms, start_period: 1s}
      env:
        APP_VERSION: ${APP_VERSION:-1}
        SICK: ${SICK:-0}
      secrets: {TOKEN: {env: HELLO_TOKEN}}
    environments:
      staging: {listen: 127.0.0.1:18080, deploy_timeout: 5s, keep_warm: 10m, drain_timeout: 1s}
      cold: {listen: 127.0.0.1:18081, keep_warm: 0s, drain_timeout: 1s}
      rolling:
        listen: 127.0.0.1:18082
        replicas: 3
        strategy: {type: rolling, batch: 1}
    """
)


class FakeTime:
    """A monotonic clock that only ``sleep`` moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)


class Crash(BaseException):
    """Stands for the process being killed: the engine does not catch it."""


@dataclass
class Recorder:
    """Observer that records steps and progress, and can crash at a step."""

    steps: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    crash_at: str | None = None

    def step(self, step: str, data: JsonObject) -> None:
        self.steps.append(step)
        if step == self.crash_at:
            raise Crash(step)

    def progress(self, message: str) -> None:
        self.lines.append(message)


def fake_prober(check: HealthCheck, address: str, env: Mapping[str, str]) -> ProbeResult:
    """Healthy unless the release's env says ``SICK=1``."""
    if env.get("SICK") == "1":
        return ProbeResult(False, f"GET {check.target}: 503 Service Unavailable")
    return ProbeResult(True, f"GET {check.target}: 200")


@dataclass
class World:
    """Everything an engine test needs, sharing one runtime and router across engines."""

    root: Path
    store: StateStore
    images: ImageStore
    driver: FakeDriver
    traffic: MemoryTraffic
    time: FakeTime
    clock: ManualClock
    environ: dict[str, str]
    digests: dict[str, str] = field(default_factory=dict)

    def spec(self) -> LoadedSpec:
        return load_spec(self.root / "castiron.yaml", self.environ)

    def bake(self, tag: str, greeting: str) -> str:
        """Bake the app with a distinct file content; returns the digest."""
        (self.root / "app" / "server.py").write_text(f"print({greeting!r})\n")
        loaded = self.spec()
        result = bake(
            loaded.spec.image,
            self.images,
            BakeOptions(
                context=self.root / "app",
                base_dir=self.root,
                tags=(tag,),
                source_date_epoch=1_700_000_000,
                environ={"PATH": os.environ.get("PATH", os.defpath)},
                app="hello",
                port=8000,
            ),
        )
        self.digests[tag] = result.digest
        return result.digest

    def engine(
        self,
        observer: Recorder | None = None,
        drift_watches: Callable[[], DriftWatches] | None = None,
    ) -> Engine:
        def driver_for(runtime: str) -> FakeDriver:
            if runtime != "local":
                raise UsageError(f"runtime {runtime!r} is not available yet")
            return self.driver

        def logs(instance: Instance) -> str:
            return f"booting {instance.id}\nerror: database unreachable\n"

        return Engine(
            store=self.store,
            images=self.images,
            driver_for=driver_for,
            traffic=lambda: self.traffic,
            environ=self.environ,
            observer=observer if observer is not None else Recorder(),
            instance_logs=logs,
            prober=fake_prober,
            monotonic=self.time.monotonic,
            sleep=self.time.sleep,
            drift_watches=drift_watches,
        )

    def deploy(self, environment: str, tag: str, observer: Recorder | None = None) -> object:
        engine = self.engine(observer)
        return engine.deploy(engine.resolve(self.spec(), environment, tag))


def baked_world(
    root: Path,
    spec: str,
    clock: ManualClock,
    *,
    driver: FakeDriver | None = None,
    traffic: MemoryTraffic | None = None,
    environ: dict[str, str] | None = None,
) -> World:
    """The project ``spec`` under ``root`` with two baked images (``v1``, ``v2``); by default a
    fake runtime and router (a test may put its own in their place)."""
    (root / "app").mkdir(parents=True)
    (root / "castiron.yaml").write_text(spec)
    store = open_state(root / ".castiron" / "state.db", actor="tester@testhost", clock=clock)
    w = World(
        root=root,
        store=store,
        images=ImageStore(root / ".castiron" / "images"),
        driver=driver if driver is not None else FakeDriver(name="local"),
        traffic=traffic if traffic is not None else MemoryTraffic(),
        time=FakeTime(),
        clock=clock,
        environ=environ if environ is not None else {"HELLO_TOKEN": "s3cret-value"},
    )
    w.bake("v1", "one")
    w.bake("v2", "two")
    return w


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A spec with two baked images (``v1``, ``v2``), a fake runtime and router."""
    w = baked_world(tmp_path / "project", SPEC, ManualClock())
    try:
        yield w
    finally:
        w.store.close()


# --- a Prometheus query API ----------------------------------------------------------------


@dataclass
class FakePrometheus:
    """A tiny Prometheus query API on loopback: answers each query from ``answers``."""

    answers: dict[str, Any]
    queries: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus({})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parsed = urlparse(self.path)
            query = parse_qs(parsed.query).get("query", [""])[0]
            fake.queries.append(query)
            answer = fake.answers.get(query)
            if parsed.path != "/api/v1/query" or answer is None:
                body, status = b'{"status":"error","error":"unknown query"}', 400
            else:
                body, status = json.dumps(answer).encode(), 200
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def vector(*values: float) -> dict[str, Any]:
    samples = [{"metric": {"i": str(i)}, "value": [1.0, str(v)]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": samples}}
