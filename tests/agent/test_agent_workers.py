"""The agent's builtin router in worker processes: a killed worker is replaced without a
refused connection, and workers never outlive their agent."""

from __future__ import annotations

import http.client
import os
import signal
import threading
from pathlib import Path
from typing import Any

from test_agent_restart import _serve_two, get, kill_agent

from castiron.agent.client import AgentClient
from castiron.agent.lifecycle import agent_pid, ensure_agent, socket_path
from castiron.settings import Settings
from castiron.traffic.workers import default_workers


def workers_of(agent: int) -> list[int]:
    """Pids of the router workers whose parent is ``agent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == agent and b"castiron.traffic.worker" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _running(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())  # a zombie's is empty
    except OSError:
        return False


def test_the_agent_replaces_a_killed_router_worker_and_refuses_no_connection(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    listen, _ = _serve_two(agent, app_script, helpers)
    pid = agent_pid(settings)
    assert pid is not None
    assert get(listen) in (b"web-1\n", b"web-2\n")
    workers = workers_of(pid)
    assert len(workers) == default_workers()
    refused: list[str] = []
    served = 0
    stop = threading.Event()

    def connect() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=30)
                conn.request("GET", "/", headers={"Connection": "close"})
                conn.getresponse().read()
                conn.close()
                served += 1
            except ConnectionRefusedError as exc:
                refused.append(str(exc))
            except (OSError, http.client.HTTPException):
                pass  # accepted by the killed worker: lost with it, but never refused

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    try:
        helpers.wait_for(lambda: served >= 5, what="traffic")
        os.kill(workers[0], signal.SIGKILL)
        helpers.wait_for(
            lambda: len(workers_of(pid)) == len(workers) and workers[0] not in workers_of(pid),
            what="a replacement worker",
        )
        now = served
        helpers.wait_for(lambda: served >= now + 10, what="traffic after the replacement")
    finally:
        stop.set()
        thread.join(30)
    assert refused == []


def test_router_workers_stop_with_a_killed_agent_and_the_next_agent_starts_its_own(
    settings: Settings, agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    listen, _ = _serve_two(agent, app_script, helpers)
    pid = agent_pid(settings)
    assert pid is not None
    assert get(listen) in (b"web-1\n", b"web-2\n")
    old = workers_of(pid)
    assert old
    kill_agent(settings)
    # orphaned workers would serve routes no agent controls any more: they exit
    helpers.wait_for(lambda: not any(_running(w) for w in old), what="the workers' exit")
    restarted = ensure_agent(settings)
    assert get(listen) in (b"web-1\n", b"web-2\n")
    new_pid = agent_pid(settings)
    assert new_pid is not None and len(workers_of(new_pid)) == len(old)
    assert restarted.status().inherited_listeners == (f"127.0.0.1:{listen}",)


def test_agent_start_takes_the_number_of_router_workers(
    settings: Settings, run_cli: Any, app_script: Path, helpers: Any
) -> None:
    bad = run_cli("agent", "start", "--router-workers", "300")
    assert bad.exit_code == 2
    assert "Invalid value for '--router-workers'" in bad.stderr
    result = run_cli("agent", "start", "--router-workers", "1")
    assert result.exit_code == 0, result.stderr
    pid = agent_pid(settings)
    assert pid is not None
    listen, _ = _serve_two(AgentClient(socket_path(settings)), app_script, helpers)
    assert get(listen) in (b"web-1\n", b"web-2\n")
    assert len(workers_of(pid)) == 1
