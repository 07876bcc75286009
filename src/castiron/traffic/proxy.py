"""The builtin data plane: an asyncio HTTP/1.1 reverse proxy with atomic backend-set switches.

This module owns the builtin router: one listener per environment, keep-alive on both sides
(a pool of idle upstream connections per backend), streamed bodies with back-pressure in both
directions, ``Upgrade`` pass-through, ``X-Forwarded-*`` and ``X-Request-Id``, weighted canary
routing with stickiness, connect retries within a set, draining with a deadline, timeouts and
per-release counters. It is written on asyncio Protocols (not streams) so that a request costs
a few callbacks and no task in the common, keep-alive case, and what one backend read produces
for the client is gathered into one write (one system call).

Switch guarantee: every request is routed under the configuration snapshot that is current when
its headers are parsed (the event loop runs one callback at a time, so ``apply`` replaces the
snapshot between two requests, never inside one). Backends that leave the snapshot drain.

It knows nothing of runtimes, the spec, the state store or the agent; wire parsing is
:mod:`castiron.httpcodec` (shared with the agent and the health probe), counting is
:mod:`castiron.traffic.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from castiron.errors import RouterError
from castiron.httpcodec import (
    HttpParseError,
    ParserKind,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    encode_response_head,
    make_request_parser,
    make_response_parser,
    reason_phrase,
)
from castiron.model import Address
from castiron.traffic.accesslog import AccessLog, access_line
from castiron.traffic.base import ROUTER_RELEASE, Backend, BackendSet, ReleaseCounters, RouteConfig
from castiron.traffic.stats import ReleaseStats

__all__ = [
    "BuiltinRouter",
    "SharedListener",
    "bind_listener",
    "parse_listen",
    "validate_route",
]

_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_REQ_DROP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
_RESP_DROP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_STATUS_PREFIX: Final = {status: b"HTTP/1.1 %03d " % status for status in range(1000)}
"""The start of a status line, by code (both parsers accept any three digits), made once."""
_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}\Z")
"""A client's X-Request-Id is kept only when it is one header of this form."""
_PENDING_LIMIT: Final = 1 << 20
"""Request body bytes held while the upstream connects before the client is paused."""
_REPLAYABLE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})

# reasons a client connection's reading is paused (a bit set)
_P_UPSTREAM: Final = 1
_P_PENDING: Final = 2
_P_PIPELINE: Final = 4
# what a client connection's deadline guards
_D_NONE: Final = 0
_D_HEADER: Final = 1
_D_IDLE: Final = 2
_D_BODY: Final = 3

FRESH_GRACE: Final = 0.5
"""Seconds a connection that has sent nothing yet is kept when its process goes away."""
_NO_BODY_METHODS: Final = frozenset({b"GET", b"HEAD"})


class SharedListener(Protocol):
    """What a router process needs when other processes accept on the same listening sockets."""

    def connections(self, environment: str, local: int) -> int:
        """Record this process's client connections of ``environment`` (``local``) and return
        those of the whole listener, which ``max_connections`` limits."""
        ...

    def over_share(self, environment: str, local: int) -> bool:
        """True when this process holds more than its share of the listener's connections
        (it then leaves new ones to the others for a moment)."""
        ...


def _wall() -> float:
    return time.time()


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as (host, port).

    Raises:
        RouterError: when ``listen`` is not of that form.
    """
    try:
        address = Address.parse(listen)
    except ValueError:
        raise RouterError(f"listen address {listen!r}: expected HOST:PORT") from None
    return address.host, address.port


def _nodelay(transport: asyncio.BaseTransport) -> None:
    # Sockets not created with proto=IPPROTO_TCP do not get TCP_NODELAY from asyncio.
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _error_response(status: int, message: str) -> bytes:
    body = (message + "\n").encode()
    headers = [
        ("Content-Type", "text/plain"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    return encode_response_head(status, headers, reason_phrase(status, "Error")) + body


class _Pool:
    """One backend of one release: its idle connections and its in-flight exchanges."""

    __slots__ = ("active", "cut_at", "draining", "host", "idle", "key", "port", "stats")

    def __init__(self, key: tuple[str, str, str], stats: ReleaseStats) -> None:
        self.key = key
        self.host, self.port = parse_listen(key[2])
        self.stats = stats
        self.idle: list[_Upstream] = []
        self.active: set[_Exchange] = set()
        self.draining = False
        self.cut_at = 0.0

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for up in idle:
            up.transport.close()


class _Group:
    """The pools of one release in one snapshot, picked round-robin, and its counters."""

    __slots__ = ("pools", "release", "rr", "stats")

    def __init__(self, release: str, pools: list[_Pool], stats: ReleaseStats) -> None:
        self.release = release
        self.pools = pools
        self.stats = stats
        self.rr = 0

    def pick(self, tried: list[_Pool]) -> _Pool | None:
        n = len(self.pools)
        for _ in range(n):
            pool = self.pools[self.rr % n]
            self.rr += 1
            if pool not in tried and not pool.draining:
                return pool
        return None


class _Snapshot:
    """One applied configuration: immutable except the weighting accumulator."""

    __slots__ = ("acc", "canary", "config", "groups", "stable")

    def __init__(self, config: RouteConfig, stable: _Group | None, canary: _Group | None) -> None:
        self.config = config
        self.stable = stable
        self.canary = canary
        self.groups = {g.release: g for g in (stable, canary) if g is not None}
        self.acc = 0


def _cookie(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for hname, value in headers:
        if hname.lower() == b"cookie":
            for part in value.split(b";"):
                k, sep, v = part.strip().partition(b"=")
                if sep and k == name:
                    return v.strip(b'"')
    return None


class _Listener:
    """One environment's listening socket, snapshot, pools, clients and counters."""

    def __init__(self, router: BuiltinRouter, config: RouteConfig) -> None:
        self.router = router
        self.loop = asyncio.get_running_loop()
        self.environment = config.environment
        self.config = config
        self.pools: dict[tuple[str, str, str], _Pool] = {}
        self.draining: set[_Pool] = set()
        self.stats: dict[str, ReleaseStats] = {}
        self.clients: set[_Client] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.base_events.Server | None = None
        self.acceptor: _SharedAcceptor | None = None
        self.closing = False
        self.snapshot = _Snapshot(config, None, None)
        self.access: AccessLog | None = None
        self.install(config)
        self.sweeper = self.loop.create_task(self._sweep())
        self.rid_prefix = os.urandom(8).hex().encode()
        self.rid_count = 0

    def _access_wanted(self, config: RouteConfig) -> None:
        log_dir = self.router.access_log_dir
        if config.access_log and log_dir is not None and self.access is None:
            self.access = AccessLog(log_dir / f"{config.environment}.log")
        elif not config.access_log and self.access is not None:
            self.access.close()
            self.access = None

    def count_refusal(self, status: int, latency_ms: float) -> None:
        """Count a response the router gave before any release was picked."""
        stats = self.stats_for(ROUTER_RELEASE)
        stats.requests += 1
        stats.observe(status, latency_ms)

    def connections(self) -> int:
        """Client connections of the whole listener (every process serving it)."""
        shared = self.router.shared
        local = len(self.clients)
        return local if shared is None else shared.connections(self.environment, local)

    def request_id(self) -> bytes:
        """A new request id: 128 bits as hex, a random per-listener prefix and a counter."""
        self.rid_count += 1
        return b"%s%016x" % (self.rid_prefix, self.rid_count)

    # --- configuration ------------------------------------------------------------------------
    def stats_for(self, release: str) -> ReleaseStats:
        stats = self.stats.get(release)
        if stats is None:
            stats = self.stats[release] = ReleaseStats(release)
        return stats

    def _group(
        self, bset: BackendSet | None, keep: dict[tuple[str, str, str], _Pool]
    ) -> _Group | None:
        if bset is None:
            return None
        pools: list[_Pool] = []
        for backend in bset.backends:
            key = (bset.release, backend.id, backend.address)
            pool = keep.get(key) or self.pools.get(key)
            if pool is None or pool.draining:
                pool = _Pool(key, self.stats_for(bset.release))
            keep[key] = pool
            pools.append(pool)
        return _Group(bset.release, pools, self.stats_for(bset.release))

    def install(self, config: RouteConfig) -> None:
        """Switch to ``config``: one assignment; leaving backends start draining."""
        keep: dict[tuple[str, str, str], _Pool] = {}
        stable = self._group(config.stable, keep)
        canary = self._group(config.canary, keep)
        self.config = config
        self.snapshot = _Snapshot(config, stable, canary)
        self._access_wanted(config)
        old, self.pools = self.pools, keep
        now = self.loop.time()
        for key, pool in old.items():
            if key not in keep:
                pool.draining = True
                pool.close_idle()
                if pool.active:
                    pool.cut_at = now + config.drain_timeout
                    self.draining.add(pool)

    def route(self, head: RequestHead) -> tuple[_Group | None, bytes | None]:
        """The release group for a request and the sticky cookie to set (if any)."""
        snap = self.snapshot
        cfg = snap.config
        stable, canary = snap.stable, snap.canary
        if canary is None or stable is None:
            return (stable or canary), None
        sticky = cfg.sticky
        weight = cfg.canary_weight
        if sticky is not None and sticky.kind == "cookie":
            value = _cookie(head.headers, sticky.name.encode())
            if value is not None:
                group = snap.groups.get(value.decode("latin-1"))
                if group is not None:
                    return group, None
            group = self._weighted(snap, weight)
            return group, b"%s=%s; Path=/; HttpOnly" % (
                sticky.name.encode(),
                group.release.encode(),
            )
        if sticky is not None:
            lname = sticky.name.lower().encode()
            for name, value in head.headers:
                if name.lower() == lname:
                    return (canary if zlib.crc32(value) % 100 < weight else stable), None
        return self._weighted(snap, weight), None

    @staticmethod
    def _weighted(snap: _Snapshot, weight: int) -> _Group:
        assert snap.stable is not None and snap.canary is not None
        # An error-diffusion accumulator: exactly `weight` of every 100 requests, evenly spread.
        snap.acc += weight
        if snap.acc >= 100:
            snap.acc -= 100
            return snap.canary
        return snap.stable

    # --- serving ----------------------------------------------------------------------------------
    async def start(self, sock: socket.socket) -> None:
        if self.router.shared is not None:
            self.acceptor = _SharedAcceptor(self, sock)
            return
        self.server = await self.loop.create_server(lambda: _Client(self), sock=sock, backlog=1024)

    def spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def tick(self) -> float:
        t = self.config.timeouts
        body = self.config.limits.body_timeout
        return max(0.01, min(0.25, t.header_read / 4, t.backend_response / 4, t.idle / 4, body / 4))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.tick())
            self.sweep(self.loop.time())

    def sweep(self, now: float) -> None:
        """Enforce deadlines: header read, idle keep-alive, backend response, drain."""
        idle = self.config.timeouts.idle
        if self.access is not None:
            self.access.flush()
        for client in list(self.clients):
            if client.deadline_kind != _D_NONE and now >= client.deadline:
                if client.deadline_kind == _D_BODY and client.paused:
                    # the router itself stopped reading (back-pressure): not the client's fault
                    client.deadline = now + self.config.limits.body_timeout
                    continue
                client.timed_out()
        for pool in list(self.pools.values()):
            if pool.idle and now - pool.idle[0].idle_since >= idle:
                keep = [up for up in pool.idle if now - up.idle_since < idle]
                for up in pool.idle:
                    if up not in keep:
                        up.transport.close()
                pool.idle = keep
            for ex in list(pool.active):
                if ex.resp_deadline and now >= ex.resp_deadline:
                    ex.backend_timed_out()
        for pool in list(self.draining):
            if not pool.active:
                self.draining.discard(pool)
            elif now >= pool.cut_at:
                for ex in list(pool.active):
                    ex.cut()
                self.draining.discard(pool)

    async def shutdown(self, drain_timeout: float, *, keep_routes: bool = False) -> None:
        """Stop accepting, drain in-flight requests (up to the deadline), close everything.

        With ``keep_routes`` (the process is going away, not the route) a request still being
        parsed on an open connection is routed as before instead of finding no backends."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        if self.acceptor is not None:
            self.acceptor.close()
        if keep_routes:
            now = self.loop.time()
            for pool in self.pools.values():
                if pool.active:
                    pool.cut_at = now + drain_timeout
                    self.draining.add(pool)
        else:
            self.install(
                RouteConfig(
                    environment=self.environment,
                    listen=self.config.listen,
                    drain_timeout=drain_timeout,
                    timeouts=self.config.timeouts,
                )
            )
        # A connection accepted just before the process started going away may not have been
        # read yet: with ``keep_routes`` its request is served (and the connection then
        # closed) rather than cut. One that sends nothing within FRESH_GRACE is closed.
        fresh: set[_Client] = set()
        for client in list(self.clients):
            if client.queue:
                continue
            if keep_routes and client.deadline_kind == _D_HEADER:
                fresh.add(client)
            else:
                client.close()
        deadline = self.loop.time() + drain_timeout + 1.0
        fresh_until = self.loop.time() + min(FRESH_GRACE, drain_timeout)
        while self.loop.time() < deadline:
            late = self.loop.time() >= fresh_until
            for client in list(fresh):
                if client.closed:
                    fresh.discard(client)
                elif late and not client.queue and not client.got_bytes:
                    client.close()
                    fresh.discard(client)
            if not (fresh or self.draining):
                break
            await asyncio.sleep(0.02)
        self.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.sweeper
        for client in list(self.clients):
            client.transport.abort()
        for pool in self.pools.values():
            pool.close_idle()
        for task in list(self.tasks):
            task.cancel()
        if self.access is not None:
            self.access.close()
            self.access = None
        if self.server is not None:
            await self.server.wait_closed()


class _SharedAcceptor:
    """Accepts from a listening socket that other router processes accept from too.

    Every process is woken for each new connection; a server's accept loop would let the first
    one take a whole burst (wrk's 32 connections all landing in one process). This accepts one
    connection per wake-up, and a process holding more than its share of the listener's
    connections first leaves the new one to the others for ``_DEFER`` seconds, then takes it
    if nobody did (a busy or dead peer never strands a connection).
    """

    _DEFER = 0.002

    def __init__(self, listener: _Listener, sock: socket.socket) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.deferred = False
        self.closed = False
        self.loop.add_reader(self.fd, self._ready)

    def _ready(self) -> None:
        listener = self.listener
        shared = listener.router.shared
        if (
            not self.deferred
            and shared is not None
            and shared.over_share(listener.environment, len(listener.clients))
        ):
            self._pause(self._DEFER)
            self.deferred = True
            return
        self.deferred = False
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # out of descriptors or memory: try again shortly
            self._pause(0.1)
            return
        conn.setblocking(False)
        listener.spawn(self._serve(conn))

    def _pause(self, delay: float) -> None:
        self.loop.remove_reader(self.fd)
        self.loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.fd, self._ready)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: _Client(self.listener), conn)
        except OSError:
            conn.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.sock.close()


class _Client(asyncio.Protocol):
    """One client connection: parses requests and runs them one at a time, in order."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: RequestParser | None = make_request_parser(
            listener.router.parser_kind, self, listener.config.max_header_bytes
        )
        self.queue: deque[_Exchange] = deque()
        self.raw: _Exchange | None = None
        """After an upgrade request: the exchange that receives raw client bytes."""
        self.tunnel: asyncio.Transport | None = None
        self.paused = 0
        self.peer = b"unknown"
        self.deadline_kind = _D_HEADER
        self.deadline = self.loop.time() + listener.config.timeouts.header_read
        self.got_bytes = False
        self.closed = False
        self.over_limit = False
        """Accepted beyond ``max_connections``: its request is answered 503."""
        self.last_head: RequestHead | None = None
        self.wbuf: list[bytes] | None = None
        """While a backend's bytes are being handled: client output gathered into one write."""

    # output: everything the router sends to the client goes through these
    def write(self, data: bytes) -> None:
        wbuf = self.wbuf
        if wbuf is not None:
            wbuf.append(data)
        elif not self.closed:
            self.transport.write(data)

    def cork(self) -> None:
        if self.wbuf is None:
            self.wbuf = []

    def uncork(self) -> None:
        wbuf, self.wbuf = self.wbuf, None
        if wbuf and not self.closed:
            # one write (one send) per backend read; uvloop's writelines queues instead
            self.transport.write(wbuf[0] if len(wbuf) == 1 else b"".join(wbuf))

    def close(self) -> None:
        """Send what is gathered, then close once the transport's buffer is flushed."""
        self.uncork()
        self.transport.close()

    def abort(self) -> None:
        self.wbuf = None
        self.transport.abort()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        _nodelay(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = str(peer[0]).encode()
        listener = self.listener
        clients = listener.clients
        clients.add(self)
        self.over_limit = listener.connections() > listener.config.limits.max_connections

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.raw is not None:
            self.raw.client_raw(data)
            return
        parser = self.parser
        if parser is None:
            return
        if self.deadline_kind == _D_IDLE:
            self.deadline_kind = _D_HEADER
            self.deadline = self.loop.time() + self.listener.config.timeouts.header_read
        self.got_bytes = True
        try:
            rest = parser.feed(data)
        except HttpParseError as exc:
            self.bad_request(exc)
            return
        if rest is not None and self.queue:
            self.raw = self.queue[-1]
            self.parser = None
            if rest:
                self.raw.client_raw(rest)
        if self.queue and not self.queue[0].started:
            self.queue[0].start()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        listener = self.listener
        listener.clients.discard(self)
        if listener.router.shared is not None:
            listener.connections()
        self.deadline_kind = _D_NONE
        queue, self.queue = self.queue, deque()
        for ex in queue:
            ex.client_gone()

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            up = self.queue[0].upstream
            if not up.closed:
                up.transport.resume_reading()

    # flow control
    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    # parser events
    def on_request(self, head: RequestHead) -> None:
        """A request head: refused here (raising) when a limit forbids it, else queued.

        Raises:
            HttpParseError: 503 beyond ``max_connections``, 413 when the declared body is too
                large, 400 for a body on GET or HEAD (unless allowed).
        """
        self.last_head = head
        if self.over_limit:
            raise HttpParseError(503, "too many connections")
        limits = self.listener.config.limits
        if head.content_length or head.chunked:
            if head.method in _NO_BODY_METHODS and not limits.allow_get_body:
                raise HttpParseError(400, f"a {head.method.decode()} request may not have a body")
            if (head.content_length or 0) > limits.max_body_bytes:
                raise HttpParseError(413, "request body too large")
            self.deadline_kind = _D_BODY
            self.deadline = self.loop.time() + limits.body_timeout
        else:
            self.deadline_kind = _D_NONE
        self.queue.append(_Exchange(self, head))
        if len(self.queue) > 1:
            self.pause(_P_PIPELINE)

    def on_body(self, data: bytes) -> None:
        """Raises:
        HttpParseError: 413 once a chunked body passes ``max_body_bytes``."""
        ex = self.queue[-1]
        ex.body_size += len(data)
        limits = self.listener.config.limits
        if ex.body_size > limits.max_body_bytes:
            raise HttpParseError(413, "request body too large")
        self.deadline = self.loop.time() + limits.body_timeout
        ex.client_body(data)

    def on_request_end(self) -> None:
        if self.deadline_kind == _D_BODY:
            self.deadline_kind = _D_NONE
        self.queue[-1].client_end()

    # outcomes
    def bad_request(self, exc: HttpParseError) -> None:
        """Answer a malformed or refused request with ``exc.status`` and close."""
        self.parser = None
        self.deadline_kind = _D_NONE
        while self.queue and not self.queue[-1].started:
            self.queue.pop().discard()
        counted = False
        if self.queue:
            ex = self.queue[0]
            ex.abort_upstream()
            if ex.resp_head_sent:
                self.abort()
                return
            self.queue.clear()
            ex.discard()
            if ex.stats is not None:  # refused mid-body: the release counted the request
                ex.stats.observe(exc.status, (self.loop.time() - ex.t0) * 1000.0)
                counted = True
        if not counted:
            self.listener.count_refusal(exc.status, 0.0)
        self.log_refusal(exc.status)
        self.write(_error_response(exc.status, exc.reason))
        self.close()

    def log_refusal(self, status: int) -> None:
        access = self.listener.access
        if access is not None:
            head = self.last_head
            access.write(
                access_line(
                    at=_wall(),
                    client=self.peer.decode("latin-1"),
                    method=head.method.decode("latin-1") if head else "",
                    path=head.target.decode("latin-1") if head else "",
                    status=status,
                    sent=0,
                    upstream=None,
                    release=None,
                    duration_ms=0.0,
                )
            )

    def timed_out(self) -> None:
        if self.deadline_kind == _D_BODY:
            self.bad_request(HttpParseError(408, "request body not received in time"))
            return
        if self.deadline_kind == _D_HEADER and self.got_bytes:
            self.last_head = None
            self.listener.count_refusal(408, 0.0)
            self.log_refusal(408)
            self.write(_error_response(408, "request headers not received in time"))
        self.deadline_kind = _D_NONE
        self.close()

    def exchange_done(self, ex: _Exchange, keep_open: bool) -> None:
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if self.closed:
            return
        if not keep_open or self.listener.closing:
            self.parser = None
            self.close()
            return
        if self.paused & _P_PIPELINE and len(self.queue) <= 1:
            self.resume(_P_PIPELINE)
        if self.queue:
            if not self.queue[0].started:
                self.queue[0].start()
        else:
            self.got_bytes = False
            self.deadline_kind = _D_IDLE
            self.deadline = self.loop.time() + self.listener.config.timeouts.idle


class _Upstream(asyncio.Protocol):
    """One connection to a backend; idle in its pool or serving one exchange."""

    def __init__(self, pool: _Pool, parser_kind: ParserKind) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.exchange: _Exchange | None = None
        self.parser: ResponseParser = make_response_parser(parser_kind, self)
        self.idle_since = 0.0
        self.closed = False
        self.tunnel = False
        self.got_bytes = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.transport.close()  # unsolicited bytes on an idle connection
            return
        client = ex.client
        if self.tunnel:
            client.write(data)
            return
        self.got_bytes = True
        client.cork()
        try:
            rest = self.parser.feed(data)
        except HttpParseError:
            self.transport.abort()
            return
        finally:
            client.uncork()
        if rest is not None and self.exchange is not None:
            self.tunnel = True
            ex.tunnel_open(rest)

    def eof_received(self) -> bool | None:
        if self.exchange is not None and not self.tunnel:
            self.parser.feed_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.upstream_lost(self)
        else:
            with contextlib.suppress(ValueError):
                self.pool.idle.remove(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.pause(_P_UPSTREAM)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.resume(_P_UPSTREAM)

    # ResponseHandler
    def on_response(self, head: ResponseHead) -> None:
        if self.exchange is not None:
            self.exchange.response_head(head)

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(data)

    def on_response_end(self) -> None:
        if self.exchange is not None:
            self.exchange.response_end(self)


class _Exchange:
    """One request and its response, from headers parsed to the last byte back."""

    __slots__ = (
        "body_size",
        "client",
        "close_client",
        "cookie",
        "dead",
        "done",
        "group",
        "head",
        "out_chunked",
        "pending",
        "pending_size",
        "pool",
        "req_done",
        "resp_deadline",
        "resp_head",
        "resp_head_sent",
        "retried_fresh",
        "reused",
        "rid",
        "sent",
        "started",
        "stats",
        "t0",
        "tried",
        "upstream",
        "upstream_head",
    )

    def __init__(self, client: _Client, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.t0 = client.loop.time()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.req_done = False
        self.started = False
        self.upstream: _Upstream | None = None
        self.pool: _Pool | None = None
        self.group: _Group | None = None
        self.stats: ReleaseStats | None = None
        self.tried: list[_Pool] = []
        self.cookie: bytes | None = None
        self.upstream_head = b""
        self.rid = b""
        self.resp_head: ResponseHead | None = None
        self.resp_head_sent = False
        self.resp_deadline = 0.0
        self.out_chunked = False
        self.close_client = False
        self.dead = False
        self.done = False
        self.reused = False
        self.retried_fresh = False
        self.body_size = 0
        self.sent = 0

    # --- request side ---
    def _send(self, parts: list[bytes]) -> None:
        up = self.upstream
        if up is not None and not self.pending:
            up.transport.writelines(parts)
        else:
            self.pending.extend(parts)
            self.pending_size += sum(map(len, parts))
            if self.pending_size > _PENDING_LIMIT:
                self.client.pause(_P_PENDING)

    def client_body(self, data: bytes) -> None:
        if self.dead:
            return
        if self.head.chunked:
            self._send([encode_chunk(data), data, _CRLF])
        else:
            self._send([data])

    def client_end(self) -> None:
        self.req_done = True
        if self.dead:
            return
        if self.head.chunked:
            self._send([_LAST_CHUNK])
        if self.upstream is not None:
            self.resp_deadline = self.client.loop.time() + (
                self.client.listener.config.timeouts.backend_response
            )

    def client_raw(self, data: bytes) -> None:
        if not self.dead:
            self._send([data])

    def _build_head(self, listener: _Listener) -> bytes:
        head = self.head
        tokens = head.connection
        parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
        xff = b""
        host = b""
        rid = b""
        upgrade = b""
        for name, value in head.headers:
            lname = name.lower()
            if lname in _REQ_DROP or lname in tokens:
                if lname == b"x-forwarded-for":
                    xff = value if not xff else xff + b", " + value
                elif lname == b"x-request-id":
                    # kept only when it is one well-formed id; anything else is replaced
                    rid = value if not rid and _REQUEST_ID.match(value) else b"-"
                elif lname == b"upgrade":
                    upgrade = value
                continue
            if lname == b"host":
                host = value
            parts += (name, b": ", value, _CRLF)
        if not rid or rid == b"-":
            rid = listener.request_id()
        parts += (
            b"X-Forwarded-For: ",
            (xff + b", " + self.client.peer) if xff else self.client.peer,
            b"\r\nX-Forwarded-Proto: http\r\n",
        )
        if host:
            parts += (b"X-Forwarded-Host: ", host, _CRLF)
        parts += (b"X-Request-Id: ", rid, _CRLF)
        if head.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        elif head.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % head.content_length)
        if head.upgrade and upgrade:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF)
        parts.append(_CRLF)
        self.rid = rid
        return b"".join(parts)

    def start(self) -> None:
        self.started = True
        listener = self.client.listener
        group, cookie = listener.route(self.head)
        if group is None:
            self.respond_error(503, f"environment {listener.environment}: no backends")
            return
        self.group = group
        self.cookie = cookie
        self.stats = group.stats
        self.stats.requests += 1
        self.upstream_head = self._build_head(listener)
        self._next_backend()

    def _next_backend(self) -> None:
        assert self.group is not None
        pool = self.group.pick(self.tried)
        if pool is None:
            self.respond_error(
                502, f"release {self.group.release}: no backend accepted the connection"
            )
            return
        self.tried.append(pool)
        self.pool = pool
        pool.active.add(self)
        while pool.idle:
            up = pool.idle.pop()
            if not up.closed:
                self.reused = True
                self.attach(up)
                return
        self.client.listener.spawn(self._connect(pool))

    async def _connect(self, pool: _Pool) -> None:
        listener = self.client.listener
        try:
            _, up = await asyncio.wait_for(
                listener.loop.create_connection(
                    lambda: _Upstream(pool, listener.router.parser_kind), pool.host, pool.port
                ),
                listener.config.timeouts.connect,
            )
        except (OSError, TimeoutError):
            pool.active.discard(self)
            pool.stats.connect_errors += 1
            if not self.dead:
                self._next_backend()
            return
        if self.dead:
            up.transport.close()
            return
        self.reused = False
        self.attach(up)

    def attach(self, up: _Upstream) -> None:
        self.upstream = up
        up.exchange = self
        up.got_bytes = False
        up.parser.head_request = self.head.method == b"HEAD"
        if self.pending:
            parts = [self.upstream_head, *self.pending]
            self.pending = []
            up.transport.write(b"".join(parts))
        else:
            up.transport.write(self.upstream_head)
        if self.pending_size:
            self.pending_size = 0
            self.client.resume(_P_PENDING)
        if self.req_done:
            self.resp_deadline = self.client.loop.time() + (
                self.client.listener.config.timeouts.backend_response
            )

    # --- response side ---
    def response_head(self, rh: ResponseHead) -> None:
        client = self.client
        if rh.status < 200 and rh.status != 101:
            if self.head.minor == 1 and not client.closed:
                client.write(self._client_head(rh, interim=True))
            return
        self.resp_deadline = 0.0
        self.resp_head = rh
        if rh.status == 101:
            return  # written by tunnel_open, with the backend's own Upgrade headers
        if not client.closed:
            head = self._client_head(rh)
            self.sent += len(head)
            client.write(head)
        self.resp_head_sent = True

    def _client_head(self, rh: ResponseHead, interim: bool = False) -> bytes:
        parts = [_STATUS_PREFIX[rh.status], rh.reason, _CRLF]
        has_rid = False
        drop_length = rh.chunked
        for name, value in rh.headers:
            lname = name.lower()
            if lname in _RESP_DROP or (drop_length and lname == b"content-length"):
                continue
            if lname == b"x-request-id":
                has_rid = True
            parts += (name, b": ", value, _CRLF)
        if interim:
            parts.append(_CRLF)
            return b"".join(parts)
        if not has_rid:
            parts += (b"X-Request-Id: ", self.rid, _CRLF)
        if self.cookie is not None:
            parts += (b"Set-Cookie: ", self.cookie, _CRLF)
        if rh.chunked or rh.until_close:
            if self.head.minor == 1:
                self.out_chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.close_client = True
        if not self.req_done:
            self.close_client = True  # the backend answered before the whole body arrived
        keep = self.head.keep_alive and not self.close_client and not self.client.listener.closing
        if not keep:
            parts.append(b"Connection: close\r\n")
        elif self.head.minor == 0:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        return b"".join(parts)

    def response_body(self, data: bytes) -> None:
        client = self.client
        if client.closed:
            return
        self.sent += len(data)
        if self.out_chunked:
            client.write(encode_chunk(data))
            client.write(data)
            client.write(_CRLF)
        else:
            client.write(data)

    def response_end(self, up: _Upstream) -> None:
        rh = self.resp_head
        assert rh is not None and self.pool is not None and self.stats is not None
        client = self.client
        if self.out_chunked and not client.closed:
            client.write(_LAST_CHUNK)
        now = client.loop.time()
        latency = (now - self.t0) * 1000.0
        self.stats.observe(rh.status, latency)
        self.done = True
        self.upstream = None
        up.exchange = None
        pool = self.pool
        pool.active.discard(self)
        listener = client.listener
        if listener.access is not None:
            self.log(rh.status, latency)
        # A connection that carried a request body (even an empty chunked one) is never
        # reused: nothing proves the backend read it, and unread body bytes would be parsed
        # as the next client's request.
        head = self.head
        if (
            rh.keep_alive
            and self.req_done
            and not head.content_length
            and not head.chunked
            and not pool.draining
            and not listener.closing
        ):
            up.idle_since = now
            pool.idle.append(up)
        else:
            up.transport.close()
        keep = self.head.keep_alive and not self.close_client
        client.exchange_done(self, keep)

    def log(self, status: int, latency_ms: float) -> None:
        """Write this exchange's access log line."""
        access = self.client.listener.access
        if access is None:
            return
        head = self.head
        access.write(
            access_line(
                at=_wall(),
                client=self.client.peer.decode("latin-1"),
                method=head.method.decode("latin-1"),
                path=head.target.decode("latin-1"),
                status=status,
                sent=self.sent,
                upstream=None if self.pool is None else self.pool.key[2],
                release=None if self.group is None else self.group.release,
                duration_ms=latency_ms,
            )
        )

    def tunnel_open(self, rest: bytes) -> None:
        rh = self.resp_head
        up = self.upstream
        assert rh is not None and up is not None and self.stats is not None
        client = self.client
        self.stats.observe(101, (client.loop.time() - self.t0) * 1000.0)
        self.resp_head_sent = True
        if client.closed:
            up.transport.close()
            return
        parts = [b"HTTP/1.1 101 ", rh.reason, _CRLF]
        for name, value in rh.headers:
            parts += (name, b": ", value, _CRLF)
        parts.append(_CRLF)
        client.write(b"".join(parts))
        if rest:
            client.write(rest)
        client.tunnel = up.transport
        client.raw = None

    # --- failures ---
    def respond_error(self, status: int, message: str) -> None:
        """Answer the client with an error (before any response byte was sent) and close."""
        latency = (self.client.loop.time() - self.t0) * 1000.0
        if self.stats is not None:
            self.stats.observe(status, latency)
        else:
            self.client.listener.count_refusal(status, latency)
        if self.client.listener.access is not None:
            self.log(status, latency)
        if self.pool is not None:
            self.pool.active.discard(self)
        self.done = True
        self.dead = True
        client = self.client
        if not client.closed:
            client.write(_error_response(status, message))
        client.exchange_done(self, False)

    def upstream_lost(self, up: _Upstream) -> None:
        if self.done:
            return
        self.upstream = None
        if self.tunnel_active():
            self._finish_broken()
            return
        if not self.resp_head_sent and not self.dead:
            replayable = (
                not up.got_bytes
                and self.req_done
                and self.head.method in _REPLAYABLE
                and not self.head.chunked
                and not self.head.content_length
                and self.pool is not None
            )
            if replayable and self._replay():
                return
            self.respond_error(502, "the backend closed the connection before responding")
            return
        self._finish_broken()

    def _replay(self) -> bool:
        """Send an idempotent, bodiless request again after its backend closed the connection
        without a byte of answer: once more on the same backend when a kept-alive connection was
        closed as it was reused, otherwise on another backend of the same release (a backend
        that died with the request in flight). Each backend is tried at most once."""
        pool = self.pool
        assert pool is not None and self.group is not None
        if self.reused and not self.retried_fresh and not pool.draining:
            self.retried_fresh = True
            self.reused = False
            self.client.listener.spawn(self._connect(pool))
            return True
        if not any(p not in self.tried and not p.draining for p in self.group.pools):
            return False
        pool.active.discard(self)
        self.reused = False
        self._next_backend()
        return True

    def tunnel_active(self) -> bool:
        return self.client.tunnel is not None

    def _finish_broken(self) -> None:
        self.done = True
        self.dead = True
        if self.pool is not None:
            self.pool.active.discard(self)
        if self.client.closed:
            return
        if self.tunnel_active():
            self.client.close()
        else:
            self.client.abort()

    def backend_timed_out(self) -> None:
        self.resp_deadline = 0.0
        self.abort_upstream()
        self.respond_error(504, "the backend did not respond in time")

    def cut(self) -> None:
        """The drain deadline passed with this request still in flight."""
        if self.pool is not None:
            self.pool.stats.drained_cut += 1
        self.dead = True
        self.abort_upstream()
        if self.done:
            return
        if self.resp_head_sent:
            self._finish_broken()
        else:
            self.respond_error(502, "the backend was drained before it responded")

    def abort_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.exchange = None
            up.transport.abort()

    def client_gone(self) -> None:
        self.dead = True
        self.abort_upstream()
        if self.pool is not None:
            self.pool.active.discard(self)

    def discard(self) -> None:
        self.dead = True
        self.abort_upstream()
        if self.pool is not None:
            self.pool.active.discard(self)


def _bind(listen: str, environment: str) -> socket.socket:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise RouterError(
            f"environment {environment}: cannot listen on {listen}: {exc.strerror or exc}"
        ) from exc
    return sock


class BuiltinRouter:
    """The builtin data plane (implements :class:`castiron.traffic.base.Router`)."""

    name = "builtin"

    def __init__(
        self,
        *,
        listen_socket_factory: Callable[[str], socket.socket] | None = None,
        parser: ParserKind = "auto",
        access_log_dir: Path | None = None,
        shared: SharedListener | None = None,
    ) -> None:
        self._factory = listen_socket_factory
        self.shared = shared
        """Set when other processes accept on the same listening sockets: connections are
        counted across them and accepted one at a time, balanced by each one's share."""
        self.parser_kind: ParserKind = parser
        self.access_log_dir = access_log_dir
        """Where environments with ``access_log`` write ``ENV.log`` (None: nowhere)."""
        self._listeners: dict[str, _Listener] = {}

    async def apply(self, config: RouteConfig) -> None:
        """Create the environment's listener if needed and switch to ``config`` atomically.

        Raises:
            RouterError: when the listen address is invalid or cannot be bound, or a backend
                address is not ``HOST:PORT``.
        """
        _validate(config)
        listener = self._listeners.get(config.environment)
        if listener is not None and listener.config.listen == config.listen:
            listener.install(config)
            return
        sock = self._open(config)
        new = _Listener(self, config)
        try:
            await new.start(sock)
        except OSError as exc:
            sock.close()
            raise RouterError(f"environment {config.environment}: {exc}") from exc
        self._listeners[config.environment] = new
        if listener is not None:
            await listener.shutdown(config.drain_timeout)

    def _open(self, config: RouteConfig) -> socket.socket:
        if self._factory is None:
            return _bind(config.listen, config.environment)
        try:
            sock = self._factory(config.listen)
        except OSError as exc:
            raise RouterError(
                f"environment {config.environment}: cannot listen on {config.listen}: {exc}"
            ) from exc
        sock.setblocking(False)
        return sock

    async def remove(self, environment: str) -> None:
        """Drain (up to the environment's ``drain_timeout``) and close its listener."""
        listener = self._listeners.pop(environment, None)
        if listener is not None:
            await listener.shutdown(listener.config.drain_timeout)

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """Per-release counters of the environment's listener (empty when unknown)."""
        listener = self._listeners.get(environment)
        if listener is None:
            return []
        return [s.snapshot() for s in list(listener.stats.values())]

    def address(self, environment: str) -> tuple[str, int]:
        """The (host, port) the environment's listener is bound to (useful with port 0).

        Raises:
            RouterError: when the environment has no listener.
        """
        listener = self._listeners.get(environment)
        if listener is None or listener.server is None or not listener.server.sockets:
            raise RouterError(f"environment {environment}: no listener")
        name = listener.server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self, *, keep_routes: bool = False) -> None:
        """Stop every listener, draining each first (``keep_routes``: see ``shutdown``)."""
        listeners, self._listeners = list(self._listeners.values()), {}
        await asyncio.gather(
            *(lst.shutdown(lst.config.drain_timeout, keep_routes=keep_routes) for lst in listeners)
        )


def _validate(config: RouteConfig) -> None:
    parse_listen(config.listen)
    if not 0 <= config.canary_weight <= 100:
        raise RouterError(
            f"environment {config.environment}: canary_weight {config.canary_weight} "
            "is not within 0-100"
        )
    for bset in (config.stable, config.canary):
        if bset is None:
            continue
        backend: Backend
        for backend in bset.backends:
            try:
                parse_listen(backend.address)
            except RouterError:
                raise RouterError(
                    f"environment {config.environment}: release {bset.release}: backend "
                    f"{backend.id}: address {backend.address!r} is not HOST:PORT"
                ) from None


def validate_route(config: RouteConfig) -> None:
    """Check ``config`` as :meth:`BuiltinRouter.apply` does, without applying it.

    Raises:
        RouterError: when the listen address, the canary weight or a backend address is invalid.
    """
    _validate(config)


def bind_listener(listen: str, environment: str) -> socket.socket:
    """A new non-blocking listening socket on ``listen`` (``SO_REUSEADDR``, backlog 1024).

    Raises:
        RouterError: when ``listen`` is invalid or cannot be bound.
    """
    return _bind(listen, environment)
