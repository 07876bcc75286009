"""One builtin router worker process: a :class:`BuiltinRouter` driven over one channel.

A worker is started by :class:`castiron.traffic.workers.WorkerPoolRouter` (``python -m
castiron.traffic.worker --channel FD``) and serves the listening sockets the pool hands it
(``SCM_RIGHTS``); it never binds one itself. Its channel is a ``SOCK_SEQPACKET`` socket pair:
one message per command, a pickled ``(id, verb, argument)``, and one reply per command, a
pickled ``(id, ok, result)``:

    apply   (RouteConfig, slot) (+ the listening socket)   switch; replied once installed
    remove  environment                            drain and close; replied once drained
    counters environment | None                    {environment: [ReleaseCounters]}, at once
    close                                          drain everything, reply, exit

Client connections are counted across workers for ``max_connections`` in a shared table (an
fd of ``SLOTS`` rows, one per environment, of one int64 per worker): each worker writes its own
cell of the environment's row (``slot``) and reads the row's sum when a client connects.

Commands of one environment run in order; ``counters`` is answered as soon as it is read,
even while a drain runs. The channel is the worker's lifeline: when the pool's end closes
(the agent exited or was killed), the worker stops accepting, lets in-flight requests finish
(up to each environment's drain timeout) and exits, leaving the listening sockets' backlog
to the next agent.

It knows nothing of the agent, runtimes, the spec or the state store.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from castiron.errors import CastironError
from castiron.httpcodec import ParserKind
from castiron.traffic.base import ReleaseCounters, RouteConfig
from castiron.traffic.proxy import BuiltinRouter

__all__ = ["MAX_MESSAGE", "SLOTS", "ConnectionTable", "main"]

MAX_MESSAGE = 4 * 1024 * 1024
"""Largest channel message, in bytes (a route of thousands of backends fits)."""
SLOTS = 1024
"""Rows of the connection table: environments whose connections are counted across workers."""


class ConnectionTable:
    """The shared table of client connections: one row per environment, one cell per worker."""

    def __init__(self, fd: int, workers: int, index: int) -> None:
        self.workers = workers
        self.index = index
        self._map = mmap.mmap(fd, SLOTS * workers * 8)
        self.cells = memoryview(self._map).cast("q")
        self.slots: dict[str, int] = {}
        """Each environment's row, as the pool assigned it."""

    def update(self, environment: str, local: int) -> int:
        """Record this worker's connections of ``environment``; the listener's total."""
        slot = self.slots.get(environment)
        if slot is None:
            return local
        base = slot * self.workers
        cells = self.cells
        cells[base + self.index] = local
        return sum(cells[base : base + self.workers])

    def connections(self, environment: str, local: int) -> int:
        """:class:`castiron.traffic.proxy.SharedListener`: see :meth:`update`."""
        return self.update(environment, local)

    def over_share(self, environment: str, local: int) -> bool:
        """True when this worker holds more than an even share (plus one) of the listener's
        connections."""
        slot = self.slots.get(environment)
        if slot is None or self.workers == 1:
            return False
        base = slot * self.workers
        total = sum(self.cells[base : base + self.workers])
        return local * self.workers > total + self.workers

    def clear_worker(self, index: int) -> None:
        """Forget the connections of worker ``index`` (it exited)."""
        for slot in range(SLOTS):
            self.cells[slot * self.workers + index] = 0

    def clear_slot(self, slot: int) -> None:
        """Forget the row ``slot`` (its environment was removed)."""
        for i in range(self.workers):
            self.cells[slot * self.workers + i] = 0

    def close(self) -> None:
        self.cells.release()
        self._map.close()


class _Worker:
    """The worker's side of its channel: runs the pool's commands on one BuiltinRouter."""

    def __init__(
        self,
        channel: socket.socket,
        router_factory: Callable[..., BuiltinRouter],
        table: ConnectionTable | None,
    ):
        self.loop = asyncio.get_running_loop()
        self.channel = channel
        self.table = table
        self.sockets: dict[str, list[socket.socket]] = {}
        self.router = router_factory(
            listen_socket_factory=self._take,
            shared=table,
        )
        self.queues: dict[str, asyncio.Queue[tuple[int, str, Any, list[socket.socket]]]] = {}
        self.runners: set[asyncio.Task[None]] = set()
        self.stopped = asyncio.Event()
        self.exit_reply: int | None = None

    def _take(self, listen: str) -> socket.socket:
        """The listening socket the pool sent with the apply being run (the router's factory)."""
        held = self.sockets.get(listen)
        if not held:
            raise OSError(f"no listening socket was handed over for {listen}")
        return held.pop()

    # --- channel ---
    def readable(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, MAX_MESSAGE, 8)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self.loop.remove_reader(self.channel.fileno())
                self.stopped.set()
                return
            received = [socket.socket(fileno=fd) for fd in fds]
            try:
                ident, verb, arg = pickle.loads(data)
            except Exception:  # a broken channel: nothing sane can follow
                for sock in received:
                    sock.close()
                self.loop.remove_reader(self.channel.fileno())
                self.stopped.set()
                return
            self.dispatch(ident, verb, arg, received)

    def reply(self, ident: int, ok: bool, result: object) -> None:
        with contextlib.suppress(OSError):
            self.channel.sendall(pickle.dumps((ident, ok, result), pickle.HIGHEST_PROTOCOL))

    def dispatch(self, ident: int, verb: str, arg: Any, received: list[socket.socket]) -> None:
        if verb == "counters":
            self.reply(ident, True, self.counters(arg))
            for sock in received:
                sock.close()
            return
        if verb == "close":
            self.exit_reply = ident
            self.stopped.set()
            return
        env = arg[0].environment if verb == "apply" else str(arg)
        queue = self.queues.get(env)
        if queue is None:
            queue = self.queues[env] = asyncio.Queue()
            task = self.loop.create_task(self.run_commands(queue))
            self.runners.add(task)
        queue.put_nowait((ident, verb, arg, received))

    def counters(self, environment: str | None) -> dict[str, list[ReleaseCounters]]:
        envs = list(self.queues) if environment is None else [environment]
        return {env: self.router.counters(env) for env in envs}

    async def run_commands(
        self, queue: asyncio.Queue[tuple[int, str, Any, list[socket.socket]]]
    ) -> None:
        while True:
            ident, verb, arg, received = await queue.get()
            try:
                if verb == "apply":
                    config: RouteConfig = arg[0]
                    if self.table is not None and arg[1] is not None:
                        self.table.slots[config.environment] = int(arg[1])
                    if received:
                        self.sockets.setdefault(config.listen, []).extend(received)
                    await self.router.apply(config)
                elif verb == "remove":
                    await self.router.remove(str(arg))
                    if self.table is not None:
                        self.table.slots.pop(str(arg), None)
                else:
                    raise CastironError(f"unknown command {verb!r}")
            except CastironError as exc:
                self.reply(ident, False, str(exc))
            except Exception as exc:  # reported to the pool, which logs it
                self.reply(ident, False, f"{type(exc).__name__}: {exc}")
            else:
                self.reply(ident, True, None)
            finally:
                for held in self.sockets.values():
                    for sock in held:
                        sock.close()
                self.sockets.clear()

    async def serve(self) -> None:
        self.loop.add_reader(self.channel.fileno(), self.readable)
        await self.stopped.wait()
        for task in self.runners:
            task.cancel()
        # the worker is going away, not the routes: what is in flight finishes where it goes
        await self.router.close(keep_routes=True)
        if self.exit_reply is not None:
            self.reply(self.exit_reply, True, None)


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    """``python -m castiron.traffic.worker --channel FD [--table FD --workers N --index I]
    [--parser P] [--access-log-dir D]``."""
    parser = argparse.ArgumentParser(prog="castiron-router-worker", description=__doc__)
    parser.add_argument("--channel", type=int, required=True, help="The channel's fd.")
    parser.add_argument("--parser", choices=("auto", "httptools", "python"), default="auto")
    parser.add_argument("--access-log-dir", type=Path, default=None)
    parser.add_argument("--table", type=int, default=None, help="The connection table's fd.")
    parser.add_argument("--workers", type=int, default=1, help="Workers sharing the table.")
    parser.add_argument("--index", type=int, default=0, help="This worker's cell in a row.")
    args = parser.parse_args(argv)
    # ^C at a terminal reaches the whole process group: the pool, not the worker, decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    channel = socket.socket(fileno=args.channel)
    channel.setblocking(False)
    kind: ParserKind = args.parser

    def make(**kwargs: Any) -> BuiltinRouter:
        return BuiltinRouter(parser=kind, access_log_dir=args.access_log_dir, **kwargs)

    table = None if args.table is None else ConnectionTable(args.table, args.workers, args.index)

    async def run() -> None:
        await _Worker(channel, make, table).serve()

    try:
        with asyncio.Runner(loop_factory=_event_loop) as runner:
            runner.run(run())
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
