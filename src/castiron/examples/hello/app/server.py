"""hello: the example app castiron deploys. Standard library only.

Serves ``/`` with a greeting naming ``$APP_VERSION`` (and ``$GREETING`` when set) and
``/healthz`` with 200, on ``$HOST:$PORT`` (default 127.0.0.1:8000). One thread per request.
On SIGTERM or SIGINT it stops accepting connections, lets in-flight requests finish, and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

MAX_BODY = 1024 * 1024
"""Largest request body the app reads (and ignores); a larger one closes the connection."""


class HelloHandler(BaseHTTPRequestHandler):
    """Answers ``/``, ``/healthz`` and ``/version``; everything else is 404."""

    server_version = "hello/1"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle's algorithm holds the body
    # until the peer's delayed ACK (~40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._discard_body()
        if self.path == "/healthz":
            self._send(200, "ok\n")
        elif self.path == "/version":
            body = json.dumps({"version": os.environ.get("APP_VERSION", "dev")}) + "\n"
            self._send(200, body, "application/json")
        elif self.path == "/" or self.path.startswith("/?"):
            greeting = os.environ.get("GREETING", "Hello from castiron")
            version = os.environ.get("APP_VERSION", "dev")
            self._send(200, f"{greeting}! (version {version})\n")
        else:
            self._send(404, "not found\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _discard_body(self) -> None:
        """Read the request's body, if any, so that its bytes are never taken for the next
        request on this connection; a body it will not read (chunked, invalid or over 1 MiB)
        closes the connection after the response instead."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            return
        length = self.headers.get("Content-Length")
        if length is None:
            return
        left = int(length) if length.isdigit() else -1
        if not 0 <= left <= MAX_BODY:
            self.close_connection = True
            return
        while left:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                self.close_connection = True
                return
            left -= len(chunk)

    def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(host: str, port: int) -> int:
    """Serve until SIGTERM or SIGINT; return the exit status."""
    server = ThreadingHTTPServer((host, port), HelloHandler)
    server.daemon_threads = False  # in-flight requests finish before exit
    server.block_on_close = True

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it runs outside this handler.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stderr.write(f"hello listening on {host}:{server.server_address[1]}\n")
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    sys.stderr.write("hello stopped\n")
    return 0


def main() -> int:
    """Read ``$HOST`` and ``$PORT`` and serve."""
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    return serve(host, port)


if __name__ == "__main__":
    raise SystemExit(main())
