"""Health probes against real sockets on loopback, and the tracker's judgement."""

from __future__ import annotations

import http.server
import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from castiron.health import (
    HealthTracker,
    ProbeResult,
    probe,
    probe_command,
    probe_http,
    probe_tcp,
)
from castiron.model import HealthCheck


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/healthz" else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_http_probe(server: str) -> None:
    assert probe_http(server, "/healthz", 2.0).ok
    bad = probe_http(server, "/broken", 2.0)
    assert not bad.ok and "503" in bad.detail


def test_http_probe_on_closed_port() -> None:
    assert not probe_http(_free_address(), "/healthz", 1.0).ok


def test_tcp_probe(server: str) -> None:
    assert probe_tcp(server, 1.0).ok
    assert not probe_tcp(_free_address(), 1.0).ok


def test_command_probe() -> None:
    assert probe_command([sys.executable, "-c", "pass"], 5.0).ok
    failed = probe_command([sys.executable, "-c", "import sys; sys.exit(3)"], 5.0)
    assert not failed.ok and "exited 3" in failed.detail
    assert not probe_command(["/nonexistent/probe"], 5.0).ok


def test_probe_dispatches_on_kind(server: str) -> None:
    check = HealthCheck("http", "/healthz", 1.0, 1.0, 1, 0.0)
    assert probe(check, server).ok
    cmd = HealthCheck("command", f'["{sys.executable}", "-c", "pass"]', 1.0, 5.0, 1, 0.0)
    assert probe(cmd, server).ok


def test_tracker_needs_consecutive_successes() -> None:
    tracker = HealthTracker(HealthCheck("http", "/", 1.0, 1.0, 2, 10.0), started_at=0.0)
    ok, bad = ProbeResult(True, "ok"), ProbeResult(False, "bad")
    assert not tracker.record(ok, 1.0)
    assert not tracker.record(bad, 2.0)
    assert not tracker.record(ok, 3.0)
    assert tracker.record(ok, 4.0)
    assert not tracker.record(bad, 20.0)
