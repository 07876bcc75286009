"""The agent's Prometheus listener: the routers' counters as text, on a loopback address.

Owns the listener's address (``agent/metrics.json`` records the one set through the API, so a
restarted agent listens there again) and its tiny HTTP server (``GET /metrics`` only). It only
reads the route table's counters; it changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from castiron.agent.http import HEAD_TIMEOUT, MAX_HEAD, HttpError, read_request, response_bytes
from castiron.agent.routes import is_loopback, split_address
from castiron.agent.routing import RouteTable
from castiron.errors import AgentError, UsageError
from castiron.traffic.stats import prometheus_text

METRICS_NAME = "metrics.json"


class MetricsListener:
    """The optional Prometheus listener of the agent (none until an address is set)."""

    def __init__(self, agent_dir: Path, routing: RouteTable) -> None:
        self.dir = agent_dir
        self.routing = routing
        self.listen: str | None = None
        self._server: asyncio.Server | None = None

    def recorded(self) -> str | None:
        """The address recorded by the last ``PUT /v1/metrics`` (None: none or unreadable)."""
        try:
            value = json.loads((self.dir / METRICS_NAME).read_bytes()).get("listen")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    async def set(self, listen: str | None) -> None:
        """Listen on ``listen`` instead (None: stop listening).

        Raises:
            UsageError: for an address that is not loopback.
            AgentError: when the address cannot be listened on.
        """
        if listen is not None:
            host, port = split_address(listen, "listen")
            if not is_loopback(host):
                raise UsageError(f"listen: the metrics listener must be on loopback, not {host}")
        await self.close()
        if listen is not None:
            try:
                self._server = await asyncio.start_server(
                    self._serve, host, port, reuse_address=True, limit=MAX_HEAD
                )
            except OSError as exc:
                raise AgentError(f"cannot listen on {listen} for metrics: {exc}") from exc
        self.listen = listen

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.listen = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader), HEAD_TIMEOUT)
            if request.path != "/metrics":
                raise HttpError(404, "try /metrics")
            if request.method not in ("GET", "HEAD"):
                raise HttpError(405, "use GET", {"Allow": "GET, HEAD"})
            router, routes = self.routing.router, self.routing.routes
            text = prometheus_text({e: router.counters(e) for e in sorted(routes)})
            writer.write(
                response_bytes(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
            )
        except HttpError as exc:
            writer.write(response_bytes(exc.status, exc.reason.encode() + b"\n", "text/plain"))
        except (TimeoutError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
