"""Prometheus metrics of ``castiron serve``: counters and histograms in the text exposition
format (version 0.0.4), kept in memory.

Owns the metric values and their rendering; :mod:`castiron.api.events` feeds them from the
audit chain. It knows nothing of HTTP, the engine or the state store.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]

DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Upper bounds (seconds) of the deployment duration histogram."""


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, value in items:
            yield f"{self.name}{_labels(labels)} {_number(value)}"


class Histogram:
    """Observations in cumulative buckets per label set."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.help = help_text
        self.buckets = (*buckets, math.inf)
        self._values: dict[Labels, tuple[list[int], float, int]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            counts, total, n = self._values.get(key, ([0] * len(self.buckets), 0.0, 0))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self._values[key] = (counts, total + value, n + 1)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, (list(c), s, n)) for k, (c, s, n) in self._values.items())
        for labels, (counts, total, n) in items:
            for bound, count in zip(self.buckets, counts, strict=True):
                le = (("le", _number(bound)),)
                yield f"{self.name}_bucket{_labels(labels, le)} {count}"
            yield f"{self.name}_sum{_labels(labels)} {_number(total)}"
            yield f"{self.name}_count{_labels(labels)} {n}"


class Metrics:
    """Every metric ``castiron serve`` exposes on ``/metrics``."""

    def __init__(self) -> None:
        self.deployments = Counter(
            "castiron_deployments_total", "Finished deployments by environment and outcome."
        )
        self.started = Counter(
            "castiron_deployments_started_total", "Started deployments by environment."
        )
        self.duration = Histogram(
            "castiron_deployment_duration_seconds",
            "Duration of finished deployments, start to outcome.",
            DURATION_BUCKETS,
        )
        self.rollbacks = Counter(
            "castiron_rollbacks_total", "Rollbacks (and canaries rolled back) by environment."
        )
        self.drift = Counter(
            "castiron_drift_findings_total", "Drift findings recorded, by environment."
        )
        self.refusals = Counter(
            "castiron_gate_refusals_total", "Changes refused by a policy gate, by rule."
        )
        self.webhooks = Counter(
            "castiron_webhook_deliveries_total", "Webhook deliveries by event and result."
        )
        self.requests = Counter(
            "castiron_api_requests_total", "HTTP requests served, by method and status."
        )

    def render(self) -> str:
        """The exposition text of every metric."""
        lines: list[str] = []
        for metric in (
            self.deployments,
            self.started,
            self.duration,
            self.rollbacks,
            self.drift,
            self.refusals,
            self.webhooks,
            self.requests,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


__all__ = ["DURATION_BUCKETS", "Counter", "Histogram", "Metrics"]
