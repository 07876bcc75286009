"""Fixtures for the agent's tests: settings for a fresh home, a running agent, a tiny web app.

Every process a test starts (agents, fd keepers, instances) is killed by pid or session in a
finalizer, so the suite never leaks processes, whatever the test did.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from castiron.agent.client import AgentClient
from castiron.agent.lifecycle import agent_pid, ensure_agent
from castiron.agent.supervisor import process_start_time
from castiron.ports import free_port
from castiron.settings import Settings, load_settings
from testkit import wait_for

APP = textwrap.dedent(
    """
    import http.server, os, signal, sys

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = (os.environ.get("INSTANCE", "?") + "\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            print("request", fmt % args, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    print("listening on", os.environ["PORT"], flush=True)
    server.serve_forever()
    """
)


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def reap_home(home: Path) -> None:
    """Kill every process a test left behind for ``home``: agent, fd keeper, instances."""
    agent_dir = home / "agent"
    settings = load_settings({}, home=home)
    pid = agent_pid(settings)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        keeper = int((agent_dir / "fdkeeper.pid").read_text())
        if "castiron.agent.fdkeeper" in _cmdline(keeper):
            os.kill(keeper, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        records = json.loads((agent_dir / "instances.json").read_text())["instances"]
        for record in records:
            with contextlib.suppress(KeyError, TypeError, ProcessLookupError, PermissionError):
                if process_start_time(record["pid"]) == record["start_time"]:
                    os.killpg(record["pid"], signal.SIGKILL)


@pytest.fixture
def settings(home: Path) -> Iterator[Settings]:
    """Settings for a fresh home; whatever runs for it is killed afterwards."""
    try:
        yield load_settings({}, home=home)
    finally:
        reap_home(home)


@pytest.fixture
def agent(settings: Settings) -> AgentClient:
    """A running agent (background, own session) for ``settings.home``."""
    return ensure_agent(settings)


@pytest.fixture(scope="session")
def app_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HTTP server that answers every GET with its $INSTANCE, on $PORT."""
    path = tmp_path_factory.mktemp("app") / "app.py"
    path.write_text(APP)
    return path


@pytest.fixture
def python() -> str:
    """The Python interpreter that runs instance scripts."""
    return sys.executable


@pytest.fixture
def helpers() -> type[Helpers]:
    """Polling and port helpers (a namespace, so test modules need not import conftest)."""
    return Helpers


class Helpers:
    """Small helpers shared by the agent's tests."""

    free_port = staticmethod(free_port)
    wait_for = staticmethod(wait_for)
    port_open = staticmethod(port_open)
