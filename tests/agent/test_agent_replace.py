"""Replacement of instances that exit by themselves: new id, new port, health-gated, routed;
never for an instance stopped on request; and what an agent restart does to it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from castiron.agent.client import AgentClient, AgentEvent, SpawnRequest
from castiron.agent.lifecycle import agent_pid, start_agent
from castiron.agent.replacement import REQUESTS_NAME
from castiron.model import HealthCheck
from castiron.settings import Settings
from castiron.traffic.base import Backend, BackendSet, RouteConfig

SECRET = "hunter2-never-on-disk"


def _request(
    app_script: Path, python: str, port: int, instance_id: str, **extra: Any
) -> SpawnRequest:
    env = {"PORT": str(port), "INSTANCE": instance_id, **extra.pop("env", {})}
    return SpawnRequest(
        id=instance_id,
        environment="web",
        release="rel-1",
        argv=(python, str(app_script)),
        env=env,
        address=f"127.0.0.1:{port}",
        public_env=tuple(sorted(k for k in env if k != "TOKEN")),
        replace=True,
        health=HealthCheck(kind="http", target="/", interval=0.1, timeout=2.0),
        **extra,
    )


def _event(agent: AgentClient, since: int, kind: str) -> AgentEvent | None:
    return next((e for e in agent.events(since) if e.kind == kind), None)


def test_replacement_gets_a_new_id_port_and_the_route(
    agent: AgentClient, app_script: Path, python: str, helpers: Any, tmp_path: Path
) -> None:
    port = helpers.free_port()
    instance_dir = tmp_path / "instances" / "web-1"
    first = agent.spawn(
        _request(
            app_script,
            python,
            port,
            "web-1",
            env={"SCRATCH": str(instance_dir / "tmp")},
            instance_dir=str(instance_dir),
            instance_subdirs=("tmp",),
        )
    )
    helpers.wait_for(lambda: helpers.port_open(port), what="web-1 to listen")
    assert (instance_dir / "tmp").is_dir()
    listen = f"127.0.0.1:{helpers.free_port()}"
    agent.put_route(
        "web",
        RouteConfig(
            environment="web",
            listen=listen,
            stable=BackendSet("rel-1", (Backend("web-1", first.address),)),
            drain_timeout=1.0,
        ),
    )
    since = agent.events()[-1].seq
    os.kill(first.pid, signal.SIGKILL)
    helpers.wait_for(
        lambda: _event(agent, since, "instance-replaced"), timeout=60, what="the replacement"
    )
    event = _event(agent, since, "instance-replaced")
    assert event is not None and event.instance == "web-1" and event.replaced_by == "web-1.r1"
    assert event.exit_code == -signal.SIGKILL
    new = agent.instance("web-1.r1")
    assert new.replaces == "web-1" and new.state == "running"
    assert new.address != first.address
    assert new.instance_dir == str(tmp_path / "instances" / "web-1.r1")
    assert new.env_values["SCRATCH"] == str(tmp_path / "instances" / "web-1.r1" / "tmp")
    assert Path(new.instance_dir, "tmp").is_dir()
    backends = agent.route("web")["stable"]["backends"]
    assert backends == [{"id": "web-1.r1", "address": new.address}]
    # The dead one left the route before the new one came in; the route never pointed at a
    # process that was not healthy.
    kinds = [e.kind for e in agent.events(since)]
    assert kinds.index("instance-exited") < kinds.index("instance-started")
    assert kinds[-2:] == ["route-applied", "instance-replaced"]


def test_stopping_on_request_never_replaces(
    agent: AgentClient, app_script: Path, python: str, helpers: Any
) -> None:
    port = helpers.free_port()
    agent.spawn(_request(app_script, python, port, "stop-1"))
    helpers.wait_for(lambda: helpers.port_open(port), what="stop-1 to listen")
    since = agent.events()[-1].seq
    agent.stop_instance("stop-1", grace=5.0)
    assert [e.kind for e in agent.events(since)] == ["instance-exited", "instance-stopped"]
    assert agent.instances() == []


def test_stopping_a_replaced_instance_stops_its_replacement(
    agent: AgentClient, app_script: Path, python: str, helpers: Any
) -> None:
    # The engine knows the original id only: destroying it must not leave the agent's
    # replacement running unrecorded.
    port = helpers.free_port()
    first = agent.spawn(_request(app_script, python, port, "gone-1"))
    helpers.wait_for(lambda: helpers.port_open(port), what="gone-1 to listen")
    since = agent.events()[-1].seq
    os.kill(first.pid, signal.SIGKILL)
    started = helpers.wait_for(
        lambda: next((e for e in agent.events(since) if e.kind == "instance-started"), None),
        timeout=60,
        what="the replacement to start",
    )
    assert started.instance == "gone-1.r1"

    agent.stop_instance("gone-1", grace=5.0)

    assert [r.id for r in agent.instances() if r.state == "running"] == []
    stopped = [e.instance for e in agent.events(since) if e.kind == "instance-stopped"]
    assert stopped == ["gone-1", "gone-1.r1"]


def test_an_unhealthy_replacement_is_retried_with_backoff(
    settings: Settings, agent: AgentClient, python: str, helpers: Any, tmp_path: Path
) -> None:
    # Serves once (so it starts), then every replacement exits at once: never healthy.
    flag = tmp_path / "served-once"
    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys, time\n"
        f"flag = {str(flag)!r}\n"
        "if os.path.exists(flag):\n"
        "    sys.exit(3)\n"
        "open(flag, 'w').close()\n"
        "time.sleep(600)\n"
    )
    port = helpers.free_port()
    request = SpawnRequest(
        id="flaky-1",
        environment="web",
        release="rel-1",
        argv=(python, str(script)),
        env={"PORT": str(port)},
        address=f"127.0.0.1:{port}",
        replace=True,
    )
    first = agent.spawn(request)
    helpers.wait_for(flag.exists, what="the first run")
    since = agent.events()[-1].seq
    os.kill(first.pid, signal.SIGKILL)
    # Two replacements that exit at once, each followed by the next (after 1 s, then 2 s).
    helpers.wait_for(
        lambda: (
            [e.instance for e in agent.events(since) if e.kind == "instance-exited"][:3]
            == ["flaky-1", "flaky-1.r1", "flaky-1.r2"]
        ),
        timeout=60,
        what="two short-lived replacements",
    )
    failed = [e for e in agent.events(since) if e.kind == "instance-replace-failed"]
    assert failed and "exited before it became healthy" in failed[0].detail
    agent.stop_instance("flaky-1", grace=1.0)  # and its replacements with it
    assert [r.id for r in agent.instances() if r.state == "running"] == []


def test_after_an_agent_restart_secrets_block_replacement(
    settings: Settings, agent: AgentClient, app_script: Path, python: str, helpers: Any
) -> None:
    with_secret = helpers.free_port()
    without = helpers.free_port()
    agent.spawn(_request(app_script, python, with_secret, "sec-1", env={"TOKEN": SECRET}))
    agent.spawn(_request(app_script, python, without, "plain-1"))
    for port in (with_secret, without):
        helpers.wait_for(lambda p=port: helpers.port_open(p), what=f"port {port}")
    saved = json.loads((settings.agent_path / REQUESTS_NAME).read_text())["requests"]
    assert saved["sec-1"]["complete"] is False
    assert "TOKEN" not in saved["sec-1"]["request"]["env"]
    assert saved["plain-1"]["complete"] is True
    for path in settings.agent_path.iterdir():
        if path.is_file() and path.suffix != ".log":
            assert SECRET.encode() not in path.read_bytes(), path

    # The agent dies; both instances die while no agent runs; a new agent starts.
    pids = {r.id: r.pid for r in agent.instances()}
    os.kill(int((settings.agent_path / "agent.pid").read_text()), signal.SIGKILL)
    helpers.wait_for(lambda: agent_pid(settings) is None, what="the agent to die")
    for pid in pids.values():
        os.killpg(pid, signal.SIGKILL)
    start_agent(settings)
    helpers.wait_for(
        lambda: _event(agent, 0, "instance-replaced"), timeout=60, what="plain-1's replacement"
    )
    replaced = _event(agent, 0, "instance-replaced")
    assert replaced is not None and replaced.instance == "plain-1"
    unreplaceable = _event(agent, 0, "instance-unreplaceable")
    assert unreplaceable is not None and unreplaceable.instance == "sec-1"
    assert "secret" in unreplaceable.detail
    assert helpers.port_open(int(agent.instance("plain-1.r1").address.rpartition(":")[2]))
