"""``castiron agent unit`` prints a hardened Type=notify unit, and the agent speaks the notify
protocol: READY=1 once it serves, WATCHDOG=1 pings while it runs, STOPPING=1 when it stops —
checked against a datagram socket the test listens on, as systemd would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from castiron.agent.client import AgentClient
from castiron.agent.lifecycle import socket_path
from castiron.agent.notify import Notifier
from castiron.agent.unit import service_unit
from castiron.settings import Settings, load_settings


def test_the_unit_is_hardened_and_runs_the_agent_with_notify(
    settings: Settings, run_cli: Any
) -> None:
    result = run_cli("agent", "unit", "--user", "deploy", "--watchdog", "20")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    home = settings.home
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "User=deploy",
        f"Environment=CASTIRON_HOME={home}",
        f"ExecStart={sys.executable} -m castiron.agent.daemon --home {home} --router builtin",
        "WatchdogSec=20s",
        "KillMode=process",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ReadWritePaths={home}",
        "UMask=0077",
        "WantedBy=multi-user.target",
    ):
        assert line in lines, line
    assert any(line.startswith("ProtectHome=") for line in lines)
    assert any(line.startswith("PrivateTmp=") for line in lines)
    data = json.loads(run_cli("agent", "unit", "--json").stdout)
    assert data["name"] == "castiron-agent.service" and "Type=notify" in data["unit"]


@pytest.mark.parametrize(
    ("home", "python", "protect_home", "private_tmp"),
    [
        ("/srv/app/.castiron", "/usr/bin/python3", "ProtectHome=yes", "PrivateTmp=yes"),
        ("/home/d/.castiron", "/usr/bin/python3", "ProtectHome=read-only", "PrivateTmp=yes"),
        ("/srv/app/.castiron", "/root/venv/bin/python", "ProtectHome=read-only", "PrivateTmp=yes"),
        ("/tmp/x/.castiron", "/usr/bin/python3", "ProtectHome=yes", "PrivateTmp=no"),
    ],
)  # fmt: skip
def test_protect_home_and_private_tmp_never_hide_the_home_or_python(
    home: str, python: str, protect_home: str, private_tmp: str
) -> None:
    text = service_unit(load_settings({}, home=Path(home)), user="deploy", executable=python)
    lines = text.splitlines()
    assert protect_home in lines and private_tmp in lines


def test_unit_words_are_quoted_for_systemd() -> None:
    text = service_unit(
        load_settings({}, home=Path("/srv/my app/50%")), user="deploy", executable="/usr/bin/py"
    )
    assert 'ExecStart=/usr/bin/py -m castiron.agent.daemon --home "/srv/my app/50%%"' in text
    assert 'ReadWritePaths="/srv/my app/50%%"' in text


def test_notifier_reads_the_service_managers_environment() -> None:
    assert Notifier.from_environ({}, 42) == Notifier(None, None)
    given = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "4000000"}
    assert Notifier.from_environ(given, 42) == Notifier("@sd", 2.0)
    assert Notifier.from_environ({**given, "WATCHDOG_PID": "7"}, 42).watchdog is None
    assert Notifier.from_environ({**given, "WATCHDOG_PID": "42"}, 42).watchdog == 2.0
    assert not Notifier().ready("x")  # nobody listens: nothing sent, nothing raised


def test_notifier_sends_to_an_abstract_socket() -> None:
    name = f"castiron-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier(f"@{name}").send(status="hello")
        assert sock.recv(4096) == b"STATUS=hello\n"


def receive(sock: socket.socket, deadline: float) -> dict[str, str]:
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if line)


def test_the_agent_reports_ready_watchdog_and_stopping(settings: Settings) -> None:
    notify = settings.home.parent / "notify.sock"
    settings.home.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "NOTIFY_SOCKET": str(notify),
            "WATCHDOG_USEC": "200000",  # a ping every 0.1 s
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "castiron.agent.daemon", "--home", str(settings.home)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 30
            first = receive(sock, deadline)
            assert first["READY"] == "1"
            assert first["MAINPID"] == str(proc.pid)
            assert first["STATUS"] == f"ready on {settings.agent_path / 'agent.sock'}"
            # Ready means ready: the control API answers now.
            assert AgentClient(socket_path(settings)).health()
            pings = [receive(sock, deadline) for _ in range(3)]
            assert pings == [{"WATCHDOG": "1"}] * 3
            proc.send_signal(signal.SIGTERM)
            while (message := receive(sock, deadline)).get("WATCHDOG") == "1":
                pass
            assert message == {"STOPPING": "1", "STATUS": "stopping"}
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
