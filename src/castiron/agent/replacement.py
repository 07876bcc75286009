"""Replacement of exited instances: a fresh instance of the same request, after a backoff.

Owns the spawn requests of replaceable instances (``agent/requests.json``, written without
secret values) and the replacement of one that exits by itself: out of its route, a backoff
(1 s, 2 s, 4 s … at most 60 s; back to 1 s once an instance has lived 60 s), a new instance
(new id, new port), a health check, and into the route in the dead one's place;
``instance-replaced`` records old id, new id and exit code. Spawn requests are kept in memory
with their secret values and persisted without them: after an agent restart an instance that
had secrets cannot be re-created (``instance-unreplaceable``); the engine's next command
reconciles. It never stops an instance that was not its own failed replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from castiron.agent.events import EventLog
from castiron.agent.routes import split_address
from castiron.agent.routing import RouteTable
from castiron.agent.supervisor import Supervisor, write_json_atomic
from castiron.agent.wire import (
    EventKind,
    InstanceRecord,
    SpawnRequest,
    from_json,
    instance_event,
    to_json,
)
from castiron.errors import CastironError, NotFoundError, UsageError
from castiron.model import HealthCheck
from castiron.ports import free_port

log = logging.getLogger("castiron.agent")

REQUESTS_NAME = "requests.json"


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


class Replacer:
    """Replaces instances spawned with ``replace`` when they exit by themselves."""

    def __init__(
        self,
        agent_dir: Path,
        supervisor: Supervisor,
        routing: RouteTable,
        events: EventLog,
        backoff: ReplaceBackoff,
    ) -> None:
        self.dir = agent_dir
        self.supervisor = supervisor
        self.routing = routing
        self.events = events
        self.backoff = backoff
        self._requests: dict[str, tuple[SpawnRequest, bool]] = self._load()
        """Spawn requests of replaceable instances by id, and whether they are complete (their
        secret values are known: false after an agent restart for instances with secrets)."""
        self._carry: dict[str, tuple[int, bool]] = {}
        """For a replacement: the short-lived predecessors so far, and whether the first one
        was routed (so the chain ends in the route even if a replacement dies in between)."""
        self.replacing: dict[str, asyncio.Task[None]] = {}
        self._generations: dict[str, int] = {}

    def _load(self) -> dict[str, tuple[SpawnRequest, bool]]:
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

    def _save(self) -> None:
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

    def remember(self, spawn: SpawnRequest) -> None:
        """Replace the instance of ``spawn`` when it exits by itself."""
        self._requests[spawn.id] = (spawn, True)
        self._save()

    def forget(self, instance_id: str) -> None:
        """Never replace ``instance_id`` (it is being stopped on request)."""
        task = self.replacing.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self._carry.pop(instance_id, None)
        if self._requests.pop(instance_id, None) is not None:
            self._save()

    def on_instance_exit(self, record: InstanceRecord) -> None:
        """The supervisor saw ``record`` exit: start its replacement if it has a request."""
        entry = self._requests.get(record.id)
        if entry is None or record.id in self.replacing:
            return
        spawn, complete = entry
        if not complete:
            self._requests.pop(record.id)
            self._save()
            self.events.record(
                instance_event(
                    "instance-unreplaceable",
                    record,
                    time.time(),
                    detail="its secret values are not kept across agent restarts; "
                    "the next deploy or status reconciles it",
                )
            )
            return
        lived = (record.exited_at or time.time()) - record.started_at
        failures, routed = self._carry.pop(record.id, (0, False))
        if lived >= self.backoff.reset_after:
            failures = 0
        self.replacing[record.id] = asyncio.get_running_loop().create_task(
            self._replace(record, spawn, failures, routed)
        )

    async def _replace(
        self, dead: InstanceRecord, spawn: SpawnRequest, failures: int, routed: bool
    ) -> None:
        """Replace ``dead``: take it out of its route, wait, start, health-check, swap in."""
        try:
            routed = await self.routing.unroute(dead) or routed
            if self._requests.pop(dead.id, None) is not None:
                self._save()
            while True:
                await asyncio.sleep(self.backoff.delay(failures))
                failures += 1
                new_spawn = self._successor(spawn, dead.id)
                try:
                    record = self.supervisor.spawn(new_spawn, replaces=dead.id)
                except CastironError as exc:
                    self._replace_event("instance-replace-failed", dead, detail=str(exc))
                    continue
                self._carry[record.id] = (failures, routed)
                self._requests[record.id] = (new_spawn, True)
                self._save()
                healthy, detail = await self._wait_healthy(record, new_spawn)
                if healthy:
                    break
                self._replace_event(
                    "instance-replace-failed", dead, detail=f"{record.id}: {detail}"
                )
                if record.id in self.replacing or self._state(record.id) != "running":
                    return  # it exited: its own replacement takes over
                self.forget(record.id)
                with contextlib.suppress(NotFoundError):
                    await self.supervisor.stop(record.id, grace=5.0)
            if routed:
                await self.routing.route_in(dead, record)
            self._replace_event(
                "instance-replaced", dead, replaced_by=record.id, detail=f"now {record.address}"
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("replacing %s failed", dead.id)
        finally:
            if self.replacing.get(dead.id) is asyncio.current_task():
                del self.replacing[dead.id]

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

    def _replace_event(
        self, kind: EventKind, dead: InstanceRecord, *, replaced_by: str = "", detail: str = ""
    ) -> None:
        self.events.record(
            instance_event(kind, dead, time.time(), detail=detail, replaced_by=replaced_by)
        )
