"""The agent's route table: the router, each environment's route and the listening sockets.

Owns ``agent/routes.json`` (the applied route of every environment, restored on start), the
router the agent runs (builtin, worker pool or HAProxy), the listeners taken over from the fd
keeper, the lock every route change holds, and the probes a flip runs before it applies.
It knows nothing of the control API or of why a route changes: callers say why, and the
change is recorded as an event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import replace
from pathlib import Path
from typing import Literal, Protocol

from castiron.agent.events import EventLog
from castiron.agent.fdkeeper import FdKeeperClient
from castiron.agent.routes import route_from_json, route_to_json, split_address
from castiron.agent.supervisor import write_json_atomic
from castiron.agent.wire import InstanceRecord
from castiron.errors import AgentError, CastironError, NotFoundError, RouterError
from castiron.model import HealthCheck
from castiron.traffic.base import Backend, BackendSet, RouteConfig, Router

log = logging.getLogger("castiron.agent")

ROUTES_NAME = "routes.json"
ACCESS_LOG_DIR = "access"
"""Where routers write each environment's access log (ENV.log, rotated by size)."""


class RouterOptions(Protocol):
    """The agent's choice of router (``AgentOptions`` is one)."""

    @property
    def router(self) -> Literal["builtin", "haproxy"]: ...
    @property
    def router_workers(self) -> int | None: ...
    @property
    def haproxy_bin(self) -> str: ...


class RouteTable:
    """The routes the agent applied, the router that serves them and the lock they change under."""

    def __init__(
        self,
        agent_dir: Path,
        options: RouterOptions,
        events: EventLog,
        keeper: FdKeeperClient | None,
        router: Router | None = None,
    ) -> None:
        self.dir = agent_dir
        self._options = options
        self.events = events
        self.keeper = keeper
        self.routes: dict[str, RouteConfig] = {}
        self.inherited: set[str] = set()
        self.lock = asyncio.Lock()
        self.router: Router = router if router is not None else self.make_router()

    def make_router(self) -> Router:
        """The router the options choose: HAProxy, the builtin proxy in-process, or its workers."""
        if self._options.router == "haproxy":
            from castiron.traffic.haproxy import HaproxyRouter

            return HaproxyRouter(
                self.dir / "haproxy",
                haproxy_bin=self._options.haproxy_bin,
                access_log_dir=self.dir / ACCESS_LOG_DIR,
            )
        if self._options.router_workers == 0:
            from castiron.traffic.proxy import BuiltinRouter

            return BuiltinRouter(
                listen_socket_factory=self.listen_socket, access_log_dir=self.dir / ACCESS_LOG_DIR
            )
        from castiron.traffic.workers import WorkerPoolRouter

        return WorkerPoolRouter(
            self._options.router_workers,
            listen_socket_factory=self.listen_socket,
            access_log_dir=self.dir / ACCESS_LOG_DIR,
        )

    def listen_socket(self, address: str) -> socket.socket:
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

    async def restore(self) -> None:
        """Re-apply the recorded routes; let the fd keeper drop listeners no route uses.

        Raises:
            AgentError: when the routes file is unreadable.
        """
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
                self.events.note("route-failed", env, f"not restored: {exc}")
                continue
            self.routes[env] = config
            self.events.note("route-applied", env, f"restored on {config.listen}")
        if self.keeper is not None:
            wanted = {c.listen for c in self.routes.values()}
            for name in self.keeper.names():
                if name not in wanted:
                    self.keeper.delete(name)

    def save(self) -> None:
        """Record the applied routes in ``routes.json``."""
        write_json_atomic(
            self.dir / ROUTES_NAME,
            {"version": 1, "routes": {e: route_to_json(c) for e, c in sorted(self.routes.items())}},
        )

    def route(self, env: str) -> RouteConfig:
        """The route of ``env``.

        Raises:
            NotFoundError: when ``env`` has none.
        """
        try:
            return self.routes[env]
        except KeyError:
            raise NotFoundError(f"no route for environment {env!r}") from None

    async def unroute(self, dead: InstanceRecord) -> bool:
        """Take ``dead`` out of its environment's route; True when it was in it."""
        async with self.lock:
            config = self.routes.get(dead.environment)
            if config is None:
                return False
            stable, canary = (_without(s, dead.id) for s in (config.stable, config.canary))
            if stable == config.stable and canary == config.canary:
                return False
            new = replace(config, stable=stable, canary=canary)
            await self.apply_locked(new, f"without {dead.id}")
            return True

    async def route_in(self, dead: InstanceRecord, new: InstanceRecord) -> None:
        """Add ``new`` where ``dead`` served, if its release is still routed there."""
        async with self.lock:
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
            await self.apply_locked(replace(config, stable=stable, canary=canary), why)

    async def apply_locked(self, config: RouteConfig, why: str) -> None:
        """Apply ``config`` (the lock held) and record it; a refusal is recorded, not raised."""
        try:
            await self.router.apply(config)
        except CastironError as exc:
            self.events.note("route-failed", config.environment, f"{why}: {exc}")
            return
        self.routes[config.environment] = config
        self.save()
        self.events.note("route-applied", config.environment, why)

    async def probe_all(
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


def _without(backend_set: BackendSet | None, instance_id: str) -> BackendSet | None:
    if backend_set is None or all(b.id != instance_id for b in backend_set.backends):
        return backend_set
    kept = tuple(b for b in backend_set.backends if b.id != instance_id)
    return BackendSet(backend_set.release, kept)


def _with(backend_set: BackendSet, backend: Backend) -> BackendSet:
    if any(b.id == backend.id for b in backend_set.backends):
        return backend_set
    return BackendSet(backend_set.release, (*backend_set.backends, backend))
