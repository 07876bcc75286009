"""Helpers for tests of ``castiron serve``: the server as a real process, HTTP calls with a
token, and a webhook receiver on loopback."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from castiron.ports import free_port
from testkit import wait_for

from .conftest import Project


@dataclass
class Answer:
    """An HTTP response: status, headers and body (parsed as JSON when it is JSON)."""

    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self) -> Any:
        return json.loads(self.text)


def call(
    port: int,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Answer:
    """One HTTP request to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return Answer(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read().decode(),
        )
    finally:
        conn.close()


@dataclass
class Served:
    """A running ``castiron serve`` of a project."""

    project: Project
    port: int
    process: subprocess.Popen[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Answer:
        return call(self.port, method, path, token, **kw)


@contextlib.contextmanager
def serving(
    project: Project, *args: str, extra: dict[str, str] | None = None
) -> Iterator[Served]:
    """``castiron serve`` on a free port for ``project`` until the block ends."""
    port = free_port()
    process = project.start(
        "serve", "--listen", f"127.0.0.1:{port}", "--event-interval", "0.1", *args, extra=extra
    )
    served = Served(project, port, process)
    try:

        def up() -> bool:
            if process.poll() is not None:
                _out, err = process.communicate()
                raise AssertionError(f"castiron serve exited {process.returncode}: {err}")
            return served.call("GET", "/healthz").status == 200

        wait_for(up, timeout=30, what="castiron serve")
        yield served
    finally:
        process.terminate()
        try:
            process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)


def token(project: Project, name: str, role: str) -> str:
    """Create an API token and return its secret."""
    return str(project.json("token", "create", name, "--role", role)["token"])


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on loopback; answers 500 to the first ``fail_first`` requests."""

    fail_first: int = 0
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    def __enter__(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                outer.attempts += 1
                if outer.attempts <= outer.fail_first:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                outer.received.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def events(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.received if r.path == path]
