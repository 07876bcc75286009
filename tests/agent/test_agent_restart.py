"""An agent killed with SIGKILL and restarted: instances survive, listeners never refuse."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from castiron.agent.client import AgentClient, SpawnRequest
from castiron.agent.fdkeeper import FdKeeperClient
from castiron.agent.lifecycle import agent_pid, ensure_agent
from castiron.settings import Settings


def _serve_two(agent: AgentClient, app_script: Path, helpers: Any) -> tuple[int, list[int]]:
    ports = [helpers.free_port(), helpers.free_port()]
    for n, port in enumerate(ports, 1):
        agent.spawn(
            SpawnRequest(
                id=f"web-{n}",
                environment="staging",
                release="r1",
                argv=(sys.executable, str(app_script)),
                env={"PORT": str(port), "INSTANCE": f"web-{n}"},
                address=f"127.0.0.1:{port}",
            )
        )
    for port in ports:
        helpers.wait_for(lambda port=port: helpers.port_open(port), what=f"app on {port}")
    listen = helpers.free_port()
    agent.put_route(
        "staging",
        {
            "environment": "staging",
            "listen": f"127.0.0.1:{listen}",
            "stable": {
                "release": "r1",
                "backends": [
                    {"id": f"web-{n}", "address": f"127.0.0.1:{p}"} for n, p in enumerate(ports, 1)
                ],
            },
        },
    )
    return listen, ports


def get(port: int, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
        body: bytes = response.read()
    return body


def kill_agent(settings: Settings) -> None:
    pid = agent_pid(settings)
    assert pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while agent_pid(settings) is not None:
        assert time.monotonic() < deadline, "the agent did not die"
        time.sleep(0.01)


def test_sigkill_and_restart_keeps_instances_and_the_listener(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    listen, _ = _serve_two(agent, app_script, helpers)
    assert get(listen) in (b"web-1\n", b"web-2\n")
    before = {r.id: r.pid for r in agent.instances()}

    kill_agent(settings)
    # No agent now: the fd keeper still holds the listening socket, so the kernel accepts.
    with socket.create_connection(("127.0.0.1", listen), timeout=5):
        pass
    served: dict[str, object] = {}

    def client() -> None:
        try:
            served["body"] = get(listen, timeout=20)
        except OSError as exc:  # pragma: no cover - reported below
            served["error"] = exc

    waiting = threading.Thread(target=client)
    waiting.start()
    time.sleep(0.2)  # the request is in the backlog while no agent runs
    assert "body" not in served and "error" not in served

    restarted = ensure_agent(settings)
    waiting.join(20)
    assert served.get("body") in (b"web-1\n", b"web-2\n"), served

    status = restarted.status()
    assert status.inherited_listeners == (f"127.0.0.1:{listen}",)
    assert status.adopted_instances == 2 and status.running_instances == 2
    after = {r.id: r.pid for r in restarted.instances()}
    assert after == before
    assert all(r.adopted and r.state == "running" for r in restarted.instances())
    assert get(listen) in (b"web-1\n", b"web-2\n")
    kinds = [e.kind for e in restarted.events()]
    assert kinds.count("instance-adopted") == 2
    assert kinds[-1] == "agent-started"


def test_exit_of_an_adopted_instance_is_detected(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    _serve_two(agent, app_script, helpers)
    kill_agent(settings)
    restarted = ensure_agent(settings)
    last = restarted.events()[-1].seq
    victim = restarted.instance("web-1")
    os.kill(victim.pid, signal.SIGKILL)
    helpers.wait_for(lambda: restarted.instance("web-1").state == "exited", what="exit seen")
    (event,) = [e for e in restarted.events(since=last) if e.kind == "instance-exited"]
    assert event.instance == "web-1" and event.pid == victim.pid
    assert restarted.instance("web-2").state == "running"


def test_an_instance_that_died_while_no_agent_ran_is_recorded_as_lost(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    _serve_two(agent, app_script, helpers)
    victim = agent.instance("web-2")
    kill_agent(settings)
    os.killpg(victim.pid, signal.SIGKILL)
    helpers.wait_for(lambda: not Path(f"/proc/{victim.pid}/cmdline").read_bytes(), what="death")
    restarted = ensure_agent(settings)
    assert restarted.instance("web-2").state == "exited"
    assert restarted.instance("web-1").state == "running"
    lost = [e for e in restarted.events() if e.kind == "instance-lost"]
    assert [e.instance for e in lost] == ["web-2"]


def test_graceful_stop_closes_listeners_and_leaves_instances(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    from castiron.agent.lifecycle import stop_agent

    listen, ports = _serve_two(agent, app_script, helpers)
    pids = [r.pid for r in agent.instances()]
    assert stop_agent(settings) is not None
    assert not helpers.port_open(listen)  # routers closed, the keeper let the port go
    assert not FdKeeperClient(settings.agent_path).running()
    for pid, port in zip(pids, ports, strict=True):
        assert Path(f"/proc/{pid}").exists()
        assert helpers.port_open(port)
    # The next agent brings the recorded route back.
    ensure_agent(settings)
    assert get(listen) in (b"web-1\n", b"web-2\n")


def test_fd_keeper_hands_back_the_same_socket(tmp_path: Path) -> None:
    keeper = FdKeeperClient(tmp_path)
    listeners = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            listeners.append(sock)
            keeper.put(f"127.0.0.1:{sock.getsockname()[1]}", sock)
        names = keeper.names()
        assert sorted(names) == sorted(f"127.0.0.1:{s.getsockname()[1]}" for s in listeners)
        again = keeper.get(names[0])
        assert again is not None
        with again:
            assert again.getsockname()[1] == int(names[0].rsplit(":", 1)[1])
        assert keeper.get("127.0.0.1:1") is None
        for name in names:
            keeper.delete(name)
        assert not keeper.running()  # it exits after its last socket is deleted
    finally:
        keeper.quit()
        for sock in listeners:
            sock.close()
