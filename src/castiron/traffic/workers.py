"""The builtin data plane on every core: N router worker processes, one control point.

:class:`WorkerPoolRouter` implements :class:`castiron.traffic.base.Router` by running N
:mod:`castiron.traffic.worker` processes, each a :class:`castiron.traffic.proxy.BuiltinRouter`
on its own event loop. It owns:

- **one listening socket per environment**, opened here (or taken from the fd keeper through
  the listen socket factory) and handed to every worker, which all accept on it. The pool keeps
  its own copy open, so a worker that dies takes no listener with it: the kernel goes on
  queueing connections for the others (and for its replacement) and never refuses one;
- **one atomic switch**: :meth:`apply` sends the configuration to every worker and returns only
  once each has installed it (an acknowledged broadcast). A worker parses a request's headers
  and routes it on its own event loop, one callback at a time, so a request whose bytes arrive
  after :meth:`apply` returned is routed by the new configuration in every worker. A worker
  that does not acknowledge within ``ack_timeout`` is killed before :meth:`apply` returns, so
  no release the pool switched away from serves another request;
- **exact counters**: :meth:`counters` asks every worker and sums per release (counts and
  histogram buckets add up; percentiles come from the summed histogram). A worker's counters
  are read every second too, and those of a worker that died are kept (what it counted after
  its last read is lost with it);
- **restarts**: a worker that exits is replaced (at once, then with a growing delay while
  replacements keep dying young) and given every current route before it accepts.

Draining: :meth:`remove` and :meth:`close` return once every worker has drained.

It knows nothing of the agent, runtimes, the spec or the state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from castiron.errors import RouterError
from castiron.httpcodec import ParserKind
from castiron.traffic.base import ReleaseCounters, RouteConfig
from castiron.traffic.proxy import bind_listener, validate_route
from castiron.traffic.stats import merge_counters
from castiron.traffic.worker import MAX_MESSAGE, SLOTS, ConnectionTable

__all__ = ["DEFAULT_MAX_WORKERS", "WorkerPoolRouter", "default_workers"]

log = logging.getLogger("castiron.traffic.workers")

_COUNTERS_TIMEOUT = 2.0
"""How long :meth:`WorkerPoolRouter.counters` waits for a worker's answer."""
_POLL_INTERVAL = 1.0
"""How often workers' counters are read in the background (what a crash can lose)."""
_RESTART_MAX = 5.0
_LIVED_LONG = 10.0
"""A worker that lived this long is replaced at once when it dies."""


DEFAULT_MAX_WORKERS = 8
"""The default worker count is one per CPU, but no more than this (ask for more explicitly)."""


def default_workers() -> int:
    """One worker per CPU this process may run on, at most ``DEFAULT_MAX_WORKERS``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, DEFAULT_MAX_WORKERS))


class _Dead:
    """The answer of a worker that exited before answering."""


_DEAD = _Dead()


class _Proc:
    """The pool's handle on one worker process and its channel."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: socket.socket):
        self.index = index
        self.proc = proc
        self.channel = channel
        self.started_at = time.monotonic()
        self.alive = True
        self.ready = False
        """True once it answered a command (it has every route given at its start)."""
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[tuple[bool, Any]]] = {}
        self.last: dict[str, list[ReleaseCounters]] = {}
        """Its counters at the last read, per environment."""
        self.on_exit: Callable[[_Proc], None] = lambda proc: None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(
        self, verb: str, arg: object, fds: Sequence[int] = ()
    ) -> asyncio.Future[tuple[bool, Any]]:
        """Send one command; the future gets ``(ok, result)`` or ``(False, _DEAD)``."""
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        if not self.alive:
            fut.set_result((False, _DEAD))
            return fut
        self.next_id += 1
        ident = self.next_id
        data = pickle.dumps((ident, verb, arg), pickle.HIGHEST_PROTOCOL)
        self.pending[ident] = fut
        try:
            self._send(data, fds)
        except OSError as exc:
            log.warning("router worker %d (pid %d): channel failed: %s", self.index, self.pid, exc)
            self.kill()
            self.gone()
        return fut

    def _send(self, data: bytes, fds: Sequence[int]) -> None:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                socket.send_fds(self.channel, [data], list(fds))
                return
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError("the worker does not read its channel") from None
                select.select([], [self.channel], [], left)

    def readable(self) -> None:
        """Read every waiting reply (from the event loop's reader, or a synchronous wait)."""
        while self.alive:
            try:
                data = self.channel.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.gone()
                return
            try:
                ident, ok, result = pickle.loads(data)
            except Exception:
                log.error("router worker %d (pid %d): unreadable reply", self.index, self.pid)
                self.kill()
                self.gone()
                return
            self.ready = True
            fut = self.pending.pop(ident, None)
            if fut is not None and not fut.done():
                fut.set_result((bool(ok), result))

    def gone(self) -> None:
        """The channel closed: the worker exited (or is being killed)."""
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
        self.channel.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result((False, _DEAD))
        self.on_exit(self)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.send_signal(signal.SIGKILL)


class WorkerPoolRouter:
    """The builtin data plane in N worker processes (implements ``Router``)."""

    name = "builtin"

    def __init__(
        self,
        workers: int | None = None,
        *,
        listen_socket_factory: Callable[[str], socket.socket] | None = None,
        parser: ParserKind = "auto",
        access_log_dir: Path | None = None,
        ack_timeout: float = 10.0,
    ) -> None:
        self.size = workers if workers is not None else default_workers()
        if self.size < 1:
            raise RouterError(f"router workers: {self.size} is not at least 1")
        self._factory = listen_socket_factory
        self.parser_kind: ParserKind = parser
        self.access_log_dir = access_log_dir
        """Where environments with ``access_log`` write ``ENV.log`` (every worker appends whole
        lines to the same file)."""
        self.ack_timeout = ack_timeout
        self._procs: dict[int, _Proc] = {}
        self._configs: dict[str, RouteConfig] = {}
        self._sockets: dict[str, tuple[str, socket.socket]] = {}
        self._retired: dict[str, list[ReleaseCounters]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fails: dict[int, int] = {}
        self._restart_handles: dict[int, asyncio.TimerHandle] = {}
        self._reaping: set[subprocess.Popen[bytes]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self._table_fd = os.memfd_create("castiron-router-connections", os.MFD_CLOEXEC)
        os.ftruncate(self._table_fd, SLOTS * self.size * 8)
        self._table = ConnectionTable(self._table_fd, self.size, 0)
        self._slots: dict[str, int] = {}
        self.restarts = 0
        """Workers replaced after they exited, since the pool started."""

    # --- workers ---
    def pids(self) -> list[int]:
        """Process ids of the workers running now, by worker index."""
        return [p.pid for _, p in sorted(self._procs.items()) if p.alive]

    def _started(self) -> None:
        if self._poller is None:
            loop = asyncio.get_running_loop()
            for index in range(self.size):
                self._spawn(index)
            self._poller = loop.create_task(self._poll())

    def _spawn(self, index: int) -> None:
        self._restart_handles.pop(index, None)
        if self._closing:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [
            sys.executable,
            "-m",
            "castiron.traffic.worker",
            "--channel",
            str(child.fileno()),
            "--parser",
            self.parser_kind,
            "--table",
            str(self._table_fd),
            "--workers",
            str(self.size),
            "--index",
            str(index),
        ]
        if self.access_log_dir is not None:
            argv += ["--access-log-dir", str(self.access_log_dir)]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                pass_fds=(child.fileno(), self._table_fd),
                close_fds=True,
            )
        except OSError as exc:
            parent.close()
            log.error("router worker %d cannot start: %s", index, exc)
            self._schedule_restart(index)
            return
        finally:
            child.close()
        parent.setblocking(False)
        worker = _Proc(index, proc, parent)
        worker.on_exit = self._exited
        self._procs[index] = worker
        asyncio.get_running_loop().add_reader(parent.fileno(), worker.readable)
        log.info("router worker %d started (pid %d)", index, proc.pid)
        for env, config in list(self._configs.items()):
            fut = worker.request(
                "apply", (config, self._slots.get(env)), [self._sockets[env][1].fileno()]
            )
            fut.add_done_callback(functools.partial(self._check_start, worker, env))

    def _check_start(self, worker: _Proc, env: str, fut: asyncio.Future[tuple[bool, Any]]) -> None:
        ok, result = fut.result()
        if not ok and result is not _DEAD:
            log.error("router worker %d: route %s not applied: %s", worker.index, env, result)

    def _exited(self, worker: _Proc) -> None:
        for env, counters in worker.last.items():
            if env in self._configs:
                self._retired[env] = merge_counters(self._retired.get(env, []), counters)
        worker.last = {}
        self._table.clear_worker(worker.index)
        self._reap(worker.proc)
        if self._procs.get(worker.index) is worker and not self._closing:
            log.warning("router worker %d (pid %d) exited; replacing it", worker.index, worker.pid)
            if time.monotonic() - worker.started_at >= _LIVED_LONG:
                self._fails[worker.index] = 0
            self.restarts += 1
            self._schedule_restart(worker.index)

    def _schedule_restart(self, index: int) -> None:
        if self._closing:
            return
        fails = self._fails.get(index, 0)
        self._fails[index] = fails + 1
        delay = 0.0 if fails == 0 else min(_RESTART_MAX, 0.1 * 2.0 ** min(fails, 16))
        loop = asyncio.get_running_loop()
        self._restart_handles[index] = loop.call_later(delay, self._spawn, index)

    def _reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            self._reaping.discard(proc)
            return
        self._reaping.add(proc)
        asyncio.get_running_loop().call_later(0.05, self._reap, proc)

    def _live(self) -> list[_Proc]:
        return [p for _, p in sorted(self._procs.items()) if p.alive]

    async def _broadcast(
        self, verb: str, arg: object, fds: Sequence[int] = (), timeout: float = 0.0
    ) -> list[tuple[bool, Any]]:
        """Send a command to every live worker and wait for each answer; a worker that does
        not answer within ``timeout`` (default ``ack_timeout``) is killed, and counts as done:
        a dead worker serves nothing."""
        workers = self._live()
        futs = [w.request(verb, arg, fds) for w in workers]
        if not futs:
            return []
        _, late = await asyncio.wait(futs, timeout=timeout or self.ack_timeout)
        for worker, fut in zip(workers, futs, strict=True):
            if fut in late:
                log.error(
                    "router worker %d (pid %d) did not acknowledge %s; killing it",
                    worker.index,
                    worker.pid,
                    verb,
                )
                worker.kill()
                worker.gone()
        return [f.result() for f in futs]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            workers = [w for w in self._live() if w.ready]
            futs = [w.request("counters", None) for w in workers]
            for worker, fut in zip(workers, futs, strict=True):
                with contextlib.suppress(TimeoutError):
                    ok, result = await asyncio.wait_for(fut, _COUNTERS_TIMEOUT)
                    if ok and worker.alive:
                        worker.last = {e: c for e, c in result.items() if e in self._configs}

    # --- Router ---
    def _lock(self, environment: str) -> asyncio.Lock:
        lock = self._locks.get(environment)
        if lock is None:
            lock = self._locks[environment] = asyncio.Lock()
        return lock

    def _open(self, config: RouteConfig) -> socket.socket:
        if self._factory is None:
            return bind_listener(config.listen, config.environment)
        try:
            sock = self._factory(config.listen)
        except OSError as exc:
            raise RouterError(
                f"environment {config.environment}: cannot listen on {config.listen}: {exc}"
            ) from exc
        sock.setblocking(False)
        return sock

    async def apply(self, config: RouteConfig) -> None:
        """Switch every worker to ``config``; returns once each has installed it.

        Raises:
            RouterError: when the config is invalid, its listener cannot be opened, a worker
                refused it, or no worker is running to take it.
        """
        validate_route(config)
        if self._closing:
            raise RouterError(f"environment {config.environment}: the router is closing")
        env = config.environment
        async with self._lock(env):
            held = self._sockets.get(env)
            old: socket.socket | None = None
            if held is None or held[0] != config.listen:
                sock = self._open(config)
                old = held[1] if held is not None else None
                self._sockets[env] = (config.listen, sock)
            else:
                sock = held[1]
            previous = self._configs.get(env)
            self._configs[env] = config
            if env not in self._slots:
                free = sorted(set(range(SLOTS)) - set(self._slots.values()))
                if free:  # beyond SLOTS environments, each worker counts its own clients
                    self._slots[env] = free[0]
            self._started()
            # a moved listener drains the old one inside the workers' apply
            wait = self.ack_timeout
            if old is not None and previous is not None:
                wait += previous.drain_timeout
            results = await self._broadcast(
                "apply", (config, self._slots.get(env)), [sock.fileno()], wait
            )
            if old is not None:
                old.close()
            refused = [r for ok, r in results if not ok and r is not _DEAD]
            if refused:
                raise RouterError(f"environment {env}: a router worker refused: {refused[0]}")
            if not any(ok for ok, _ in results):
                raise RouterError(
                    f"environment {env}: no router worker is running "
                    "(they keep exiting: see the agent log)"
                )

    async def remove(self, environment: str) -> None:
        """Drain (up to the environment's ``drain_timeout``) and close its listener in every
        worker; returns once all have."""
        async with self._lock(environment):
            config = self._configs.pop(environment, None)
            held = self._sockets.pop(environment, None)
            if config is not None:
                await self._broadcast(
                    "remove", environment, timeout=config.drain_timeout + self.ack_timeout
                )
            if held is not None:
                held[1].close()
            slot = self._slots.pop(environment, None)
            if slot is not None:
                self._table.clear_slot(slot)
            self._retired.pop(environment, None)
            for worker in self._procs.values():
                worker.last.pop(environment, None)

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """Per-release counters of the environment summed over every worker (and over
        workers that exited), empty when unknown. Waits (up to 2 s) for the workers' answers
        without running the event loop."""
        if environment not in self._configs:
            return []
        workers = [w for w in self._live() if w.ready]
        futs = [w.request("counters", environment) for w in workers]
        deadline = time.monotonic() + _COUNTERS_TIMEOUT
        while any(not f.done() for f in futs):
            waiting = [w.channel for w, f in zip(workers, futs, strict=True) if not f.done()]
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(InterruptedError):
                select.select(waiting, [], [], left)
            for worker, fut in zip(workers, futs, strict=True):
                if not fut.done():
                    worker.readable()
        parts: list[list[ReleaseCounters]] = [self._retired.get(environment, [])]
        for worker, fut in zip(workers, futs, strict=True):
            if fut.done():
                ok, result = fut.result()
                if ok and worker.alive:
                    worker.last[environment] = list(result.get(environment, []))
            else:
                fut.cancel()
            parts.append(worker.last.get(environment, []))
        return merge_counters(*parts)

    def address(self, environment: str) -> tuple[str, int]:
        """The (host, port) the environment's listener is bound to (useful with port 0).

        Raises:
            RouterError: when the environment has no listener.
        """
        held = self._sockets.get(environment)
        if held is None:
            raise RouterError(f"environment {environment}: no listener")
        name = held[1].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Drain every worker, stop them and close the listeners."""
        self._closing = True
        for handle in self._restart_handles.values():
            handle.cancel()
        self._restart_handles.clear()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        drain = max((c.drain_timeout for c in self._configs.values()), default=0.0)
        await self._broadcast("close", None, timeout=drain + self.ack_timeout)
        deadline = time.monotonic() + 5.0
        for worker in list(self._procs.values()):
            while worker.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.proc.poll() is None:
                worker.kill()
                await asyncio.sleep(0)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(1.0)
            worker.gone()
        for _, sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._configs.clear()
        self._table.close()
        os.close(self._table_fd)
