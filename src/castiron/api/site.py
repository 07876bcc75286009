"""The whole site of ``castiron serve``: the API's routes and the dashboard's pages, behind the
security headers and the request counter.

Owns composing :func:`castiron.api.app.service_routes` and
:func:`castiron.api.pages.page_routes` into one ASGI app (so neither of those modules imports
the other) and the middleware every response passes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette

from castiron.api.app import Server, service_routes
from castiron.api.metrics import Metrics
from castiron.api.pages import page_routes

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
}


class Headers:
    """ASGI middleware: security headers and ``Server-Timing`` (milliseconds from the request
    to the start of the response) on every response, and the request counter."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                for key, value in SECURITY_HEADERS.items():
                    headers.append((key.lower().encode(), value.encode()))
                took = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={took:.1f}".encode()))
                message = {**message, "headers": headers}
                self.metrics.requests.inc(
                    method=scope.get("method", ""), status=str(message["status"])
                )
            await send(message)

        await self.app(scope, receive, sending)


def build_app(server: Server) -> Any:
    """The ASGI app: ``/api/v1``, ``/metrics``, ``/healthz`` and the dashboard."""
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            server.stop()

    app = Starlette(routes=[*service_routes(), *page_routes()], lifespan=lifespan)
    app.state.server = server
    return Headers(app, server.metrics)


__all__ = ["SECURITY_HEADERS", "Headers", "build_app"]
