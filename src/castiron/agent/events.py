"""The agent's event list: numbered events in memory (the newest few thousand) and on disk.

Owns ``agent/events.jsonl`` (appended, compacted past 4 MiB) and the ``event …`` log line each
recorded event gets. Detail texts are masked with the agent's redactor before they are kept.
It knows nothing of instances, routes or the control API: the other agent modules record
their events here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from castiron.agent.wire import AgentEvent, EventKind, from_json, to_json
from castiron.errors import UsageError
from castiron.filemodes import open_private
from castiron.redact import Redactor

log = logging.getLogger("castiron.agent")

EVENTS_NAME = "events.jsonl"
_EVENTS_KEPT = 5000


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

    def record(self, event: AgentEvent) -> None:
        """Append ``event`` and log it."""
        numbered = self.append(event)
        log.info(
            "event %d %s %s%s",
            numbered.seq,
            numbered.kind,
            numbered.instance or numbered.environment,
            f" ({numbered.detail})" if numbered.detail else "",
        )

    def note(self, kind: EventKind, environment: str = "", detail: str = "") -> None:
        """Record an event of ``kind`` about ``environment`` (no instance)."""
        self.record(
            AgentEvent(seq=0, at=time.time(), kind=kind, environment=environment, detail=detail)
        )
