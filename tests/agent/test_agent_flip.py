"""``POST /v1/routes/{env}/flip``: one request that checks warm backends and swaps the route."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from castiron.agent.client import AgentClient, SpawnRequest
from castiron.errors import AgentError
from castiron.model import HealthCheck

HTTP = HealthCheck(kind="http", target="/healthz", timeout=2.0)


def _spawn(agent: AgentClient, app_script: Path, helpers: Any, name: str, release: str) -> str:
    port = helpers.free_port()
    agent.spawn(
        SpawnRequest(
            id=name,
            environment="staging",
            release=release,
            argv=(sys.executable, str(app_script)),
            env={"PORT": str(port), "INSTANCE": name},
            address=f"127.0.0.1:{port}",
        )
    )
    helpers.wait_for(lambda: helpers.port_open(port), what=name)
    return f"127.0.0.1:{port}"


def _route(listen: str, release: str, backends: dict[str, str]) -> dict[str, Any]:
    return {
        "environment": "staging",
        "listen": listen,
        "stable": {
            "release": release,
            "backends": [{"id": i, "address": a} for i, a in backends.items()],
        },
    }


def _get(listen: str) -> bytes:
    with urllib.request.urlopen(f"http://{listen}/", timeout=10) as response:
        body: bytes = response.read()
        return body


@pytest.fixture
def serving(agent: AgentClient, app_script: Path, helpers: Any) -> tuple[str, str]:
    """Release r2 served at the returned listen address; r1's instance is up but unrouted."""
    old = _spawn(agent, app_script, helpers, "web-1", "r1")
    new = _spawn(agent, app_script, helpers, "web-2", "r2")
    listen = f"127.0.0.1:{helpers.free_port()}"
    agent.put_route("staging", _route(listen, "r2", {"web-2": new}))
    assert _get(listen) == b"web-2\n"
    return listen, old


def test_flip_checks_then_swaps_and_returns_the_previous_route(
    agent: AgentClient, serving: tuple[str, str]
) -> None:
    listen, old = serving
    route = _route(listen, "r1", {"web-1": old})
    answer = agent.flip_route("staging", route, expect="r2", check=HTTP, env={})
    assert answer["flipped"] is True and answer["reason"] == ""
    assert answer["previous"]["stable"]["release"] == "r2"
    assert _get(listen) == b"web-1\n"
    assert agent.route("staging")["stable"]["release"] == "r1"


@pytest.mark.parametrize("case", ["stale-expectation", "dead-backend"])
def test_a_refused_flip_changes_nothing(
    agent: AgentClient, serving: tuple[str, str], helpers: Any, case: str
) -> None:
    listen, old = serving
    if case == "dead-backend":
        backends = {"web-1": old, "web-9": f"127.0.0.1:{helpers.free_port()}"}
        expect = "r2"
    else:
        backends = {"web-1": old}
        expect = "r0"
    answer = agent.flip_route(
        "staging", _route(listen, "r1", backends), expect=expect, check=HTTP, env={}
    )
    assert answer["flipped"] is False
    assert ("web-9:" in answer["reason"]) == (case == "dead-backend")
    assert ("expected r0" in answer["reason"]) == (case == "stale-expectation")
    assert agent.route("staging")["stable"]["release"] == "r2"
    assert _get(listen) == b"web-2\n"


def test_a_flip_needs_a_stable_set_and_no_canary(agent: AgentClient) -> None:
    with pytest.raises(AgentError, match=r"body\.route: a flip needs"):
        agent.flip_route(
            "staging",
            {"environment": "staging", "listen": "127.0.0.1:1"},
            expect=None,
            check=HTTP,
            env={},
        )
