"""``castiron agent ...`` end to end: start, status, stop, logs, run, one agent per home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from castiron.agent.client import AgentClient, SpawnRequest
from castiron.agent.lifecycle import agent_pid, daemon_argv, ensure_agent
from castiron.settings import Settings


def test_start_status_stop(settings: Settings, run_cli: Any, helpers: Any) -> None:
    result = run_cli("agent", "status", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["running"] is False
    assert run_cli("agent", "status").stdout == "agent not running\n"

    metrics = f"127.0.0.1:{helpers.free_port()}"
    result = run_cli("agent", "start", "--metrics", metrics, "--json")
    assert result.exit_code == 0, result.stderr
    started = json.loads(result.stdout)
    assert started["started"] is True and started["pid"] == agent_pid(settings)

    again = run_cli("agent", "start")
    assert again.exit_code == 0
    assert again.stdout == f"agent already running (pid {started['pid']})\n"

    status = json.loads(run_cli("agent", "status", "--json").stdout)
    assert status["running"] is True and status["pid"] == started["pid"]
    assert status["status"]["router"] == "builtin"
    assert status["status"]["metrics"] == metrics
    assert helpers.port_open(int(metrics.rsplit(":", 1)[1]))
    text = run_cli("agent", "status").stdout
    assert f"agent running (pid {started['pid']}" in text and "routes:    none" in text

    stopped = run_cli("agent", "stop")
    assert stopped.exit_code == 0
    assert stopped.stdout == f"agent stopped (pid {started['pid']})\n"
    assert agent_pid(settings) is None
    assert not (settings.agent_path / "agent.sock").exists()
    assert run_cli("agent", "stop").stdout == "agent not running\n"


def test_a_second_agent_for_the_same_home_is_refused(
    settings: Settings, agent: AgentClient
) -> None:
    first = agent.status().pid
    proc = subprocess.run(
        daemon_argv(settings), capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 1
    assert f"error: another agent already runs for {settings.home} (pid {first})" in proc.stderr
    assert agent.status().pid == first


def test_start_refuses_when_the_agent_cannot_start(settings: Settings, run_cli: Any) -> None:
    settings.agent_path.mkdir(parents=True)
    (settings.agent_path / "instances.json").write_text("{broken")
    result = run_cli("agent", "start", "--timeout", "20")
    assert result.exit_code == 1
    assert "error: the agent for" in result.stderr
    assert "instances.json: not a valid instance record file" in result.stderr


def test_logs_of_the_agent_and_of_an_instance(
    settings: Settings, agent: AgentClient, run_cli: Any, helpers: Any
) -> None:
    result = run_cli("agent", "logs", "-n", "5")
    assert result.exit_code == 0
    assert "ready on" in result.stdout
    agent.spawn(
        SpawnRequest(
            id="hello",
            environment="staging",
            release="r1",
            argv=(sys.executable, "-c", "print('hello from the instance')"),
        )
    )
    helpers.wait_for(lambda: agent.instance("hello").state == "exited", what="exit")
    result = run_cli("agent", "logs", "--instance", "hello")
    assert result.stdout == "hello from the instance\n"
    result = run_cli("agent", "logs", "--instance", "hello", "--follow")
    assert result.stdout == "hello from the instance\n"
    missing = run_cli("agent", "logs", "--instance", "nope")
    assert missing.exit_code == 2
    assert "no instance 'nope'" in missing.stderr


def test_run_in_the_foreground_stops_on_sigterm_and_leaves_instances(
    settings: Settings, home: Path, helpers: Any
) -> None:
    env = {**os.environ, "CASTIRON_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "castiron.cli.main", "agent", "run"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = AgentClient(settings.agent_path / "agent.sock")
        helpers.wait_for(client.health, what="the agent")
        assert client.status().pid == proc.pid  # exec'd: the CLI process is the agent
        record = client.spawn(
            SpawnRequest(
                id="sleeper",
                environment="staging",
                release="r1",
                argv=(sys.executable, "-c", "import time; time.sleep(60)"),
            )
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "agent stopped; instances left running: 1" in stderr
    assert Path(f"/proc/{record.pid}").exists()
    assert ensure_agent(settings).instance("sleeper").adopted
