"""The traffic controller conformance suite: ``MemoryTraffic`` and ``AgentTraffic`` (through a
real agent and its builtin router, with real HTTP backends) must behave the same."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from castiron.agent.lifecycle import agent_pid, ensure_agent
from castiron.errors import RouterError
from castiron.ports import free_port
from castiron.settings import load_settings
from castiron.traffic.controller import (
    AgentTraffic,
    MemoryTraffic,
    TrafficController,
    backend_set,
)

from .backends import HttpBackend


@pytest.fixture(params=["memory", "agent"])
def traffic(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TrafficController]:
    """Each controller implementation."""
    if request.param == "memory":
        yield MemoryTraffic()
        return
    settings = load_settings({}, home=tmp_path / "home")
    try:
        yield AgentTraffic(ensure_agent(settings))
    finally:
        pid = agent_pid(settings)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError, ProcessLookupError):
            os.kill(int((settings.agent_path / "fdkeeper.pid").read_text()), signal.SIGKILL)


@pytest.fixture
def two_backends() -> Iterator[tuple[HttpBackend, HttpBackend]]:
    a, b = HttpBackend("a"), HttpBackend("b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_switch_then_current_reports_the_routing(
    traffic: TrafficController, two_backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, b = two_backends
    listen = f"127.0.0.1:{free_port()}"
    assert traffic.current("staging") is None
    traffic.switch("staging", listen, backend_set("r1", [("i1", a.address)]), drain_timeout=1)
    routing = traffic.current("staging")
    assert routing is not None and routing.listen == listen
    assert routing.releases == ("r1",) and routing.backend_ids == {"i1"}
    traffic.switch(
        "staging",
        listen,
        backend_set("r1", [("i1", a.address)]),
        canary=backend_set("r2", [("i2", b.address)]),
        canary_weight=50,
        drain_timeout=1,
    )
    routing = traffic.current("staging")
    assert routing is not None
    assert routing.releases == ("r1", "r2") and routing.backend_ids == {"i1", "i2"}
    traffic.switch("staging", listen, backend_set("r2", [("i2", b.address)]), drain_timeout=1)
    routing = traffic.current("staging")
    assert routing is not None and routing.releases == ("r2",)


def test_remove_and_counters(
    traffic: TrafficController, two_backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = two_backends
    listen = f"127.0.0.1:{free_port()}"
    assert traffic.counters("staging") == []
    assert traffic.remove("staging") is False
    traffic.switch("staging", listen, backend_set("r1", [("i1", a.address)]), drain_timeout=1)
    assert all(c.requests == 0 for c in traffic.counters("staging"))
    assert traffic.remove("staging") is True
    assert traffic.current("staging") is None


def test_a_listen_address_in_use_is_a_router_error(
    traffic: TrafficController, two_backends: tuple[HttpBackend, HttpBackend]
) -> None:
    a, _ = two_backends
    listen = f"127.0.0.1:{free_port()}"
    traffic.switch("staging", listen, backend_set("r1", [("i1", a.address)]), drain_timeout=1)
    with pytest.raises(RouterError):
        traffic.switch("prod", listen, backend_set("r1", [("i1", a.address)]), drain_timeout=1)
