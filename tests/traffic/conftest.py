"""Router fixtures: an event loop in a background thread, backends, and one harness per plane.

Every router test runs against each data plane: the builtin proxy (with the httptools parser
and with the pure-Python parser) and a system HAProxy (marked ``haproxy``).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from castiron.ports import free_port
from castiron.traffic.base import (
    Backend,
    BackendSet,
    Limits,
    ReleaseCounters,
    RouteConfig,
    Router,
    Stickiness,
    Timeouts,
)
from castiron.traffic.proxy import BuiltinRouter
from castiron.traffic.workers import WorkerPoolRouter
from traffic.backends import HttpBackend

T = TypeVar("T")

PLANES = [
    "builtin",
    "builtin-py",
    "workers",
    pytest.param("haproxy", marks=pytest.mark.haproxy),
]


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


class LoopThread:
    """An asyncio loop running in a daemon thread; ``run`` submits a coroutine and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def _call() -> T:
            return fn()

        return self.run(_call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def bset(release: str, *backends: HttpBackend | str) -> BackendSet:
    items = []
    for i, b in enumerate(backends):
        address = b if isinstance(b, str) else b.address
        items.append(Backend(id=f"{release}-{i}", address=address))
    return BackendSet(release=release, backends=tuple(items))


class Harness:
    """One router on the background loop, with one environment listening on ``port``."""

    def __init__(self, kind: str, router: Router, lt: LoopThread) -> None:
        self.kind = kind
        self.router = router
        self.lt = lt
        self.env = "web"
        self.port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.access_dir: Path | None = None

    def config(
        self,
        stable: BackendSet | None,
        canary: BackendSet | None = None,
        weight: int = 0,
        sticky: Stickiness | None = None,
        drain_timeout: float = 10.0,
        timeouts: Timeouts | None = None,
        max_header_bytes: int = 65536,
        limits: Limits | None = None,
        access_log: bool = False,
    ) -> RouteConfig:
        return RouteConfig(
            environment=self.env,
            listen=self.listen,
            stable=stable,
            canary=canary,
            canary_weight=weight,
            sticky=sticky,
            drain_timeout=drain_timeout,
            timeouts=timeouts or Timeouts(connect=2, header_read=5, backend_response=30, idle=30),
            max_header_bytes=max_header_bytes,
            limits=limits or Limits(),
            access_log=access_log,
        )

    def apply(self, config: RouteConfig) -> None:
        self.lt.run(self.router.apply(config))

    def counters(self) -> dict[str, ReleaseCounters]:
        return {c.release: c for c in self.lt.call(lambda: self.router.counters(self.env))}

    def close(self) -> None:
        self.lt.run(self.router.close())


@pytest.fixture(params=PLANES)
def harness(
    request: pytest.FixtureRequest, loop_thread: LoopThread, tmp_path: Path
) -> Iterator[Harness]:
    kind: str = request.param
    router: Router
    access = tmp_path / "access"
    if kind == "builtin":
        router = BuiltinRouter(parser="httptools", access_log_dir=access)
    elif kind == "builtin-py":
        router = BuiltinRouter(parser="python", access_log_dir=access)
    elif kind == "workers":
        # the builtin router in two worker processes: every test also holds across workers
        router = WorkerPoolRouter(2, access_log_dir=access)
    else:
        binary = haproxy_binary()
        if binary is None:
            pytest.skip("haproxy is not installed")
        from castiron.traffic.haproxy import HaproxyRouter

        router = HaproxyRouter(tmp_path / "haproxy", haproxy_bin=binary, access_log_dir=access)
    h = Harness(kind, router, loop_thread)
    h.access_dir = access
    yield h
    h.close()


@pytest.fixture
def backends() -> Iterator[Callable[[str], HttpBackend]]:
    made: list[HttpBackend] = []

    def make(name: str) -> HttpBackend:
        b = HttpBackend(name)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
