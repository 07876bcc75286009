"""Test backends: small real HTTP/1.1 servers on loopback that record what reached them."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.name = name
        self.records: list[dict[str, object]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.connections = 0

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a router closing its idle connections is not an error here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections += 1

    def _body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b""):
                        pass
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, 65536))
                    if not data:
                        raise ConnectionError("short chunk")
                    left -= len(data)
                    yield data
                self.rfile.read(2)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 65536))
                if not data:
                    raise ConnectionError("short body")
                left -= len(data)
                yield data

    def _json(self, obj: dict[str, object], status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.send_header("X-Backend", self.server.name)
        self.end_headers()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        with self.server.lock:
            self.server.in_flight += 1
        try:
            self._route(url.path, q)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _route(self, path: str, q: dict[str, str]) -> None:
        if path == "/ws":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            key = self.headers.get("Sec-WebSocket-Key", "")
            accept = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            self.send_header("Sec-WebSocket-Accept", base64.b64encode(accept).decode())
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            while True:
                data = self.connection.recv(65536)
                if not data:
                    return
                self.connection.sendall(data.upper())
        sha = hashlib.sha256()
        size = 0
        slow = float(q.get("slow_read", "0"))
        for chunk in self._body():
            sha.update(chunk)
            size += len(chunk)
            if slow:
                time.sleep(slow)
        record = {
            "backend": self.server.name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_len": size,
            "body_sha256": sha.hexdigest(),
        }
        with self.server.lock:
            self.server.records.append(record)
        if q.get("crash") == self.server.name:
            # as if the process died with the request in flight: a reset, no byte of answer
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.close_connection = True
            self.connection.close()
            return
        if "sleep" in q:
            time.sleep(float(q["sleep"]))
        if path == "/stream":
            n = int(q.get("n", "0"))
            block = b"x" * 65536
            chunked = q.get("chunked") == "1"
            delay = float(q.get("delay", "0"))
            self.send_response(200)
            self.send_header("X-Backend", self.server.name)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(n))
            self.end_headers()
            left = n
            while left:
                part = block[: min(left, len(block))]
                left -= len(part)
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(part) + part + b"\r\n")
                else:
                    self.wfile.write(part)
                if delay:
                    time.sleep(delay)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            return
        status = int(q.get("status", "200"))
        self._json(record, status)


class HttpBackend:
    """A threaded HTTP/1.1 backend on 127.0.0.1 with an ephemeral port."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server = _Server(name)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def records(self) -> list[dict[str, object]]:
        with self._server.lock:
            return list(self._server.records)

    @property
    def in_flight(self) -> int:
        return self._server.in_flight

    @property
    def connections(self) -> int:
        return self._server.connections

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def dead_address() -> str:
    """A loopback address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


class _NaiveHandler(BaseHTTPRequestHandler):
    """The standard library's handler used the common way: GET and POST never read a body."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        record = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}}
        with self.server.lock:
            self.server.records.append(record)
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET


class NaiveBackend(HttpBackend):
    """A backend that never reads request bodies (and logs every request it parses)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._server = _Server(name)
        self._server.RequestHandlerClass = _NaiveHandler
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
