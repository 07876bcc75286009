"""The router protocol and its value types: what the agent asks of a data plane.

A router owns one listener per environment. Its configuration is a :class:`RouteConfig`: a
stable backend set and an optional canary set with a weight. Applying a new configuration is
atomic: a request is routed entirely under the old or the new configuration, never a mix
(unless weights ask for one). Backends that leave are drained, not cut.

This module knows nothing of runtimes, the spec, or the state store.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal, Protocol

from castiron.values import value


@value
class Backend:
    """One instance that can take traffic."""

    id: str
    """The instance id (unique within the environment)."""
    address: str
    """``HOST:PORT`` on loopback (or ``[v6]:PORT``)."""


@value
class BackendSet:
    """All healthy instances of one release."""

    release: str
    """The release id; counters are kept per release."""
    backends: tuple[Backend, ...]


@value
class Stickiness:
    """Keep a client on the release it first got (canary)."""

    kind: Literal["cookie", "header"]
    name: str


@value
class Timeouts:
    """Router timeouts, in seconds."""

    connect: float = 5.0
    header_read: float = 10.0
    """How long a client may take to send its request headers (slow-client guard)."""
    backend_response: float = 60.0
    idle: float = 60.0
    """Idle keep-alive connections are closed after this long."""


@value
class Limits:
    """What one client may ask of a listener (defaults are safe for a public listener)."""

    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body forwarded; a larger one is answered 413 and never reaches a backend
    in full."""
    body_timeout: float = 30.0
    """How long a request body may go without a byte before the request is cut (408)."""
    max_connections: int = 1024
    """Client connections served at once; a request on a connection beyond this gets 503."""
    allow_get_body: bool = False
    """Forward bodies on GET and HEAD requests (refused with 400 by default: many servers
    never read them, and unread bytes are how one request is smuggled inside another)."""


ROUTER_RELEASE = "(router)"
"""The release name of counters of responses the router itself gave before a release was
picked (malformed requests, limits, no backends)."""


@value
class RouteConfig:
    """The whole routing configuration of one environment's listener."""

    environment: str
    listen: str
    """``HOST:PORT`` the router listens on."""
    stable: BackendSet | None = None
    canary: BackendSet | None = None
    canary_weight: int = 0
    """Percent (0-100) of new requests that go to ``canary``."""
    sticky: Stickiness | None = None
    drain_timeout: float = 30.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_header_bytes: int = 65536
    limits: Limits = field(default_factory=Limits)
    access_log: bool = False
    """Write one JSON line per request to the router's access log of this environment."""


@value
class LatencySummary:
    """Latency percentiles in milliseconds from the router's histogram."""

    p50_ms: float
    p95_ms: float
    p99_ms: float


@value
class ReleaseCounters:
    """Counters of one release behind one listener, since the listener started."""

    release: str
    requests: int
    responses_2xx: int
    responses_3xx: int
    responses_4xx: int
    responses_5xx: int
    connect_errors: int
    drained_cut: int
    """In-flight requests cut because they outlived the drain deadline."""
    latency: LatencySummary
    histogram: tuple[tuple[float, int], ...] = ()
    """Cumulative histogram buckets: (upper bound in ms, count); empty when not measured."""
    latency_sum_ms: float = 0.0
    """Sum of all observed latencies (ms), for a Prometheus histogram's ``_sum``."""
    latency_is_average: bool = False
    """True when the data plane has no histogram and the percentiles are one average."""


class Router(Protocol):
    """A data plane: the builtin asyncio proxy or a system HAProxy.

    All methods are coroutines run on the agent's event loop.
    """

    name: str

    async def apply(self, config: RouteConfig) -> None:
        """Create the environment's listener if needed and switch to ``config`` atomically.

        Raises:
            RouterError: when the listener cannot be bound or the config is refused.
        """
        ...

    async def remove(self, environment: str) -> None:
        """Drain and close the environment's listener."""
        ...

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """Per-release counters of the environment's listener (empty when unknown)."""
        ...

    async def close(self) -> None:
        """Stop every listener (draining first)."""
        ...
