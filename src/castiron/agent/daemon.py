"""The agent process: composes the supervisor, a router and the fd keeper; serves the control API.

Owns the agent's life cycle (one agent per ``CASTIRON_HOME``: an exclusive ``flock`` on
``agent/agent.lock`` held for the agent's life, and ``agent/agent.pid``), the control API
(HTTP/1.1 + JSON on the Unix socket ``agent/agent.sock``, mode 0600, in a 0700 directory),
the persisted route configurations (``agent/routes.json``), the event list
(``agent/events.jsonl``) and the optional Prometheus listener.

On start it adopts the instances a previous agent left running, takes the listening sockets
back from the fd keeper and re-applies the recorded routes, so listeners are back within a
second of a restart.

It also replaces instances spawned with ``replace``: when one exits by itself, a fresh
instance of the same request (new id, new port) is started after a backoff (1 s, 2 s, 4 s …
at most 60 s; back to 1 s once an instance has lived 60 s), health-checked, and swapped into
its environment's route in place of the dead one; ``instance-replaced`` records old id, new
id and exit code. Spawn requests are kept in memory with their secret values and persisted
without them (``agent/requests.json``): after an agent restart an instance that had secrets
cannot be re-created (``instance-unreplaceable``); the engine's next command reconciles.

On SIGTERM/SIGINT (or ``POST /v1/shutdown``) routers drain and close and
the keeper lets the ports go; supervised instances are left running.

This is a process entry point (``python -m castiron.agent.daemon --home H``), like the CLI: it
may log to stderr and exit. It knows nothing of the spec, the engine or the state store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import traceback
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from castiron import __version__
from castiron.agent.client import (
    API_VERSION,
    LOCK_NAME,
    PID_NAME,
    SOCKET_NAME,
    AgentEvent,
    AgentStatus,
    DriftWatch,
    EventKind,
    InstanceRecord,
    SpawnRequest,
    from_json,
    to_json,
    unix_address,
)
from castiron.agent.fdkeeper import FdKeeperClient
from castiron.agent.notify import Notifier
from castiron.agent.routes import (
    counters_to_json,
    is_loopback,
    route_from_json,
    route_to_json,
    split_address,
)
from castiron.agent.supervisor import (
    LogPolicy,
    Supervisor,
    rotate_file,
    write_json_atomic,
)
from castiron.errors import AgentError, CastironError, NotFoundError, RouterError, UsageError
from castiron.filemodes import make_private_dir, open_private
from castiron.model import HealthCheck
from castiron.ports import free_port
from castiron.redact import Redactor
from castiron.traffic.base import Backend, BackendSet, RouteConfig, Router
from castiron.traffic.stats import prometheus_text

log = logging.getLogger("castiron.agent")

ROUTES_NAME = "routes.json"
METRICS_NAME = "metrics.json"
WATCHES_NAME = "watches.json"
WATCHER_ENV = "CASTIRON_DRIFT_WATCH"
"""Set on the drift checks the agent runs, so they do not register their own watch again."""
EVENTS_NAME = "events.jsonl"
INSTANCES_NAME = "instances.json"
REQUESTS_NAME = "requests.json"
ACCESS_LOG_DIR = "access"
"""Where routers write each environment's access log (ENV.log, rotated by size)."""
_MAX_BODY = 1024 * 1024
_MAX_HEAD = 16 * 1024
_HEAD_TIMEOUT = 10.0
_EVENTS_KEPT = 5000
_HOUSEKEEPING_INTERVAL = 1.0


@dataclass(frozen=True)
class ReplaceBackoff:
    """Delays before an exited instance is replaced: ``initial * 2**n``, at most ``maximum``."""

    initial: float = 1.0
    maximum: float = 60.0
    reset_after: float = 60.0
    """An instance that lived this long resets the backoff to ``initial``."""

    def delay(self, failures: int) -> float:
        """The wait before the replacement that follows ``failures`` short-lived instances."""
        return float(min(self.maximum, self.initial * 2.0 ** min(failures, 32)))


@dataclass(frozen=True)
class AgentOptions:
    """How one agent process runs."""

    home: Path
    """The ``CASTIRON_HOME`` it serves; its files live in ``home/agent``."""
    router: Literal["builtin", "haproxy"] = "builtin"
    """The data plane: the builtin asyncio proxy or a system HAProxy."""
    router_workers: int | None = None
    """Processes the builtin router runs in (None: one per CPU; 0: inside the agent)."""
    haproxy_bin: str = "haproxy"
    metrics: str | None = None
    """Loopback ``HOST:PORT`` for a Prometheus listener (overrides a recorded one)."""
    log_file: Path | None = None
    """The file stderr goes to, when daemonised; rotated like instance logs."""
    log_policy: LogPolicy = field(default_factory=LogPolicy)
    keep_listeners: bool = True
    """Hand listening sockets to the fd keeper so they outlive the agent process."""
    backoff: ReplaceBackoff = field(default_factory=lambda: ReplaceBackoff())
    """How soon exited instances are replaced."""
    notifier: Notifier = field(default_factory=Notifier)
    """The service manager to tell of readiness, liveness and stopping (systemd
    ``Type=notify``; nothing when not started by one)."""

    @property
    def agent_dir(self) -> Path:
        """``home/agent``."""
        return self.home / "agent"


# --- single instance ------------------------------------------------------------------------------


def acquire_lock(agent_dir: Path, *, wait: float = 1.0) -> int:
    """Take the agent lock of ``agent_dir``; returns the fd that holds it (keep it open).

    Waits up to ``wait`` seconds, because a status probe may hold it for a moment.

    Raises:
        AgentError: when another agent holds it.
    """
    fd = os.open(agent_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                try:
                    pid = (agent_dir / PID_NAME).read_text().strip()
                except OSError:
                    pid = "unknown"
                raise AgentError(
                    f"another agent already runs for {agent_dir.parent} (pid {pid}); "
                    "stop it with `castiron agent stop`"
                ) from None
            time.sleep(0.02)


# --- events ---------------------------------------------------------------------------------------


class EventLog:
    """Numbered events, kept in memory (the newest few thousand) and in ``events.jsonl``."""

    def __init__(
        self, path: Path, keep: int = _EVENTS_KEPT, redactor: Redactor | None = None
    ) -> None:
        self.path = path
        self._mask = redactor if redactor is not None else Redactor()
        self._events: deque[AgentEvent] = deque(maxlen=keep)
        self._seq = 0
        self._load()

    @property
    def last_seq(self) -> int:
        """The number of the newest event (0 when none)."""
        return self._seq

    def append(self, event: AgentEvent) -> AgentEvent:
        """Number ``event`` (its detail with secret values masked), keep it and append it to
        the file (errors are logged)."""
        self._seq += 1
        numbered = replace(event, seq=self._seq, detail=self._mask.text(event.detail))
        self._events.append(numbered)
        try:
            fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with open(fd, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(to_json(numbered), sort_keys=True) + "\n")
            if self.path.stat().st_size > 4 * 1024 * 1024:
                self._compact()
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)
        return numbered

    def since(self, seq: int) -> list[AgentEvent]:
        """Events numbered above ``seq``, oldest first."""
        return [e for e in self._events if e.seq > seq]

    def _compact(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "w", encoding="utf-8") as fh:
            for e in self._events:
                fh.write(json.dumps(to_json(e), sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def _load(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read %s: %s", self.path, exc)
            return
        for n, line in enumerate(lines, 1):
            try:
                event = from_json(AgentEvent, json.loads(line), f"{self.path.name}:{n}")
            except (ValueError, UsageError) as exc:
                log.warning("skipping a bad event line: %s", exc)
                continue
            self._events.append(event)
            self._seq = max(self._seq, event.seq)


# --- a minimal HTTP/1.1 server side ---------------------------------------------------------------


class HttpError(Exception):
    """An HTTP error answer: ``status`` and a reason for ``{"error": ...}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclass(frozen=True)
class Request:
    """One parsed request."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes


_REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    500: "Internal Server Error",
    505: "HTTP Version Not Supported",
}


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read one HTTP/1.x request (``Content-Length`` bodies only).

    Raises:
        HttpError: for malformed, oversized or chunked requests.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(413, "request head too large") from None
    except asyncio.IncompleteReadError:
        raise HttpError(400, "incomplete request") from None
    if len(head) > _MAX_HEAD:
        raise HttpError(413, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported protocol {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise HttpError(400, "bad Content-Length")
    length = int(length_text)
    if length > _MAX_BODY:
        raise HttpError(413, f"body larger than {_MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "body shorter than its Content-Length") from None
    split = urllib.parse.urlsplit(target)
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
        query[key] = value
    return Request(method=method, path=urllib.parse.unquote(split.path), query=query, body=body)


def response_bytes(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _json_body(request: Request) -> object:
    if not request.body:
        raise HttpError(400, "body: a JSON object is required")
    try:
        return json.loads(request.body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"body: invalid JSON: {exc}") from None


def _query_number(request: Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise HttpError(400, f"query {name}: {text!r} is not a number") from None
    if not low <= value <= high:
        raise HttpError(400, f"query {name}: must be between {low:g} and {high:g}")
    return value


# --- the agent ------------------------------------------------------------------------------------


Handler = Callable[[Request, "asyncio.StreamWriter", dict[str, str]], Awaitable[object]]


class _Streamed:
    """Marker: the handler wrote its own response."""


STREAMED = _Streamed()


class Agent:
    """One agent process: its routes, instances, events and control API."""

    def __init__(self, options: AgentOptions, router: Router | None = None) -> None:
        self.options = options
        self.dir = options.agent_dir
        self.started_at = time.time()
        self.redactor = Redactor()
        """The secret values of every spawn request seen: masked in events and the log."""
        self.events = EventLog(self.dir / EVENTS_NAME, redactor=self.redactor)
        self.supervisor = Supervisor(
            self.dir / INSTANCES_NAME,
            self.dir / "logs",
            on_event=self._event,
            on_exit=self._on_instance_exit,
            log_policy=options.log_policy,
        )
        self._requests: dict[str, tuple[SpawnRequest, bool]] = self._load_requests()
        """Spawn requests of replaceable instances by id, and whether they are complete (their
        secret values are known: false after an agent restart for instances with secrets)."""
        self._carry: dict[str, tuple[int, bool]] = {}
        """For a replacement: the short-lived predecessors so far, and whether the first one
        was routed (so the chain ends in the route even if a replacement dies in between)."""
        self._replacing: dict[str, asyncio.Task[None]] = {}
        self._generations: dict[str, int] = {}
        log_fd = None if options.log_file is None else sys.stderr.fileno()
        self.keeper = FdKeeperClient(self.dir, log_fd=log_fd) if options.keep_listeners else None
        self.router: Router = router if router is not None else self._make_router()
        self.routes: dict[str, RouteConfig] = {}
        self.inherited: set[str] = set()
        self.metrics_listen: str | None = None
        self._metrics_server: asyncio.Server | None = None
        self._routes_lock = asyncio.Lock()
        self.watches: dict[str, DriftWatch] = {}
        self._watch_tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._control: asyncio.Server | None = None
        table: list[tuple[str, dict[str, Handler]]] = [
            (r"/health", {"GET": self._health}),
            (r"/status", {"GET": self._status}),
            (r"/shutdown", {"POST": self._shutdown}),
            (r"/events", {"GET": self._events}),
            (r"/metrics", {"GET": self._metrics_get, "PUT": self._metrics_put}),
            (r"/routes", {"GET": self._routes_list}),
            (
                r"/routes/(?P<env>[^/]+)",
                {"GET": self._route_get, "PUT": self._route_put, "DELETE": self._route_delete},
            ),
            (r"/routes/(?P<env>[^/]+)/counters", {"GET": self._route_counters}),
            (r"/routes/(?P<env>[^/]+)/flip", {"POST": self._route_flip}),
            (r"/instances", {"GET": self._instances_list, "POST": self._instances_spawn}),
            (
                r"/instances/(?P<id>[^/]+)",
                {"GET": self._instance_get, "DELETE": self._instance_delete},
            ),
            (r"/instances/(?P<id>[^/]+)/logs", {"GET": self._instance_logs}),
            (r"/watches", {"GET": self._watches_list}),
            (r"/watches/(?P<env>[^/]+)", {"PUT": self._watch_put, "DELETE": self._watch_delete}),
        ]
        self._endpoints = [(re.compile(pattern), methods) for pattern, methods in table]

    # -- composition

    def _make_router(self) -> Router:
        if self.options.router == "haproxy":
            from castiron.traffic.haproxy import HaproxyRouter

            return HaproxyRouter(
                self.dir / "haproxy",
                haproxy_bin=self.options.haproxy_bin,
                access_log_dir=self.dir / ACCESS_LOG_DIR,
            )
        if self.options.router_workers == 0:
            from castiron.traffic.proxy import BuiltinRouter

            return BuiltinRouter(
                listen_socket_factory=self._listen_socket, access_log_dir=self.dir / ACCESS_LOG_DIR
            )
        from castiron.traffic.workers import WorkerPoolRouter

        return WorkerPoolRouter(
            self.options.router_workers,
            listen_socket_factory=self._listen_socket,
            access_log_dir=self.dir / ACCESS_LOG_DIR,
        )

    def _listen_socket(self, address: str) -> socket.socket:
        """The listening socket for ``address``: the kept one if any, else a new one."""
        if self.keeper is not None:
            kept = self.keeper.get(address)
            if kept is not None:
                kept.setblocking(False)
                self.inherited.add(address)
                log.info("listener %s taken over from the fd keeper", address)
                return kept
        host, port = split_address(address, "listen")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise RouterError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        sock.setblocking(False)
        if self.keeper is not None:
            try:
                self.keeper.put(address, sock)
            except AgentError as exc:
                log.warning("listener %s will not survive an agent restart: %s", address, exc)
        return sock

    def _event(self, event: AgentEvent) -> None:
        numbered = self.events.append(event)
        log.info(
            "event %d %s %s%s",
            numbered.seq,
            numbered.kind,
            numbered.instance or numbered.environment,
            f" ({numbered.detail})" if numbered.detail else "",
        )

    def _note(self, kind: EventKind, environment: str = "", detail: str = "") -> None:
        self._event(
            AgentEvent(seq=0, at=time.time(), kind=kind, environment=environment, detail=detail)
        )

    # -- life cycle

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until asked to stop (signal or API). The lock must already be held.

        Raises:
            AgentError: when the records are unreadable or the control socket cannot be bound.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        async with self._routes_lock:  # replacements of lost instances wait for the routes
            await self.supervisor.open()
            await self._restore_routes()
        self._restore_watches()
        metrics = self.options.metrics or self._recorded_metrics()
        if metrics:
            try:
                await self._set_metrics(metrics)
            except CastironError as exc:
                log.error("metrics listener %s not started: %s", metrics, exc)
        self._control = await self._bind_control()
        housekeeping = loop.create_task(self._housekeeping())
        self._note("agent-started", detail=f"pid {os.getpid()}")
        log.info("agent %d ready on %s", os.getpid(), self.dir / SOCKET_NAME)
        notifier = self.options.notifier
        notifier.ready(f"ready on {self.dir / SOCKET_NAME}")
        watchdog = loop.create_task(notifier.keep_alive())
        if ready is not None:
            ready()
        try:
            await self._stop.wait()
        finally:
            log.info("agent stopping")
            notifier.stopping()
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            self._control.close()
            with contextlib.suppress(FileNotFoundError):
                (self.dir / SOCKET_NAME).unlink()
            await self._close_metrics()
            try:
                await self.router.close()
            except Exception:
                log.exception("router close failed")
            if self.keeper is not None:
                self.keeper.quit()
            for task in [*self._replacing.values(), *self._watch_tasks.values()]:
                task.cancel()
            await self.supervisor.close()
            self._note("agent-stopped", detail=f"pid {os.getpid()}")
            log.info("agent stopped; instances left running: %d", self._running_count())

    async def _bind_control(self) -> asyncio.Server:
        path = self.dir / SOCKET_NAME
        tmp = self.dir / f".{SOCKET_NAME}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address, dir_fd = unix_address(tmp)
        try:
            sock.bind(address)
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)  # the socket appears under its name already 0600
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot bind the control socket {path}: {exc}") from exc
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        return await asyncio.start_unix_server(self._serve, sock=sock, limit=_MAX_HEAD)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(_HOUSEKEEPING_INTERVAL)
            self.supervisor.rotate_logs()
            log_file = self.options.log_file
            try:
                if log_file is not None and (
                    log_file.stat().st_size >= self.options.log_policy.max_bytes
                ):
                    rotate_file(log_file, self.options.log_policy.backups)
            except OSError as exc:
                log.warning("cannot rotate %s: %s", log_file, exc)

    def _running_count(self) -> int:
        return sum(1 for r in self.supervisor.records() if r.state == "running")

    # -- routes

    async def _restore_routes(self) -> None:
        path = self.dir / ROUTES_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            data = {"version": 1, "routes": {}}
        except (OSError, ValueError) as exc:
            raise AgentError(f"{path}: not a valid routes file: {exc}") from exc
        routes = data.get("routes") if isinstance(data, dict) else None
        if not isinstance(routes, dict):
            raise AgentError(f"{path}: not a valid routes file: routes: expected object")
        for env, raw in sorted(routes.items()):
            try:
                config = route_from_json(env, raw)
                await self.router.apply(config)
            except CastironError as exc:
                log.error("route %s not restored: %s", env, exc)
                self._note("route-failed", env, f"not restored: {exc}")
                continue
            self.routes[env] = config
            self._note("route-applied", env, f"restored on {config.listen}")
        if self.keeper is not None:
            wanted = {c.listen for c in self.routes.values()}
            for name in self.keeper.names():
                if name not in wanted:
                    self.keeper.delete(name)

    def _save_routes(self) -> None:
        write_json_atomic(
            self.dir / ROUTES_NAME,
            {"version": 1, "routes": {e: route_to_json(c) for e, c in sorted(self.routes.items())}},
        )

    def _route(self, env: str) -> RouteConfig:
        try:
            return self.routes[env]
        except KeyError:
            raise NotFoundError(f"no route for environment {env!r}") from None

    # -- drift watches

    def _restore_watches(self) -> None:
        path = self.dir / WATCHES_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("%s: not a valid watches file: %s", path, exc)
            return
        items = data.get("watches") if isinstance(data, dict) else None
        for i, raw in enumerate(items if isinstance(items, list) else []):
            try:
                watch = from_json(DriftWatch, raw, f"watches[{i}]")
            except UsageError as exc:
                log.error("drift watch not restored: %s", exc)
                continue
            self._start_watch(watch)

    def _save_watches(self) -> None:
        write_json_atomic(
            self.dir / WATCHES_NAME,
            {"version": 1, "watches": [to_json(w) for _, w in sorted(self.watches.items())]},
        )

    def _start_watch(self, watch: DriftWatch) -> None:
        old = self._watch_tasks.pop(watch.environment, None)
        if old is not None:
            old.cancel()
        self.watches[watch.environment] = watch
        task = asyncio.get_running_loop().create_task(self._watch_loop(watch))
        self._watch_tasks[watch.environment] = task

    async def _watch_loop(self, watch: DriftWatch) -> None:
        while True:
            await asyncio.sleep(watch.interval)
            try:
                await self._check_drift(watch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed check must not end the schedule
                log.error("drift check of %s failed: %r", watch.environment, exc)
                self._note("drift-check-failed", watch.environment, repr(exc)[:300])

    async def _check_drift(self, watch: DriftWatch) -> None:
        """Run one drift check and record what it found or fixed as events."""
        env = {**os.environ, **dict(watch.env), WATCHER_ENV: "1"}
        proc = await asyncio.create_subprocess_exec(
            *watch.argv,
            cwd=watch.cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), watch.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            why = f"timed out after {watch.timeout:g}s"
            self._note("drift-check-failed", watch.environment, why)
            return
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        env_name = watch.environment
        try:
            data = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self._note("drift-check-failed", env_name, f"status {proc.returncode}: {tail[0]}")
            return
        findings = data.get("findings") if isinstance(data, dict) else None
        if not isinstance(findings, list) or proc.returncode not in (0, 3):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self._note("drift-check-failed", env_name, f"status {proc.returncode}: {tail[0]}")
            return
        if findings:
            kinds = sorted({str(f.get("kind")) for f in findings if isinstance(f, dict)})
            self._note("drift-found", env_name, f"{len(findings)} finding(s): {', '.join(kinds)}")
        for report in data.get("environments") or []:
            fixed = report.get("fixed") if isinstance(report, dict) else None
            acted = ("replaced", "created", "destroyed", "strays_destroyed", "route_reapplied")
            if isinstance(fixed, dict) and any(fixed.get(k) for k in acted):
                self._note(
                    "drift-fixed",
                    env_name,
                    f"replaced {', '.join(fixed.get('replaced') or []) or 'none'}; "
                    f"strays destroyed {len(fixed.get('strays_destroyed') or [])}",
                )

    async def _watches_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"watches": [to_json(x) for _, x in sorted(self.watches.items())]}

    async def _watch_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        watch = from_json(DriftWatch, _json_body(request), "body")
        if watch.environment != p["env"]:
            raise UsageError(f"body.environment: {watch.environment!r} is not {p['env']!r}")
        if not watch.argv:
            raise UsageError("body.argv: the command is empty")
        if not 1.0 <= watch.interval <= 86400.0 or not 1.0 <= watch.timeout <= 86400.0:
            raise UsageError("body.interval, body.timeout: must be from 1 to 86400 seconds")
        if self.watches.get(watch.environment) != watch:  # the same again keeps its schedule
            self._start_watch(watch)
            self._save_watches()
        return to_json(watch)

    async def _watch_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        if env not in self.watches:
            raise NotFoundError(f"no drift watch for environment {env!r}")
        self.watches.pop(env)
        task = self._watch_tasks.pop(env, None)
        if task is not None:
            task.cancel()
        self._save_watches()
        return {"ok": True}

    # -- metrics

    def _recorded_metrics(self) -> str | None:
        try:
            value = json.loads((self.dir / METRICS_NAME).read_bytes()).get("listen")
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    async def _set_metrics(self, listen: str | None) -> None:
        if listen is not None:
            host, port = split_address(listen, "listen")
            if not is_loopback(host):
                raise UsageError(f"listen: the metrics listener must be on loopback, not {host}")
        await self._close_metrics()
        if listen is not None:
            try:
                self._metrics_server = await asyncio.start_server(
                    self._serve_metrics, host, port, reuse_address=True, limit=_MAX_HEAD
                )
            except OSError as exc:
                raise AgentError(f"cannot listen on {listen} for metrics: {exc}") from exc
        self.metrics_listen = listen

    async def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
            self._metrics_server = None
        self.metrics_listen = None

    async def _serve_metrics(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader), _HEAD_TIMEOUT)
            if request.path != "/metrics":
                raise HttpError(404, "try /metrics")
            if request.method not in ("GET", "HEAD"):
                raise HttpError(405, "use GET", {"Allow": "GET, HEAD"})
            text = prometheus_text({e: self.router.counters(e) for e in sorted(self.routes)})
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

    # -- replacement of exited instances

    def _load_requests(self) -> dict[str, tuple[SpawnRequest, bool]]:
        path = self.dir / REQUESTS_NAME
        try:
            data = json.loads(path.read_bytes())
            items = data["requests"]
            if not isinstance(items, dict):
                raise TypeError("requests: expected object")
            return {
                key: (
                    from_json(SpawnRequest, item["request"], f"requests.{key}"),
                    bool(item["complete"]),
                )
                for key, item in items.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
            log.error("%s unreadable, exited instances will not be replaced: %s", path, exc)
            return {}

    def _save_requests(self) -> None:
        # Secret values never reach the disk: only public_env values are written.
        items = {}
        for key, (spawn, complete) in sorted(self._requests.items()):
            public = {k: v for k, v in spawn.env.items() if k in spawn.public_env}
            items[key] = {
                "request": to_json(replace(spawn, env=public)),
                "complete": complete and len(public) == len(spawn.env),
            }
        try:
            write_json_atomic(self.dir / REQUESTS_NAME, {"version": 1, "requests": items})
        except OSError as exc:
            log.error("cannot write %s: %s", self.dir / REQUESTS_NAME, exc)

    def _remember(self, spawn: SpawnRequest) -> None:
        self._requests[spawn.id] = (spawn, True)
        self._save_requests()

    def _forget(self, instance_id: str) -> None:
        """Never replace ``instance_id`` (it is being stopped on request)."""
        task = self._replacing.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self._carry.pop(instance_id, None)
        if self._requests.pop(instance_id, None) is not None:
            self._save_requests()

    def _on_instance_exit(self, record: InstanceRecord) -> None:
        entry = self._requests.get(record.id)
        if entry is None or record.id in self._replacing:
            return
        spawn, complete = entry
        if not complete:
            self._requests.pop(record.id)
            self._save_requests()
            self._event(
                AgentEvent(
                    seq=0,
                    at=time.time(),
                    kind="instance-unreplaceable",
                    instance=record.id,
                    environment=record.environment,
                    release=record.release,
                    exit_code=record.exit_code,
                    detail="its secret values are not kept across agent restarts; "
                    "the next deploy or status reconciles it",
                )
            )
            return
        lived = (record.exited_at or time.time()) - record.started_at
        failures, routed = self._carry.pop(record.id, (0, False))
        if lived >= self.options.backoff.reset_after:
            failures = 0
        self._replacing[record.id] = asyncio.get_running_loop().create_task(
            self._replace(record, spawn, failures, routed)
        )

    async def _replace(
        self, dead: InstanceRecord, spawn: SpawnRequest, failures: int, routed: bool
    ) -> None:
        """Replace ``dead``: take it out of its route, wait, start, health-check, swap in."""
        try:
            routed = await self._unroute(dead) or routed
            if self._requests.pop(dead.id, None) is not None:
                self._save_requests()
            while True:
                await asyncio.sleep(self.options.backoff.delay(failures))
                failures += 1
                new_spawn = self._successor(spawn, dead.id)
                try:
                    record = self.supervisor.spawn(new_spawn, replaces=dead.id)
                except CastironError as exc:
                    self._replace_event("instance-replace-failed", dead, detail=str(exc))
                    continue
                self._carry[record.id] = (failures, routed)
                self._requests[record.id] = (new_spawn, True)
                self._save_requests()
                healthy, detail = await self._wait_healthy(record, new_spawn)
                if healthy:
                    break
                self._replace_event(
                    "instance-replace-failed", dead, detail=f"{record.id}: {detail}"
                )
                if record.id in self._replacing or self._state(record.id) != "running":
                    return  # it exited: its own replacement takes over
                self._forget(record.id)
                with contextlib.suppress(NotFoundError):
                    await self.supervisor.stop(record.id, grace=5.0)
            if routed:
                await self._route_in(dead, record)
            self._replace_event(
                "instance-replaced", dead, replaced_by=record.id, detail=f"now {record.address}"
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replacing %s failed", dead.id)
        finally:
            if self._replacing.get(dead.id) is asyncio.current_task():
                del self._replacing[dead.id]

    def _state(self, instance_id: str) -> str:
        try:
            return self.supervisor.get(instance_id).state
        except NotFoundError:
            return "gone"

    def _successor(self, spawn: SpawnRequest, dead_id: str) -> SpawnRequest:
        """The request of the next instance: a new id, a new port, its own instance dir."""
        root = re.sub(r"\.r\d+$", "", dead_id)
        match = re.search(r"\.r(\d+)$", dead_id)
        n = max(int(match.group(1)) if match else 0, self._generations.get(root, 0)) + 1
        known = {r.id for r in self.supervisor.records()}
        while f"{root}.r{n}" in known:
            n += 1
        self._generations[root] = n  # ids are never reused, even of stopped replacements
        new_id = f"{root}.r{n}"
        if len(new_id) > 128:
            new_id = f"{root[: 127 - len(f'.r{n}')]}.r{n}"
        env = dict(spawn.env)
        address = spawn.address
        if address:
            host, _ = split_address(address, "address")
            port = free_port(host)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if "PORT" in env:
                env["PORT"] = str(port)
        old_dir = spawn.instance_dir
        new_dir = str(Path(old_dir).with_name(new_id)) if old_dir else ""

        def rebase(value: str) -> str:
            if old_dir and (value == old_dir or value.startswith(old_dir + "/")):
                return new_dir + value[len(old_dir) :]
            return value

        return replace(
            spawn,
            id=new_id,
            env={k: rebase(v) for k, v in env.items()},
            argv=tuple(rebase(a) for a in spawn.argv),
            sandbox=tuple(rebase(a) for a in spawn.sandbox),
            cwd=rebase(spawn.cwd),
            address=address,
            instance_dir=new_dir,
        )

    async def _wait_healthy(self, record: InstanceRecord, spawn: SpawnRequest) -> tuple[bool, str]:
        """Probe ``record`` until healthy, exited, or past its deadline."""
        # Imported here: the health module is only needed once an instance must be replaced.
        from castiron.health import HealthTracker, probe

        check = spawn.health or HealthCheck()
        if not record.address:
            return True, "no address to probe"
        config = replace(check, kind="tcp") if check.kind == "none" else check
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = (
            started
            + check.start_period
            + check.healthy_after * (check.interval + check.timeout)
            + 30.0
        )
        tracker = HealthTracker(check=config, started_at=started)
        while True:
            current = self.supervisor.records()
            alive = next((r for r in current if r.id == record.id), None)
            if alive is None or alive.state != "running":
                return False, "exited before it became healthy"
            result = await loop.run_in_executor(None, probe, config, record.address, spawn.env)
            if tracker.record(result, time.monotonic()):
                return True, result.detail
            if time.monotonic() > deadline:
                return False, f"not healthy in time: {result.detail}"
            # Until the first success the instance is only starting up: look again soon.
            await asyncio.sleep(check.interval if tracker.streak else min(check.interval, 0.1))

    async def _unroute(self, dead: InstanceRecord) -> bool:
        """Take ``dead`` out of its environment's route; True when it was in it."""
        async with self._routes_lock:
            config = self.routes.get(dead.environment)
            if config is None:
                return False
            stable, canary = (_without(s, dead.id) for s in (config.stable, config.canary))
            if stable == config.stable and canary == config.canary:
                return False
            new = replace(config, stable=stable, canary=canary)
            await self._apply_locked(new, f"without {dead.id}")
            return True

    async def _route_in(self, dead: InstanceRecord, new: InstanceRecord) -> None:
        """Add ``new`` where ``dead`` served, if its release is still routed there."""
        async with self._routes_lock:
            config = self.routes.get(dead.environment)
            if config is None:
                return
            why = f"{new.id} replaces {dead.id}"
            backend = Backend(new.id, new.address)
            stable, canary = config.stable, config.canary
            if stable is not None and stable.release == new.release:
                stable = _with(stable, backend)
            elif canary is not None and canary.release == new.release:
                canary = _with(canary, backend)
            else:
                return
            await self._apply_locked(replace(config, stable=stable, canary=canary), why)

    async def _apply_locked(self, config: RouteConfig, why: str) -> None:
        try:
            await self.router.apply(config)
        except CastironError as exc:
            self._note("route-failed", config.environment, f"{why}: {exc}")
            return
        self.routes[config.environment] = config
        self._save_routes()
        self._note("route-applied", config.environment, why)

    def _replace_event(
        self, kind: EventKind, dead: InstanceRecord, *, replaced_by: str = "", detail: str = ""
    ) -> None:
        self._event(
            AgentEvent(
                seq=0,
                at=time.time(),
                kind=kind,
                instance=dead.id,
                environment=dead.environment,
                release=dead.release,
                pid=dead.pid,
                exit_code=dead.exit_code,
                detail=detail,
                replaced_by=replaced_by,
            )
        )

    # -- control API

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, payload, headers = 200, b"", {}
        try:
            try:
                request = await asyncio.wait_for(read_request(reader), _HEAD_TIMEOUT)
                result = await self._dispatch(request, writer)
                if isinstance(result, _Streamed):
                    return
                if isinstance(result, tuple):
                    status, obj = result
                else:
                    obj = result
                payload = json.dumps(obj, sort_keys=True).encode()
            except TimeoutError:
                status, payload = 408, b'{"error": "request head not received in time"}'
            except HttpError as exc:
                status, headers = exc.status, exc.headers
                payload = json.dumps({"error": exc.reason}).encode()
            except NotFoundError as exc:
                status, payload = 404, json.dumps({"error": str(exc)}).encode()
            except UsageError as exc:
                status, payload = 400, json.dumps({"error": str(exc)}).encode()
            except CastironError as exc:
                status, payload = 409, json.dumps({"error": str(exc)}).encode()
            except Exception as exc:
                log.error("internal error: %s", "".join(traceback.format_exception(exc)))
                status = 500
                payload = json.dumps({"error": f"internal error: {exc!r}"}).encode()
            writer.write(response_bytes(status, payload, headers=headers))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _dispatch(self, request: Request, writer: asyncio.StreamWriter) -> object:
        prefix = f"/{API_VERSION}"
        if not request.path.startswith(prefix + "/"):
            raise HttpError(404, f"no such endpoint: {request.path} (the API lives under {prefix})")
        path = request.path[len(prefix) :]
        for pattern, methods in self._endpoints:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise HttpError(
                    405,
                    f"{request.method} not allowed on {request.path}; use {allowed}",
                    {"Allow": allowed},
                )
            return await handler(request, writer, match.groupdict())
        raise HttpError(404, f"no such endpoint: {request.path}")

    async def _health(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        return {"ok": True, "pid": os.getpid()}

    async def _status(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        records = self.supervisor.records()
        return to_json(
            AgentStatus(
                pid=os.getpid(),
                home=str(self.options.home),
                version=__version__,
                started_at=self.started_at,
                uptime_s=round(time.time() - self.started_at, 3),
                router=self.router.name,
                routes=tuple(sorted(self.routes)),
                instances=len(records),
                running_instances=sum(1 for r in records if r.state == "running"),
                adopted_instances=sum(1 for r in records if r.adopted),
                inherited_listeners=tuple(sorted(self.inherited)),
                metrics=self.metrics_listen,
                last_event=self.events.last_seq,
            )
        )

    async def _shutdown(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        asyncio.get_running_loop().call_later(0.01, self._stop.set)
        return {"ok": True, "pid": os.getpid()}

    async def _events(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        since = int(_query_number(request, "since", 0, 0, 2**53))
        return {
            "events": [to_json(e) for e in self.events.since(since)],
            "last": self.events.last_seq,
        }

    async def _metrics_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"listen": self.metrics_listen}

    async def _metrics_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        data = _json_body(request)
        if not isinstance(data, dict):
            raise UsageError("body: expected object")
        unknown = sorted(set(data) - {"listen"})
        if unknown:
            raise UsageError(f"body: unknown field {unknown[0]!r}")
        listen = data.get("listen")
        if listen is not None and not isinstance(listen, str):
            raise UsageError("body.listen: expected string or null")
        await self._set_metrics(listen)
        write_json_atomic(self.dir / METRICS_NAME, {"listen": listen})
        return {"listen": self.metrics_listen}

    async def _routes_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"routes": {e: route_to_json(c) for e, c in sorted(self.routes.items())}}

    async def _route_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return route_to_json(self._route(p["env"]))

    async def _route_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        config = route_from_json(env, _json_body(request))
        async with self._routes_lock:
            old = self.routes.get(env)
            clash = [e for e, c in self.routes.items() if e != env and c.listen == config.listen]
            if clash:
                raise UsageError(f"body.listen: {config.listen} is already used by {clash[0]!r}")
            # A moved listener: the router opens the new one, then drains the old one.
            await self.router.apply(config)
            self.routes[env] = config
            self._save_routes()
            if old is not None and old.listen != config.listen and self.keeper is not None:
                self.keeper.delete(old.listen)
        releases = [s.release for s in (config.stable, config.canary) if s is not None]
        self._note("route-applied", env, f"{config.listen} -> {', '.join(releases) or 'none'}")
        return route_to_json(config)

    async def _route_flip(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        """Switch to warm backends in one request: check the route still serves ``expect``,
        probe each new backend once with ``check``, then apply; on any failure nothing changes
        and the answer says why (``flipped: false``)."""
        env = p["env"]
        body = _json_body(request)
        if not isinstance(body, dict):
            raise UsageError("body: expected a JSON object")
        config = route_from_json(env, body.get("route"))
        expect = body.get("expect")
        if expect is not None and not isinstance(expect, str):
            raise UsageError("body.expect: expected string or null")
        check = from_json(HealthCheck, body.get("check", {}), "body.check")
        probe_env = body.get("env", {})
        if not isinstance(probe_env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in probe_env.items()
        ):
            raise UsageError("body.env: expected an object of strings")
        if config.stable is None or not config.stable.backends or config.canary is not None:
            raise UsageError("body.route: a flip needs a stable backend set and no canary")
        async with self._routes_lock:
            old = self.routes.get(env)
            previous = None if old is None else route_to_json(old)
            serving = None if old is None or old.stable is None else old.stable.release
            if old is not None and old.canary is not None and old.canary_weight:
                serving = None
            if serving != expect:
                why = f"route serves {serving or 'nothing'}, expected {expect or 'nothing'}"
                return {"flipped": False, "reason": why, "previous": previous}
            clash = [e for e, c in self.routes.items() if e != env and c.listen == config.listen]
            if clash:
                raise UsageError(f"body.listen: {config.listen} is already used by {clash[0]!r}")
            failed = await self._probe_all(config.stable.backends, check, probe_env)
            if failed:
                return {"flipped": False, "reason": "; ".join(failed), "previous": previous}
            await self.router.apply(config)
            self.routes[env] = config
            self._save_routes()
            if old is not None and old.listen != config.listen and self.keeper is not None:
                self.keeper.delete(old.listen)
        self._note("route-applied", env, f"{config.listen} -> {config.stable.release} (flip)")
        return {"flipped": True, "reason": "", "previous": previous}

    async def _probe_all(
        self, backends: tuple[Backend, ...], check: HealthCheck, env: dict[str, str]
    ) -> list[str]:
        """Probe every backend once, concurrently; the failures as ``id: detail``."""
        # Imported here: the health module is only needed for flips and replacements.
        from castiron.health import probe

        kind = "tcp" if check.kind == "none" else check.kind
        config = replace(check, kind=kind, healthy_after=1, start_period=0.0)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(None, probe, config, b.address, env) for b in backends)
        )
        return [f"{b.id}: {r.detail}" for b, r in zip(backends, results, strict=True) if not r.ok]

    async def _route_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        async with self._routes_lock:
            config = self._route(env)
            await self.router.remove(env)
            self.routes.pop(env)
            self._save_routes()
            if self.keeper is not None:
                self.keeper.delete(config.listen)
        self._note("route-removed", env, config.listen)
        return {"ok": True}

    async def _route_counters(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        self._route(env)
        return {"environment": env, "counters": counters_to_json(self.router.counters(env))}

    async def _instances_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = request.query.get("environment") or None
        return {"instances": [to_json(r) for r in self.supervisor.records(env)]}

    async def _instances_spawn(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        spawn = from_json(SpawnRequest, _json_body(request), "body")
        self.redactor.add(spawn.env[k] for k in spawn.secret_env if k in spawn.env)
        _check_health(spawn.health)
        record = self.supervisor.spawn(spawn)
        if spawn.replace:
            self._remember(spawn)
        return 201, to_json(record)

    async def _instance_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return to_json(self.supervisor.get(p["id"]))

    async def _instance_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        grace = _query_number(request, "grace", 10.0, 0.0, 3600.0)
        self.supervisor.get(p["id"])
        self._forget(p["id"])
        final = await self.supervisor.stop(p["id"], grace)
        # An instance that died was replaced under a new id the caller may not know yet: it
        # asked for the instance's place to go, so its replacements go too (else they leak).
        for successor in self._successors(p["id"]):
            self._forget(successor)
            with contextlib.suppress(NotFoundError):
                await self.supervisor.stop(successor, grace)
        return to_json(final)

    def _successors(self, instance_id: str) -> list[str]:
        """The replacements of ``instance_id`` (and theirs), as the supervisor records them."""
        out: list[str] = []
        frontier = {instance_id}
        while frontier:
            found = [r.id for r in self.supervisor.records() if r.replaces in frontier]
            found = [i for i in found if i not in out]
            out += found
            frontier = set(found)
        return out

    async def _instance_logs(
        self, request: Request, writer: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        path = self.supervisor.log_path(p["id"])
        lines = int(_query_number(request, "lines", 100, 0, 100_000))
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        text, offset = tail_file(path, lines)
        if not follow:
            return {"id": p["id"], "text": text.decode("utf-8", errors="replace")}
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Connection: close\r\n\r\n" + text
        )
        await writer.drain()
        await self._follow(p["id"], path, offset, writer)
        return STREAMED

    async def _follow(
        self, instance_id: str, path: Path, offset: int, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while not self._stop.is_set():
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size < offset:  # rotated by copy-truncate
                    offset = 0
                if size > offset:
                    with path.open("rb") as fh:
                        fh.seek(offset)
                        chunk = fh.read(size - offset)
                    offset += len(chunk)
                    writer.write(chunk)
                    await writer.drain()
                    continue
                try:
                    record = self.supervisor.get(instance_id)
                except NotFoundError:
                    break
                if record.state != "running" or writer.is_closing():
                    break
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            writer.close()


def _without(backend_set: BackendSet | None, instance_id: str) -> BackendSet | None:
    if backend_set is None or all(b.id != instance_id for b in backend_set.backends):
        return backend_set
    kept = tuple(b for b in backend_set.backends if b.id != instance_id)
    return BackendSet(backend_set.release, kept)


def _with(backend_set: BackendSet, backend: Backend) -> BackendSet:
    if any(b.id == backend.id for b in backend_set.backends):
        return backend_set
    return BackendSet(backend_set.release, (*backend_set.backends, backend))


def _check_health(check: HealthCheck | None) -> None:
    """Refuse a health check the agent could not run.

    Raises:
        UsageError: naming the bad field.
    """
    if check is None:
        return
    for name in ("interval", "timeout", "start_period"):
        value = getattr(check, name)
        if not 0 <= value < 86400:
            raise UsageError(f"body.health.{name}: must be between 0 and 86400 seconds")
    if check.interval <= 0 or check.timeout <= 0:
        raise UsageError("body.health: interval and timeout must be positive")
    if check.healthy_after < 1:
        raise UsageError("body.health.healthy_after: must be at least 1")
    if check.kind == "http" and not check.target.startswith("/"):
        raise UsageError("body.health.target: an http check needs a path starting with '/'")
    if check.kind == "command":
        try:
            argv = json.loads(check.target)
        except ValueError:
            argv = None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            raise UsageError("body.health.target: a command check needs a JSON array of strings")


def tail_file(path: Path, lines: int) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and the file's size (where following starts)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            if lines <= 0:
                return b"", size
            block = 65536
            pos = size
            data = b""
            while pos > 0 and data.count(b"\n") <= lines:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except FileNotFoundError:
        return b"", 0
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept), size


# --- entry point ----------------------------------------------------------------------------------


def prepare_dir(agent_dir: Path) -> None:
    """Create ``agent_dir`` with mode 0700 (and tighten it when it exists).

    Raises:
        AgentError: when it cannot be created.
    """
    try:
        make_private_dir(agent_dir)
    except OSError as exc:
        raise AgentError(f"cannot create the agent directory {agent_dir}: {exc}") from exc


class _MaskFilter(logging.Filter):
    """Masks secret values in every record a handler writes."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if self.redactor:
            record.msg = self.redactor.text(record.getMessage())
            record.args = None
        return True


def mask_log(redactor: Redactor) -> None:
    """Mask ``redactor``'s values in everything the process logs (the agent's log file)."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_MaskFilter(redactor))


async def serve(options: AgentOptions) -> None:
    """Run the agent of ``options.home`` until it is told to stop.

    Raises:
        AgentError: when another agent runs for the same home, or the agent cannot start.
    """
    agent_dir = options.agent_dir
    prepare_dir(agent_dir)
    lock_fd = acquire_lock(agent_dir)
    pid_path = agent_dir / PID_NAME
    try:
        fd = open_private(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "w") as out:
            out.write(f"{os.getpid()}\n")
        agent = Agent(options)
        mask_log(agent.redactor)
        await agent.run()
    finally:
        with contextlib.suppress(OSError):
            if pid_path.read_text().strip() == str(os.getpid()):
                pid_path.unlink()
        os.close(lock_fd)


def _parse_args(argv: list[str] | None) -> AgentOptions:
    parser = argparse.ArgumentParser(
        prog="python -m castiron.agent.daemon",
        description="Run the castiron host agent in the foreground.",
    )
    parser.add_argument("--home", type=Path, required=True, help="The CASTIRON_HOME to serve.")
    parser.add_argument("--router", choices=("builtin", "haproxy"), default="builtin")
    parser.add_argument("--haproxy-bin", default="haproxy", help="The haproxy executable.")
    parser.add_argument(
        "--router-workers",
        type=int,
        default=None,
        help="Processes of the builtin router (default: one per CPU, at most 8; 0: in the agent).",
    )
    parser.add_argument("--metrics", default=None, help="Loopback HOST:PORT for Prometheus.")
    parser.add_argument("--log-file", type=Path, default=None, help="Rotate this log file.")
    parser.add_argument("--log-max-bytes", type=int, default=LogPolicy.max_bytes)
    parser.add_argument("--log-backups", type=int, default=LogPolicy.backups)
    parser.add_argument(
        "--no-keep-listeners",
        action="store_true",
        help="Do not hand listening sockets to the fd keeper.",
    )
    args = parser.parse_args(argv)
    if args.router_workers is not None and not 0 <= args.router_workers <= 256:
        parser.error("--router-workers must be between 0 and 256")
    if args.log_max_bytes < 1024 or args.log_backups < 0:
        parser.error("--log-max-bytes must be at least 1024 and --log-backups at least 0")
    return AgentOptions(
        home=args.home.absolute(),
        router=args.router,
        router_workers=args.router_workers,
        haproxy_bin=args.haproxy_bin,
        metrics=args.metrics,
        log_file=args.log_file.absolute() if args.log_file else None,
        log_policy=LogPolicy(max_bytes=args.log_max_bytes, backups=args.log_backups),
        keep_listeners=not args.no_keep_listeners,
        notifier=Notifier.from_environ(os.environ, os.getpid()),
    )


def _event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed (the builtin router's sockets run on it),
    else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m castiron.agent.daemon``; returns the exit status."""
    options = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with asyncio.Runner(loop_factory=_event_loop) as runner:
            runner.run(serve(options))
    except CastironError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(exc.exit_code)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            sys.stderr.write(f"error: {exc}\n")
            return 1
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
