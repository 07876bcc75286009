"""The bundled example: one source of truth, a valid spec, and an app that serves and stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from castiron.ports import free_port
from castiron.spec.load import load_spec

ROOT = Path(__file__).resolve().parents[2]
PACKAGED = ROOT / "src" / "castiron" / "examples" / "hello"
EXAMPLE = ROOT / "examples" / "hello"


def _tree(base: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_examples_hello_is_the_package_data() -> None:
    assert EXAMPLE.is_symlink()
    assert EXAMPLE.resolve() == PACKAGED.resolve()
    assert _tree(EXAMPLE) == _tree(PACKAGED)
    assert {"castiron.yaml", "app/server.py"} <= _tree(PACKAGED).keys()


def test_example_spec_is_valid() -> None:
    loaded = load_spec(EXAMPLE / "castiron.yaml", {"APP_VERSION": "1.2.3"})
    spec = loaded.spec
    assert spec.app == "hello"
    assert spec.image.entrypoint == ("python3", "server.py")
    assert spec.image.workdir == "/app"
    assert spec.service.health.http == "/healthz"
    assert spec.service.env["APP_VERSION"] == "1.2.3"
    staging, production = spec.environments["staging"], spec.environments["production"]
    assert (staging.runtime, staging.listen) == ("local", "127.0.0.1:8080")
    assert production.promote_from == "staging"
    assert production.policy.soak == 60.0
    assert loaded.base_dir == EXAMPLE.absolute()
    assert (loaded.base_dir / spec.image.context / "server.py").is_file()


@pytest.fixture
def hello_server() -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PORT": str(port),
        "APP_VERSION": "7.7.7",
        "GREETING": "Hi there",
    }
    proc = subprocess.Popen(
        [sys.executable, "server.py"],
        cwd=PACKAGED / "app",
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # written once the socket is listening
        assert line == f"hello listening on 127.0.0.1:{port}\n"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_hello_serves_and_stops_on_sigterm(hello_server: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = hello_server
    assert _get(port, "/") == (200, "Hi there! (version 7.7.7)\n")
    assert _get(port, "/healthz") == (200, "ok\n")
    assert _get(port, "/version") == (200, '{"version": "7.7.7"}\n')
    assert _get(port, "/nope")[0] == 404
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert proc.stderr is not None
    assert proc.stderr.read().endswith("hello stopped\n")


def _responses(port: int, requests: list[bytes]) -> list[bytes]:
    """Send each request on one connection, reading its response before the next is sent."""
    import http.client

    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for raw in requests:
            sock.sendall(raw)
            resp = http.client.HTTPResponse(sock)
            try:
                resp.begin()
                out.append(resp.read())
            finally:
                resp.close()
    return out


def test_hello_reads_request_bodies(hello_server: tuple[subprocess.Popen[str], int]) -> None:
    _, port = hello_server
    smuggled = b"GET /version HTTP/1.1\r\nX-Ignore: "
    first = b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
        len(smuggled),
        smuggled,
    )
    second = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    # the body is read and ignored: the next request on the connection is /healthz
    assert _responses(port, [first, second]) == [b"Hi there! (version 7.7.7)\n", b"ok\n"]
