"""The agent's drift watches: a drift check per environment, run on its own schedule.

Owns ``agent/watches.json`` (the watches the engine registered through the API, restored on
start) and the scheduled checks: each runs the registered command (with ``CASTIRON_DRIFT_WATCH``
set, so it does not register a watch again) and records what it found or fixed as events.
It knows nothing of what a drift check does: it reads the one JSON object the command prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from castiron.agent.events import EventLog
from castiron.agent.supervisor import write_json_atomic
from castiron.agent.wire import DriftWatch, from_json, to_json
from castiron.errors import UsageError

log = logging.getLogger("castiron.agent")

WATCHES_NAME = "watches.json"
WATCHER_ENV = "CASTIRON_DRIFT_WATCH"
"""Set on the drift checks the agent runs, so they do not register their own watch again."""


class WatchScheduler:
    """The registered drift watches by environment, and the task that runs each."""

    def __init__(self, agent_dir: Path, events: EventLog) -> None:
        self.dir = agent_dir
        self.events = events
        self.watches: dict[str, DriftWatch] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def restore(self) -> None:
        """Start the watches recorded in ``watches.json`` (a bad one is logged and skipped)."""
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
            self.start(watch)

    def save(self) -> None:
        """Record the watches in ``watches.json``."""
        write_json_atomic(
            self.dir / WATCHES_NAME,
            {"version": 1, "watches": [to_json(w) for _, w in sorted(self.watches.items())]},
        )

    def start(self, watch: DriftWatch) -> None:
        """Schedule ``watch``, in place of its environment's previous one."""
        old = self.tasks.pop(watch.environment, None)
        if old is not None:
            old.cancel()
        self.watches[watch.environment] = watch
        task = asyncio.get_running_loop().create_task(self._watch_loop(watch))
        self.tasks[watch.environment] = task

    async def _watch_loop(self, watch: DriftWatch) -> None:
        while True:
            await asyncio.sleep(watch.interval)
            try:
                await self._check_drift(watch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failed check must not end the schedule
                log.error("drift check of %s failed: %r", watch.environment, exc)
                self.events.note("drift-check-failed", watch.environment, repr(exc)[:300])

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
            self.events.note("drift-check-failed", watch.environment, why)
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
            self.events.note("drift-check-failed", env_name, f"status {proc.returncode}: {tail[0]}")
            return
        findings = data.get("findings") if isinstance(data, dict) else None
        if not isinstance(findings, list) or proc.returncode not in (0, 3):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            self.events.note("drift-check-failed", env_name, f"status {proc.returncode}: {tail[0]}")
            return
        if findings:
            kinds = sorted({str(f.get("kind")) for f in findings if isinstance(f, dict)})
            self.events.note(
                "drift-found", env_name, f"{len(findings)} finding(s): {', '.join(kinds)}"
            )
        for report in data.get("environments") or []:
            fixed = report.get("fixed") if isinstance(report, dict) else None
            acted = ("replaced", "created", "destroyed", "strays_destroyed", "route_reapplied")
            if isinstance(fixed, dict) and any(fixed.get(k) for k in acted):
                self.events.note(
                    "drift-fixed",
                    env_name,
                    f"replaced {', '.join(fixed.get('replaced') or []) or 'none'}; "
                    f"strays destroyed {len(fixed.get('strays_destroyed') or [])}",
                )
