"""Deployment events out of ``castiron serve``: read from the audit chain, counted as
Prometheus metrics, and posted to webhooks.

Owns turning audit entries into events (``deployment.started``, ``deployment.succeeded``,
``deployment.failed``, ``deployment.rolled_back``, ``drift.found``, ``approval.needed``), the
per-environment drift summary the dashboard shows, and webhook delivery: JSON (or
Slack-compatible ``{"text": ...}``), signed with HMAC-SHA256 over ``timestamp.body``, retried
with exponential backoff on connection errors, 429 and 5xx. Because events come from the audit
chain, a deployment made by the CLI on the same state store is seen like one made through the
API. Entries recorded before the server started only feed the metrics.

It knows nothing of HTTP serving (starlette) or rendering, and reads no process environment.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from castiron.api.metrics import Metrics
from castiron.errors import CastironError
from castiron.state.base import AuditEntry, DeploymentRow, StateStore, parse_time

EVENT_KINDS = (
    # Every event a webhook may receive (docs/api.md lists them).
    "deployment.started",
    "deployment.succeeded",
    "deployment.failed",
    "deployment.rolled_back",
    "drift.found",
    "approval.needed",
)

SIGNATURE_HEADER = "X-Castiron-Signature"
TIMESTAMP_HEADER = "X-Castiron-Timestamp"


@dataclass(frozen=True)
class Webhook:
    """Where to post events: a URL, for one environment or all, signed when a secret is set."""

    url: str
    environment: str | None = None
    """Only events of this environment (None: every environment)."""
    format: Literal["json", "slack"] = "json"
    secret: bytes | None = field(default=None, repr=False)
    """The HMAC key (from an environment variable; never logged or shown)."""

    def wants(self, event: Event) -> bool:
        return self.environment is None or self.environment == event.environment


@dataclass(frozen=True)
class Event:
    """Something a team wants to hear about."""

    kind: str
    environment: str
    time: str
    actor: str
    text: str
    """One line for people (and the Slack ``text``)."""
    audit_seq: int
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.kind,
            "environment": self.environment,
            "time": self.time,
            "actor": self.actor,
            "text": self.text,
            "audit_seq": self.audit_seq,
            **dict(self.data),
        }


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def payload(hook: Webhook, event: Event) -> bytes:
    """The body posted to ``hook`` for ``event``."""
    if hook.format == "slack":
        return json.dumps({"text": f"castiron: {event.text}"}).encode()
    return json.dumps(event.to_json(), sort_keys=True).encode()


@dataclass
class Delivery:
    """One event posted (or given up on) to one webhook."""

    url: str
    event: str
    audit_seq: int
    attempts: int = 0
    status: int | None = None
    ok: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "event": self.event,
            "audit_seq": self.audit_seq,
            "attempts": self.attempts,
            "status": self.status,
            "ok": self.ok,
            "error": self.error,
        }


class WebhookSender:
    """Posts events to webhooks from one thread, in order, with retries and backoff."""

    def __init__(
        self,
        hooks: list[Webhook],
        metrics: Metrics,
        *,
        attempts: int = 5,
        backoff: float = 0.5,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hooks = hooks
        self.metrics = metrics
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self._clock = clock
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._stop = threading.Event()
        self.deliveries: list[Delivery] = []
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)

    def start(self) -> None:
        if self.hooks:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=10)

    def send(self, event: Event) -> None:
        if any(h.wants(event) for h in self.hooks):
            self._queue.put(event)

    def _run(self) -> None:
        while not self._stop.is_set():
            event = self._queue.get()
            if event is None:
                return
            for hook in self.hooks:
                if hook.wants(event):
                    self._deliver(hook, event)

    def _deliver(self, hook: Webhook, event: Event) -> None:
        body = payload(hook, event)
        delivery = Delivery(hook.url, event.kind, event.audit_seq)
        delay = self.backoff
        while delivery.attempts < self.attempts and not self._stop.is_set():
            delivery.attempts += 1
            retry = self._post(hook, event, body, delivery)
            if delivery.ok or not retry:
                break
            if delivery.attempts < self.attempts:
                self._stop.wait(delay)
                delay *= 2
        self.deliveries = [*self.deliveries[-99:], delivery]
        self.metrics.webhooks.inc(event=event.kind, result="ok" if delivery.ok else "failed")

    def _post(self, hook: Webhook, event: Event, body: bytes, delivery: Delivery) -> bool:
        """One attempt; returns whether another attempt may succeed."""
        stamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "castiron-webhooks",
            "X-Castiron-Event": event.kind,
            "X-Castiron-Delivery": f"{event.audit_seq}-{event.kind}",
            TIMESTAMP_HEADER: stamp,
        }
        if hook.secret is not None:
            headers[SIGNATURE_HEADER] = sign(hook.secret, stamp, body)
        request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                delivery.status = response.status
        except urllib.error.HTTPError as exc:
            delivery.status = exc.code
            delivery.error = f"HTTP {exc.code}"
            exc.close()
            return exc.code == 429 or exc.code >= 500
        except (OSError, ValueError) as exc:
            delivery.error = str(exc)
            return True
        delivery.ok = 200 <= (delivery.status or 0) < 300
        delivery.error = None if delivery.ok else f"HTTP {delivery.status}"
        return False


@dataclass
class DriftState:
    """The last drift recorded for an environment, unless a deployment came after it."""

    time: str
    findings: int
    audit_seq: int


class EventWatcher:
    """Follows the audit chain: metrics from every entry, events from new ones."""

    def __init__(
        self,
        open_store: Callable[[], AbstractContextManager[StateStore]],
        metrics: Metrics,
        sender: WebhookSender,
        *,
        interval: float = 0.5,
    ) -> None:
        self._open_store = open_store
        self.metrics = metrics
        self.sender = sender
        self.interval = interval
        self.last_seq = 0
        self._since: datetime | None = None
        self.drift: dict[str, DriftState] = {}
        self._deployments: dict[str, DeploymentRow] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.ready = threading.Event()
        self.error: str | None = None

    def start(self) -> None:
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.sender.stop()

    def _run(self) -> None:
        try:
            with self._open_store() as store:
                self._deployments = {d.id: d for d in store.list_deployments()}
                self.poll(store, announce=False)
                self._deployments.clear()
                self.ready.set()
                while not self._stop.wait(self.interval):
                    self.poll(store, announce=True)
        except CastironError as exc:
            self.error = str(exc)
        finally:
            self.ready.set()

    def poll(self, store: StateStore, *, announce: bool) -> None:
        """Handle every audit entry after :attr:`last_seq`."""
        for entry in self._new_entries(store):
            self.last_seq = entry.seq
            for event in self.handle(store, entry):
                if announce:
                    self.sender.send(event)

    def _new_entries(self, store: StateStore) -> list[AuditEntry]:
        # Entries are read by time (indexed) with a margin for clocks of other writers, and
        # kept by seq: each entry is handled exactly once.
        entries = store.audit_entries(since=self._since)
        fresh = [e for e in entries if e.seq > self.last_seq]
        if fresh:
            self._since = parse_time(fresh[-1].time) - timedelta(seconds=30)
        return fresh

    def _deployment(self, store: StateStore, deployment_id: str | None) -> DeploymentRow | None:
        if not deployment_id:
            return None
        row = self._deployments.get(deployment_id)
        return row if row is not None else store.get_deployment(deployment_id)

    def handle(self, store: StateStore, entry: AuditEntry) -> list[Event]:
        """Count ``entry`` in the metrics and return the events it makes."""
        env = entry.environment or ""

        def event(kind: str, text: str, **data: Any) -> Event:
            return Event(kind, env, entry.time, entry.actor, text, entry.seq, data)

        action = entry.action
        if action == "deploy.start":
            self.metrics.started.inc(environment=env)
            return [
                event(
                    "deployment.started",
                    f"{entry.actor} started deploying release {entry.to} to {env} "
                    f"(deployment {entry.subject})",
                    deployment=entry.subject,
                    release=entry.to,
                    **{"from": entry.from_},
                    strategy=entry.details.get("strategy"),
                )
            ]
        if action in ("deploy.finish", "deploy.recover"):
            outcome = entry.result
            row = self._deployment(store, entry.subject)
            strategy = row.strategy if row is not None else None
            self.metrics.deployments.inc(environment=env, outcome=outcome)
            if row is not None and row.finished is not None:
                seconds = (row.finished - row.started).total_seconds()
                self.metrics.duration.observe(max(0.0, seconds), environment=env)
            rolled_back = outcome == "rolled_back" or (
                strategy == "rollback" and outcome == "succeeded"
            )
            if rolled_back:
                self.metrics.rollbacks.inc(environment=env)
            if outcome == "succeeded":
                self.drift.pop(env, None)
            common = {
                "deployment": entry.subject,
                "release": entry.to,
                "from": entry.from_,
                "outcome": outcome,
                "strategy": strategy,
                "error": entry.details.get("error"),
            }
            if rolled_back:
                return [
                    event(
                        "deployment.rolled_back",
                        f"{env} rolled back to release {entry.to} by {entry.actor}",
                        **common,
                    )
                ]
            if outcome == "succeeded":
                return [
                    event(
                        "deployment.succeeded",
                        f"{env} now serves release {entry.to} (deployment {entry.subject}, "
                        f"by {entry.actor})",
                        **common,
                    )
                ]
            why = entry.details.get("error") or entry.details.get("refused") or outcome
            return [
                event(
                    "deployment.failed",
                    f"deployment {entry.subject} of release {entry.to} to {env} {outcome}: {why}",
                    **common,
                )
            ]
        if action == "drift.detected":
            findings = int(entry.details.get("findings") or 0)
            self.metrics.drift.inc(findings, environment=env)
            self.drift[env] = DriftState(entry.time, findings, entry.seq)
            return [
                event(
                    "drift.found",
                    f"drift in {env}: {findings} finding(s) against release {entry.subject}",
                    release=entry.subject,
                    findings=findings,
                    kinds=entry.details.get("kinds", {}),
                )
            ]
        if action == "drift.fix":
            self.drift.pop(env, None)
        if action == "policy.refuse":
            rule = str(entry.details.get("rule") or "unknown")
            self.metrics.refusals.inc(environment=env, rule=rule)
            if rule == "approvals":
                return [
                    event(
                        "approval.needed",
                        f"release {entry.subject} for {env} needs approval: "
                        f"{entry.details.get('reason', '')}",
                        release=entry.subject,
                        reason=entry.details.get("reason"),
                    )
                ]
        return []


__all__ = [
    "EVENT_KINDS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Delivery",
    "DriftState",
    "Event",
    "EventWatcher",
    "Webhook",
    "WebhookSender",
    "payload",
    "sign",
]
