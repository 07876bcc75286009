"""Per-release traffic counters: the latency histogram, percentile estimates, Prometheus text.

This module owns how a router counts (cumulative counters and a fixed-bucket latency
histogram per release) and how counters are exposed (``ReleaseCounters`` snapshots and the
Prometheus text format). Consumers that need a window (canary analysis) diff two snapshots.
It knows nothing of sockets, HTTP or event loops.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Final

from castiron.traffic.base import LatencySummary, ReleaseCounters

__all__ = [
    "BUCKETS_MS",
    "ReleaseStats",
    "estimate_percentile",
    "merge_counters",
    "prometheus_text",
]

BUCKETS_MS: Final[tuple[float, ...]] = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
"""Upper bounds (ms) of the latency histogram's finite buckets; a ``+Inf`` bucket follows."""


def estimate_percentile(histogram: Sequence[tuple[float, int]], q: float) -> float:
    """The ``q``-quantile (0..1) in ms from a cumulative histogram, interpolating linearly.

    Within the bucket that holds the rank, the value is interpolated between the bucket's
    lower and upper bound; in the ``+Inf`` bucket the last finite bound is returned (the
    histogram cannot say more). An empty histogram gives 0.
    """
    if not histogram:
        return 0.0
    total = histogram[-1][1]
    if total <= 0:
        return 0.0
    rank = q * total
    lower = 0.0
    below = 0
    for upper, cumulative in histogram:
        if cumulative >= rank and cumulative > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cumulative - below)
        lower = upper if not math.isinf(upper) else lower
        below = cumulative
    return lower


class ReleaseStats:
    """Mutable counters of one release behind one listener (owned by one router, one loop)."""

    __slots__ = (
        "buckets",
        "connect_errors",
        "drained_cut",
        "latency_sum_ms",
        "release",
        "requests",
        "responses",
    )

    def __init__(self, release: str) -> None:
        self.release = release
        self.requests = 0
        self.responses = [0, 0, 0, 0, 0, 0]  # index = status // 100
        self.connect_errors = 0
        self.drained_cut = 0
        self.buckets = [0] * (len(BUCKETS_MS) + 1)
        self.latency_sum_ms = 0.0

    def observe(self, status: int, latency_ms: float) -> None:
        """Count one finished response and its latency."""
        self.responses[min(status // 100, 5)] += 1
        self.buckets[bisect.bisect_left(BUCKETS_MS, latency_ms)] += 1
        self.latency_sum_ms += latency_ms

    def snapshot(self) -> ReleaseCounters:
        """The counters as a frozen value."""
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*BUCKETS_MS, math.inf), self.buckets, strict=True):
            running += count
            cumulative.append((float(bound), running))
        hist = tuple(cumulative)
        return ReleaseCounters(
            release=self.release,
            requests=self.requests,
            responses_2xx=self.responses[2],
            responses_3xx=self.responses[3],
            responses_4xx=self.responses[4],
            responses_5xx=self.responses[5],
            connect_errors=self.connect_errors,
            drained_cut=self.drained_cut,
            latency=LatencySummary(
                p50_ms=estimate_percentile(hist, 0.50),
                p95_ms=estimate_percentile(hist, 0.95),
                p99_ms=estimate_percentile(hist, 0.99),
            ),
            histogram=hist,
            latency_sum_ms=self.latency_sum_ms,
        )


def merge_counters(*parts: Sequence[ReleaseCounters]) -> list[ReleaseCounters]:
    """Counters of several processes serving one listener, summed per release (sorted).

    Counts, histogram buckets and latency sums add up exactly; percentiles are estimated
    again from the summed histogram. Counters without a histogram keep a request-weighted
    average latency.
    """
    by_release: dict[str, list[ReleaseCounters]] = {}
    for part in parts:
        for c in part:
            by_release.setdefault(c.release, []).append(c)
    merged: list[ReleaseCounters] = []
    for release in sorted(by_release):
        items = by_release[release]
        if len(items) == 1:
            merged.append(items[0])
            continue
        hist: tuple[tuple[float, int], ...] = ()
        if all(c.histogram for c in items) and len({len(c.histogram) for c in items}) == 1:
            hist = tuple(
                (bounds[0][0], sum(n for _, n in bounds))
                for bounds in zip(*(c.histogram for c in items), strict=True)
            )
        requests = sum(c.requests for c in items)
        if hist:
            latency = LatencySummary(
                p50_ms=estimate_percentile(hist, 0.50),
                p95_ms=estimate_percentile(hist, 0.95),
                p99_ms=estimate_percentile(hist, 0.99),
            )
        else:
            weight = max(1, requests)
            latency = LatencySummary(
                p50_ms=sum(c.latency.p50_ms * c.requests for c in items) / weight,
                p95_ms=sum(c.latency.p95_ms * c.requests for c in items) / weight,
                p99_ms=sum(c.latency.p99_ms * c.requests for c in items) / weight,
            )
        merged.append(
            ReleaseCounters(
                release=release,
                requests=requests,
                responses_2xx=sum(c.responses_2xx for c in items),
                responses_3xx=sum(c.responses_3xx for c in items),
                responses_4xx=sum(c.responses_4xx for c in items),
                responses_5xx=sum(c.responses_5xx for c in items),
                connect_errors=sum(c.connect_errors for c in items),
                drained_cut=sum(c.drained_cut for c in items),
                latency=latency,
                histogram=hist,
                latency_sum_ms=sum(c.latency_sum_ms for c in items),
                latency_is_average=not hist and any(c.latency_is_average for c in items),
            )
        )
    return merged


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _le(bound_ms: float) -> str:
    if math.isinf(bound_ms):
        return "+Inf"
    return repr(bound_ms / 1000.0)


def prometheus_text(counters_by_env: Mapping[str, Sequence[ReleaseCounters]]) -> str:
    """Counters of every environment in the Prometheus text exposition format (0.0.4)."""
    families: list[tuple[str, str, str, list[str]]] = [
        ("castiron_requests_total", "counter", "Requests routed, per release.", []),
        ("castiron_responses_total", "counter", "Responses sent, per release and class.", []),
        ("castiron_connect_errors_total", "counter", "Failed connects to a backend.", []),
        (
            "castiron_drained_cut_total",
            "counter",
            "In-flight requests cut at the drain deadline.",
            [],
        ),
        (
            "castiron_request_duration_seconds",
            "histogram",
            "Time from request headers to the end of the response.",
            [],
        ),
    ]
    requests, responses, connect, cut, duration = (f[3] for f in families)
    for env in sorted(counters_by_env):
        for c in sorted(counters_by_env[env], key=lambda c: c.release):
            base = f'environment="{_label(env)}",release="{_label(c.release)}"'
            requests.append(f"castiron_requests_total{{{base}}} {c.requests}")
            for cls, n in (
                ("2xx", c.responses_2xx),
                ("3xx", c.responses_3xx),
                ("4xx", c.responses_4xx),
                ("5xx", c.responses_5xx),
            ):
                responses.append(f'castiron_responses_total{{{base},class="{cls}"}} {n}')
            connect.append(f"castiron_connect_errors_total{{{base}}} {c.connect_errors}")
            cut.append(f"castiron_drained_cut_total{{{base}}} {c.drained_cut}")
            if c.histogram:
                for bound, count in c.histogram:
                    duration.append(
                        f'castiron_request_duration_seconds_bucket{{{base},le="{_le(bound)}"}}'
                        f" {count}"
                    )
                duration.append(
                    f"castiron_request_duration_seconds_sum{{{base}}} {c.latency_sum_ms / 1000.0!r}"
                )
                duration.append(
                    f"castiron_request_duration_seconds_count{{{base}}} {c.histogram[-1][1]}"
                )
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"
