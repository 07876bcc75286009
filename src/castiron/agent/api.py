"""The agent's control API: the handler of every endpoint under ``/v1``.

Each handler checks its request (a ``UsageError`` names the bad field), calls the route table,
the supervisor, the replacer, the watch scheduler or the metrics listener, and returns the
JSON answer. It owns no state of its own: what it changes lives in those modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

from castiron import __version__
from castiron.agent.events import EventLog
from castiron.agent.http import STREAMED, Handler, Request, json_body, query_number
from castiron.agent.metrics import METRICS_NAME, MetricsListener
from castiron.agent.replacement import Replacer
from castiron.agent.routes import counters_to_json, route_from_json, route_to_json
from castiron.agent.routing import RouteTable
from castiron.agent.supervisor import Supervisor, write_json_atomic
from castiron.agent.watches import WatchScheduler
from castiron.agent.wire import AgentStatus, DriftWatch, SpawnRequest, from_json, to_json
from castiron.errors import NotFoundError, UsageError
from castiron.model import HealthCheck
from castiron.redact import Redactor


class ControlApi:
    """The control API's handlers, over the agent's parts."""

    def __init__(
        self,
        *,
        home: Path,
        agent_dir: Path,
        started_at: float,
        redactor: Redactor,
        events: EventLog,
        supervisor: Supervisor,
        routing: RouteTable,
        replacer: Replacer,
        watches: WatchScheduler,
        metrics: MetricsListener,
        stop: asyncio.Event,
    ) -> None:
        self.home = home
        self.dir = agent_dir
        self.started_at = started_at
        self.redactor = redactor
        self.events = events
        self.supervisor = supervisor
        self.routing = routing
        self.replacer = replacer
        self.watches = watches
        self.metrics = metrics
        self._stop = stop

    def table(self) -> list[tuple[str, dict[str, Handler]]]:
        """The endpoints: a path pattern under ``/v1`` and a handler per method."""
        return [
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

    async def _health(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        return {"ok": True, "pid": os.getpid()}

    async def _status(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        records = self.supervisor.records()
        return to_json(
            AgentStatus(
                pid=os.getpid(),
                home=str(self.home),
                version=__version__,
                started_at=self.started_at,
                uptime_s=round(time.time() - self.started_at, 3),
                router=self.routing.router.name,
                routes=tuple(sorted(self.routing.routes)),
                instances=len(records),
                running_instances=sum(1 for r in records if r.state == "running"),
                adopted_instances=sum(1 for r in records if r.adopted),
                inherited_listeners=tuple(sorted(self.routing.inherited)),
                metrics=self.metrics.listen,
                last_event=self.events.last_seq,
            )
        )

    async def _shutdown(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        asyncio.get_running_loop().call_later(0.01, self._stop.set)
        return {"ok": True, "pid": os.getpid()}

    async def _events(self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]) -> object:
        since = int(query_number(request, "since", 0, 0, 2**53))
        return {
            "events": [to_json(e) for e in self.events.since(since)],
            "last": self.events.last_seq,
        }

    async def _metrics_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"listen": self.metrics.listen}

    async def _metrics_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        data = json_body(request)
        if not isinstance(data, dict):
            raise UsageError("body: expected object")
        unknown = sorted(set(data) - {"listen"})
        if unknown:
            raise UsageError(f"body: unknown field {unknown[0]!r}")
        listen = data.get("listen")
        if listen is not None and not isinstance(listen, str):
            raise UsageError("body.listen: expected string or null")
        await self.metrics.set(listen)
        write_json_atomic(self.dir / METRICS_NAME, {"listen": listen})
        return {"listen": self.metrics.listen}

    async def _routes_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"routes": {e: route_to_json(c) for e, c in sorted(self.routing.routes.items())}}

    async def _route_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return route_to_json(self.routing.route(p["env"]))

    async def _route_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        config = route_from_json(env, json_body(request))
        async with self.routing.lock:
            old = self.routing.routes.get(env)
            clash = [
                e for e, c in self.routing.routes.items() if e != env and c.listen == config.listen
            ]
            if clash:
                raise UsageError(f"body.listen: {config.listen} is already used by {clash[0]!r}")
            # A moved listener: the router opens the new one, then drains the old one.
            await self.routing.router.apply(config)
            self.routing.routes[env] = config
            self.routing.save()
            if old is not None and old.listen != config.listen and self.routing.keeper is not None:
                self.routing.keeper.delete(old.listen)
        releases = [s.release for s in (config.stable, config.canary) if s is not None]
        self.events.note(
            "route-applied", env, f"{config.listen} -> {', '.join(releases) or 'none'}"
        )
        return route_to_json(config)

    async def _route_flip(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        """Switch to warm backends in one request: check the route still serves ``expect``,
        probe each new backend once with ``check``, then apply; on any failure nothing changes
        and the answer says why (``flipped: false``)."""
        env = p["env"]
        body = json_body(request)
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
        async with self.routing.lock:
            old = self.routing.routes.get(env)
            previous = None if old is None else route_to_json(old)
            serving = None if old is None or old.stable is None else old.stable.release
            if old is not None and old.canary is not None and old.canary_weight:
                serving = None
            if serving != expect:
                why = f"route serves {serving or 'nothing'}, expected {expect or 'nothing'}"
                return {"flipped": False, "reason": why, "previous": previous}
            clash = [
                e for e, c in self.routing.routes.items() if e != env and c.listen == config.listen
            ]
            if clash:
                raise UsageError(f"body.listen: {config.listen} is already used by {clash[0]!r}")
            failed = await self.routing.probe_all(config.stable.backends, check, probe_env)
            if failed:
                return {"flipped": False, "reason": "; ".join(failed), "previous": previous}
            await self.routing.router.apply(config)
            self.routing.routes[env] = config
            self.routing.save()
            if old is not None and old.listen != config.listen and self.routing.keeper is not None:
                self.routing.keeper.delete(old.listen)
        self.events.note("route-applied", env, f"{config.listen} -> {config.stable.release} (flip)")
        return {"flipped": True, "reason": "", "previous": previous}

    async def _route_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        async with self.routing.lock:
            config = self.routing.route(env)
            await self.routing.router.remove(env)
            self.routing.routes.pop(env)
            self.routing.save()
            if self.routing.keeper is not None:
                self.routing.keeper.delete(config.listen)
        self.events.note("route-removed", env, config.listen)
        return {"ok": True}

    async def _route_counters(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        self.routing.route(env)
        return {"environment": env, "counters": counters_to_json(self.routing.router.counters(env))}

    async def _instances_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = request.query.get("environment") or None
        return {"instances": [to_json(r) for r in self.supervisor.records(env)]}

    async def _instances_spawn(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        spawn = from_json(SpawnRequest, json_body(request), "body")
        self.redactor.add(spawn.env[k] for k in spawn.secret_env if k in spawn.env)
        _check_health(spawn.health)
        record = self.supervisor.spawn(spawn)
        if spawn.replace:
            self.replacer.remember(spawn)
        return 201, to_json(record)

    async def _instance_get(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return to_json(self.supervisor.get(p["id"]))

    async def _instance_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        grace = query_number(request, "grace", 10.0, 0.0, 3600.0)
        self.supervisor.get(p["id"])
        self.replacer.forget(p["id"])
        final = await self.supervisor.stop(p["id"], grace)
        # An instance that died was replaced under a new id the caller may not know yet: it
        # asked for the instance's place to go, so its replacements go too (else they leak).
        for successor in self._successors(p["id"]):
            self.replacer.forget(successor)
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
        lines = int(query_number(request, "lines", 100, 0, 100_000))
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

    async def _watches_list(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        return {"watches": [to_json(x) for _, x in sorted(self.watches.watches.items())]}

    async def _watch_put(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        watch = from_json(DriftWatch, json_body(request), "body")
        if watch.environment != p["env"]:
            raise UsageError(f"body.environment: {watch.environment!r} is not {p['env']!r}")
        if not watch.argv:
            raise UsageError("body.argv: the command is empty")
        if not 1.0 <= watch.interval <= 86400.0 or not 1.0 <= watch.timeout <= 86400.0:
            raise UsageError("body.interval, body.timeout: must be from 1 to 86400 seconds")
        known = self.watches.watches.get(watch.environment)
        if known != watch:  # the same again keeps its schedule
            self.watches.start(watch)
            self.watches.save()
        return to_json(watch)

    async def _watch_delete(
        self, request: Request, w: asyncio.StreamWriter, p: dict[str, str]
    ) -> object:
        env = p["env"]
        if env not in self.watches.watches:
            raise NotFoundError(f"no drift watch for environment {env!r}")
        self.watches.watches.pop(env)
        task = self.watches.tasks.pop(env, None)
        if task is not None:
            task.cancel()
        self.watches.save()
        return {"ok": True}


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
