"""The agent process: composes the supervisor, the routes, replacement, watches and metrics.

Owns the agent's life cycle (one agent per ``CASTIRON_HOME``: an exclusive ``flock`` on
``agent/agent.lock`` held for the agent's life, and ``agent/agent.pid``) and the control
socket (HTTP/1.1 + JSON on the Unix socket ``agent/agent.sock``, mode 0600, in a 0700
directory). The parts it wires together own the rest:

* :mod:`~castiron.agent.http` reads requests and writes answers for the control API;
* :mod:`~castiron.agent.api` handles each endpoint;
* :mod:`~castiron.agent.events` keeps the event list (``agent/events.jsonl``);
* :mod:`~castiron.agent.routing` keeps the router and the routes (``agent/routes.json``);
* :mod:`~castiron.agent.replacement` replaces instances spawned with ``replace`` when they
  exit (``agent/requests.json``);
* :mod:`~castiron.agent.watches` runs the drift watches (``agent/watches.json``);
* :mod:`~castiron.agent.metrics` serves the optional Prometheus listener.

On start it adopts the instances a previous agent left running, takes the listening sockets
back from the fd keeper and re-applies the recorded routes, so listeners are back within a
second of a restart.

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
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from castiron.agent.api import ControlApi
from castiron.agent.client import unix_address
from castiron.agent.events import EVENTS_NAME, EventLog
from castiron.agent.fdkeeper import FdKeeperClient
from castiron.agent.http import MAX_HEAD, Endpoints
from castiron.agent.lifecycle import LOCK_NAME, PID_NAME, SOCKET_NAME
from castiron.agent.metrics import MetricsListener
from castiron.agent.notify import Notifier
from castiron.agent.replacement import ReplaceBackoff, Replacer
from castiron.agent.routing import RouteTable
from castiron.agent.supervisor import LogPolicy, Supervisor, rotate_file
from castiron.agent.watches import WatchScheduler
from castiron.agent.wire import InstanceRecord
from castiron.errors import AgentError, CastironError
from castiron.filemodes import make_private_dir, open_private
from castiron.redact import Redactor
from castiron.traffic.base import Router

log = logging.getLogger("castiron.agent")

INSTANCES_NAME = "instances.json"
_HOUSEKEEPING_INTERVAL = 1.0


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


# --- the agent ------------------------------------------------------------------------------------


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
            on_event=self.events.record,
            on_exit=self._on_instance_exit,
            log_policy=options.log_policy,
        )
        log_fd = None if options.log_file is None else sys.stderr.fileno()
        keeper = FdKeeperClient(self.dir, log_fd=log_fd) if options.keep_listeners else None
        self.routing = RouteTable(self.dir, options, self.events, keeper, router)
        self.replacer = Replacer(
            self.dir, self.supervisor, self.routing, self.events, options.backoff
        )
        self.metrics = MetricsListener(self.dir, self.routing)
        self.watches = WatchScheduler(self.dir, self.events)
        self._stop = asyncio.Event()
        self._control: asyncio.Server | None = None
        self.api = ControlApi(
            home=options.home,
            agent_dir=self.dir,
            started_at=self.started_at,
            redactor=self.redactor,
            events=self.events,
            supervisor=self.supervisor,
            routing=self.routing,
            replacer=self.replacer,
            watches=self.watches,
            metrics=self.metrics,
            stop=self._stop,
        )
        self.endpoints = Endpoints(self.api.table())

    @property
    def keeper(self) -> FdKeeperClient | None:
        """The fd keeper that holds the listening sockets across restarts (None: not used)."""
        return self.routing.keeper

    def _on_instance_exit(self, record: InstanceRecord) -> None:
        self.replacer.on_instance_exit(record)

    # -- life cycle

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until asked to stop (signal or API). The lock must already be held.

        Raises:
            AgentError: when the records are unreadable or the control socket cannot be bound.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        async with self.routing.lock:  # replacements of lost instances wait for the routes
            await self.supervisor.open()
            await self.routing.restore()
        self.watches.restore()
        metrics = self.options.metrics or self.metrics.recorded()
        if metrics:
            try:
                await self.metrics.set(metrics)
            except CastironError as exc:
                log.error("metrics listener %s not started: %s", metrics, exc)
        self._control = await self._bind_control()
        housekeeping = loop.create_task(self._housekeeping())
        self.events.note("agent-started", detail=f"pid {os.getpid()}")
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
            await self.metrics.close()
            try:
                await self.routing.router.close()
            except Exception:
                log.exception("router close failed")
            if self.keeper is not None:
                self.keeper.quit()
            for task in [*self.replacer.replacing.values(), *self.watches.tasks.values()]:
                task.cancel()
            await self.supervisor.close()
            self.events.note("agent-stopped", detail=f"pid {os.getpid()}")
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
        return await asyncio.start_unix_server(self.endpoints.serve, sock=sock, limit=MAX_HEAD)

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
