"""Events from the audit chain: metrics, and webhooks signed, retried and Slack-shaped."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from castiron.api.events import Event, EventWatcher, Webhook, WebhookSender, payload, sign
from castiron.api.metrics import Metrics
from castiron.state.base import AuditDraft, StateStore
from castiron.state.sqlite import open_state
from testkit import wait_for


@contextlib.contextmanager
def receiver(statuses: list[int]) -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A loopback HTTP server answering ``statuses`` in turn (then 200)."""
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            status = statuses.pop(0) if statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", got
    finally:
        server.shutdown()
        server.server_close()


EVENT = Event("deployment.failed", "staging", "2026-12-06T10:00:00Z", "token:ci", "it broke", 7)


def test_the_signature_is_hmac_sha256_of_timestamp_and_body() -> None:
    body = b'{"a": 1}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", "1700000000", body) == "sha256=" + expected


def test_slack_format_is_only_text() -> None:
    body = json.loads(payload(Webhook("http://x/", format="slack"), EVENT))
    assert body == {"text": "castiron: it broke"}
    full = json.loads(payload(Webhook("http://x/"), EVENT))
    assert full["event"] == "deployment.failed" and full["audit_seq"] == 7


def test_deliveries_retry_5xx_with_backoff_and_stop_on_4xx() -> None:
    metrics = Metrics()
    with receiver([503, 500]) as (url, got):
        sender = WebhookSender(
            [Webhook(url, secret=b"k")], metrics, backoff=0.01, clock=lambda: 1700000000.0
        )
        sender.start()
        sender.send(EVENT)
        wait_for(lambda: sender.deliveries, what="a delivery")
        sender.stop()
    assert [d.to_json()["attempts"] for d in sender.deliveries] == [3]
    assert sender.deliveries[0].ok
    headers, body = got[-1]
    assert headers["x-castiron-signature"] == sign(b"k", "1700000000", body)
    assert headers["x-castiron-event"] == "deployment.failed"
    assert metrics.webhooks.value(event="deployment.failed", result="ok") == 1

    with receiver([404]) as (url, got):
        sender = WebhookSender([Webhook(url)], Metrics(), backoff=0.01)
        sender.start()
        sender.send(EVENT)
        wait_for(lambda: sender.deliveries, what="a delivery")
        sender.stop()
    assert len(got) == 1 and not sender.deliveries[0].ok
    assert sender.deliveries[0].error == "HTTP 404"
    assert "x-castiron-signature" not in got[0][0]


def test_a_webhook_for_one_environment_ignores_others() -> None:
    hook = Webhook("http://x/", environment="production")
    assert not hook.wants(EVENT)
    assert Webhook("http://x/").wants(EVENT)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with open_state(tmp_path / "home" / "state.db", actor="e2e@test") as opened:
        yield opened


def test_audit_entries_become_metrics_and_events(store: StateStore) -> None:
    store.mutate(
        AuditDraft(
            "policy.refuse",
            environment="production",
            subject="0123456789abcdef",
            result="refused",
            details={"rule": "approvals", "reason": "needs 1 approval(s)"},
        ),
        lambda tx: None,
    )
    store.mutate(
        AuditDraft(
            "drift.detected",
            environment="staging",
            subject="0123456789abcdef",
            result="drift",
            details={"findings": 3, "kinds": {"file": 3}},
        ),
        lambda tx: None,
    )
    metrics = Metrics()
    sender = WebhookSender([], metrics)

    @contextlib.contextmanager
    def same() -> Iterator[StateStore]:
        yield store

    watcher = EventWatcher(same, metrics, sender)
    events = [e for entry in store.audit_entries() for e in watcher.handle(store, entry)]
    assert [(e.kind, e.environment) for e in events] == [
        ("approval.needed", "production"),
        ("drift.found", "staging"),
    ]
    assert metrics.refusals.value(environment="production", rule="approvals") == 1
    assert metrics.drift.value(environment="staging") == 3
    assert watcher.drift["staging"].findings == 3
    text = metrics.render()
    assert 'castiron_gate_refusals_total{environment="production",rule="approvals"} 1' in text
    assert "# TYPE castiron_deployment_duration_seconds histogram" in text
