"""Canary deployments: weighted steps of traffic to the new release, judged by analysis.

Owns the canary strategy (:func:`run_canary`) and everything it decides by:

* :class:`~castiron.engine.resolve.CanaryConfig`, the steps, analysis limits and stickiness
  of an environment, resolved with the spec and recorded with the environment's policy;
* the analysis of one step's window (:func:`window_stats`, :func:`judge`): the router's
  cumulative per-release counters are read at the window's start and end and diffed, giving
  the canary's request count, error rate (5xx and failed connects over all requests) and p95
  (from the diffed latency histogram); plus optional ``http`` checks on every canary instance
  and Prometheus instant queries (:func:`query_prometheus`); and, where the runtime restarts
  instances by itself and judges their readiness (a driver that is a
  :class:`~castiron.drivers.base.UnitHealthSource`: Kubernetes), the canary's units
  themselves (:func:`unit_breaches`): one not ready or restarted since the canary became
  healthy fails the step, whatever the analysis limits say;
* control requests from other processes (:func:`request_control`): ``castiron deploy ENV
  --continue`` and ``castiron abort ENV`` append a ``continue`` / ``abort`` row to the running
  deployment's journal (audited); the canary polls its journal between and during steps.

The canary starts the new release's full replica count up front (steps move the share of
requests, not instances), so promotion needs no new instance: like blue-green, the previous
instances drain and stay warm. A failed analysis raises :class:`CanaryAbortedError`: the
engine undoes the deployment (traffic back on the stable set at once, canary instances
destroyed) and records outcome ``aborted`` with the figures.

It knows nothing of the CLI, of rendering, or of the spec file's format.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from castiron.drivers.base import UnitHealth, UnitHealthSource
from castiron.engine.execute import execute
from castiron.engine.operations import strategy_operations
from castiron.engine.resolve import AnalysisLimits, CanaryConfig, CanaryStep, PrometheusQuery
from castiron.engine.strategies import Rollout, backends_of, desired, serving
from castiron.errors import CanaryAbortedError, CastironError, NotFoundError, UsageError
from castiron.model import HealthCheck, Instance
from castiron.state.base import AuditDraft, DeploymentRow, StateStore, StateTx, StepRow
from castiron.traffic.base import ReleaseCounters
from castiron.traffic.controller import RequestCounting
from castiron.traffic.stats import estimate_percentile

POLL = 0.2
"""Seconds between two reads of the router's counters (and of control requests) in a step."""

EXTEND_FACTOR = 3.0
"""A step without ``min_requests`` requests at its end is extended up to this many times its
pause; still short, the canary is aborted (fail-safe: never promote what was not seen)."""

HTTP_CHECK_TIMEOUT = 2.0
"""Seconds an ``http`` check on a canary instance may take."""

PROMETHEUS_TIMEOUT = 5.0
"""Seconds a Prometheus query may take."""

UNIT_CHECK_EVERY = 1.0
"""Seconds between two reads of the canary's units from a runtime that judges their health
itself (and at the end of every step): the kubelet probes at most once a second."""

ControlAction = Literal["continue", "abort"]
CONTROL_ACTIONS: tuple[str, ...] = ("continue", "abort")
"""Journal rows another process may append to a running deployment."""


# --- configuration -------------------------------------------------------------------------


# --- analysis ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowStats:
    """What one release's router counters show over a window."""

    release: str
    seconds: float
    requests: int
    errors: int
    """5xx answers plus failed connects."""
    p95_ms: float
    latency_is_average: bool = False
    """True when the data plane keeps no histogram (HAProxy): p95 is a recent average."""

    @property
    def error_rate(self) -> float:
        """Errors over requests (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Requests per second over the window."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of the figures."""
        return {
            "release": self.release,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "rate_per_s": round(self.rate, 2),
            "p95_ms": round(self.p95_ms, 2),
            "latency_is_average": self.latency_is_average,
        }


def window_stats(
    release: str,
    before: ReleaseCounters | None,
    after: ReleaseCounters | None,
    seconds: float,
) -> WindowStats:
    """The figures of ``release`` between two cumulative snapshots of its counters.

    A release absent from a snapshot counts as zero there (a listener that restarted in
    between starts again from zero: then ``after`` alone is the window).
    """
    if after is None:
        return WindowStats(release, seconds, 0, 0, 0.0)
    if before is not None and after.requests < before.requests:
        before = None  # the counters were reset (the listener restarted)

    def minus(attr: str) -> int:
        value = int(getattr(after, attr))
        return value - int(getattr(before, attr)) if before is not None else value

    served = sum(minus(f"responses_{c}xx") for c in (2, 3, 4, 5))
    requests = max(minus("requests"), served)
    errors = minus("responses_5xx") + minus("connect_errors")
    if after.latency_is_average or not after.histogram:
        p95 = after.latency.p95_ms if requests else 0.0
    else:
        earlier = dict(before.histogram) if before is not None else {}
        diff = tuple((bound, count - earlier.get(bound, 0)) for bound, count in after.histogram)
        p95 = estimate_percentile(diff, 0.95)
    return WindowStats(release, seconds, requests, errors, p95, after.latency_is_average)


def judge(limits: AnalysisLimits, canary: WindowStats) -> list[str]:
    """The limits ``canary``'s window breaches, as sentences (empty: none).

    Call it only with at least ``min_requests`` requests in the window.
    """
    breaches = []
    if limits.max_error_rate is not None and canary.error_rate > limits.max_error_rate:
        breaches.append(
            f"error rate {canary.error_rate:.1%} > max_error_rate {limits.max_error_rate:.1%} "
            f"({canary.errors} of {canary.requests} requests)"
        )
    if limits.max_p95_ms is not None and canary.p95_ms > limits.max_p95_ms:
        kind = "average latency" if canary.latency_is_average else "p95"
        breaches.append(f"{kind} {canary.p95_ms:.1f} ms > max_p95_ms {limits.max_p95_ms:g} ms")
    return breaches


def query_prometheus(check: PrometheusQuery, release: str, environment: str) -> list[str]:
    """Run ``check`` (``$RELEASE`` / ``$ENVIRONMENT`` substituted) as an instant query and
    return its breaches: a sample above ``max`` (or NaN), or a query that failed (fail-safe).
    An empty vector has no sample above ``max`` and passes.
    """
    query = check.query.replace("$RELEASE", release).replace("$ENVIRONMENT", environment)
    url = check.url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    where = f"prometheus {check.url} {query!r}"
    try:
        with urllib.request.urlopen(url, timeout=PROMETHEUS_TIMEOUT) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return [f"{where}: HTTP {exc.code} {exc.reason}"]
    except (OSError, ValueError) as exc:
        return [f"{where}: query failed ({exc})"]
    try:
        if body.get("status") != "success":
            return [f"{where}: {body.get('error') or 'status is not success'}"]
        data = body["data"]
        if data["resultType"] == "scalar":
            values = [float(data["result"][1])]
        elif data["resultType"] == "vector":
            values = [float(sample["value"][1]) for sample in data["result"]]
        else:
            return [f"{where}: result type {data['resultType']!r} is not a scalar or vector"]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        return [f"{where}: unexpected answer ({exc!r})"]
    return [
        f"{where} = {value:g} > max {check.max:g}"
        for value in values
        if math.isnan(value) or value > check.max
    ]


def unit_breaches(
    units: Sequence[UnitHealth], baseline: Mapping[str, int], wanted: int
) -> list[str]:
    """The canary's units that fail it, as sentences (empty: none): a unit not ready, a unit
    restarted more times than ``baseline`` says (a unit absent from it counts from 0: it was
    created during the canary), or fewer units than the ``wanted`` instances."""
    breaches = []
    for unit in sorted(units, key=lambda u: u.unit):
        why = f" ({unit.detail})" if unit.detail else ""
        restarted = unit.restarts - baseline.get(unit.unit, 0)
        if restarted > 0:
            breaches.append(f"pod {unit.unit} restarted {restarted} time(s) during the canary{why}")
        elif not unit.ready:
            breaches.append(f"pod {unit.unit} is not Ready{why}")
    if len(units) < wanted:
        breaches.append(f"{len(units)} of the canary's {wanted} pods exist")
    return breaches


# --- control requests --------------------------------------------------------------------------


def running_deployment(store: StateStore, environment: str) -> DeploymentRow:
    """The deployment of ``environment`` without an outcome.

    Raises:
        NotFoundError: when none is running.
    """
    for deployment in store.list_deployments(environment, limit=20):
        if deployment.outcome == "running":
            return deployment
    raise NotFoundError(f"no deployment of {environment!r} is running")


def request_control(store: StateStore, environment: str, action: ControlAction) -> DeploymentRow:
    """Ask the running deployment of ``environment`` to ``continue`` (end the current canary
    step's pause) or ``abort``: a journal row it polls for, audited as ``deploy.<action>``.

    Returns the deployment asked.

    Raises:
        NotFoundError: when no deployment of ``environment`` is running.
        UsageError: ``continue`` for a deployment that is not a canary.
        StateError: when the database cannot be written.
    """
    deployment = running_deployment(store, environment)
    if action == "continue" and deployment.strategy != "canary":
        raise UsageError(
            f"deployment {deployment.id} of {environment!r} is {deployment.strategy}: "
            "only a canary waits for --continue"
        )
    data = {"requested_by": store.actor}
    now = store.clock.now()

    def apply(tx: StateTx) -> None:
        tx.append_step(deployment.id, action, "requested", data, now)

    store.mutate(
        AuditDraft(
            f"deploy.{action}", environment=environment, subject=deployment.id, details=data
        ),
        apply,
    )
    return deployment


@dataclass
class ControlInbox:
    """The control rows of one deployment not yet consumed (``continue`` is consumed by the
    step it ends; ``abort`` stays)."""

    store: StateStore
    deployment: str
    seen: int = 0
    continues: int = 0
    abort: StepRow | None = None

    def poll(self) -> None:
        """Read rows appended since the last poll.

        Raises:
            StateError: when the database cannot be read.
        """
        for row in self.store.steps(self.deployment):
            if row.seq <= self.seen:
                continue
            self.seen = row.seq
            if row.step == "continue" and row.state == "requested":
                self.continues += 1
            elif row.step == "abort" and row.state == "requested" and self.abort is None:
                self.abort = row

    def take_continue(self) -> bool:
        """Consume one ``continue`` request if there is one."""
        if self.continues > 0:
            self.continues -= 1
            return True
        return False


# --- progress --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryProgress:
    """Where a canary stands, for a live view."""

    step: int
    """1-based index of the current step."""
    steps: int
    weight: int
    state: str
    """``holding``, ``extending``, ``waiting for --continue``, ``passed``, ``promoted`` or
    ``aborted``."""
    elapsed: float
    """Seconds into the step."""
    pause: float | None
    canary: WindowStats
    stable: WindowStats


@runtime_checkable
class CanaryWatcher(Protocol):
    """An observer that also wants structured canary progress (a live view)."""

    def canary(self, progress: CanaryProgress) -> None:
        """Called at every poll of a canary step and when it is decided."""
        ...


def describe(progress: CanaryProgress) -> str:
    """One line for people: step, weight and per-release figures."""

    def side(name: str, w: WindowStats) -> str:
        return f"{name} {w.rate:.1f} req/s, {w.error_rate:.1%} errors, p95 {w.p95_ms:.1f} ms"

    return (
        f"step {progress.step}/{progress.steps} weight {progress.weight}% "
        f"({progress.state}, {progress.elapsed:.1f}s): "
        f"{side('canary', progress.canary)} | {side('stable', progress.stable)}"
    )


# --- the strategy ----------------------------------------------------------------------------


@dataclass
class _Canary:
    rollout: Rollout
    config: CanaryConfig
    new: list[Instance]
    inbox: ControlInbox
    results: list[dict[str, Any]] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    """Restarts of each canary unit when the canary became healthy (runtimes that restart
    instances by themselves)."""
    units_read_at: float = -math.inf

    @property
    def stable_release(self) -> str:
        return self.rollout.previous[0].release

    def emit(self, progress: CanaryProgress) -> None:
        observer = self.rollout.journal.observer
        if isinstance(observer, CanaryWatcher):
            observer.canary(progress)

    def units(self) -> list[UnitHealth] | None:
        """The canary's units as the runtime judges them (None: it does not judge them).

        Raises:
            CastironError: when the runtime cannot be read.
        """
        driver = self.rollout.driver
        if not isinstance(driver, UnitHealthSource):
            return None
        return driver.unit_health(self.new)

    def baseline(self) -> None:
        """Remember each canary unit's restarts: those to come fail the analysis.

        Raises:
            CastironError: when the runtime cannot be read.
        """
        self.restarts = {u.unit: u.restarts for u in self.units() or []}

    def unit_breaches(self) -> list[str]:
        """Breaches of the canary's units (a runtime that cannot be read is one: fail-safe)."""
        self.units_read_at = self.rollout.monotonic()
        try:
            units = self.units()
        except CastironError as exc:
            return [f"the canary's pods cannot be read: {exc}"]
        if units is None:
            return []
        return unit_breaches(units, self.restarts, len(self.new))

    def counters(self) -> dict[str, ReleaseCounters]:
        return {c.release: c for c in self.rollout.traffic.counters(self.rollout.environment)}

    def shift(self, weight: int) -> None:
        """Route ``weight`` % to the canary set (journaled like any switch, never final)."""
        r = self.rollout
        ids = [i.id for i in self.new]
        kept = [row.id for row in r.previous]
        data = {"to": ids, "keep": kept, "final": False, "weight": weight}
        r.journal.step("switch", data)
        r.traffic.switch(
            r.environment,
            r.policy.listen,
            backends_of(self.stable_release, r.previous),
            canary=backends_of(r.release.id, self.new),
            canary_weight=weight,
            drain_timeout=r.policy.drain_timeout,
            sticky=self.config.sticky,
            limits=r.policy.limits,
            access_log=r.policy.access_log,
        )

        def apply(tx: StateTx) -> None:
            for instance_id in ids:
                tx.set_instance_status(instance_id, "running")

        r.journal.step("switched", data, apply)

    def abort(
        self,
        index: int,
        step: CanaryStep,
        reasons: Sequence[str],
        canary: WindowStats | None,
        stable: WindowStats | None,
        requested_by: str | None = None,
    ) -> CanaryAbortedError:
        r = self.rollout
        figures: dict[str, Any] = {
            "step": index + 1,
            "steps": len(self.config.steps),
            "weight": step.weight,
            "verdict": "aborted",
            "reasons": list(reasons),
            "canary": canary.to_json() if canary is not None else None,
            "stable": stable.to_json() if stable is not None else None,
        }
        if requested_by is not None:
            figures["requested_by"] = requested_by
        r.journal.step("analysis", figures, state="failed")
        self.emit(
            CanaryProgress(
                index + 1,
                len(self.config.steps),
                step.weight,
                "aborted",
                canary.seconds if canary is not None else 0.0,
                step.pause,
                canary or WindowStats(r.release.id, 0.0, 0, 0, 0.0),
                stable or WindowStats(self.stable_release, 0.0, 0, 0, 0.0),
            )
        )
        why = "; ".join(reasons)
        r.progress(f"canary aborted at step {index + 1} (weight {step.weight}%): {why}")
        message = (
            f"canary of release {r.release.id} to {r.environment!r} aborted at step "
            f"{index + 1}/{len(self.config.steps)} (weight {step.weight}%): {why}"
        )
        if canary is not None:
            message += (
                f"\ncanary: {canary.requests} requests, {canary.errors} errors "
                f"({canary.error_rate:.1%}), p95 {canary.p95_ms:.1f} ms"
            )
        if stable is not None:
            message += (
                f"\nstable: {stable.requests} requests, {stable.errors} errors "
                f"({stable.error_rate:.1%}), p95 {stable.p95_ms:.1f} ms"
            )
        message += "\ntraffic is back on the stable release; the canary instances are destroyed"
        return CanaryAbortedError(message, {"analysis": figures, "steps": self.results})

    def check_abort(self, index: int, step: CanaryStep) -> None:
        self.inbox.poll()
        if self.inbox.abort is not None:
            who = str(self.inbox.abort.data.get("requested_by", "someone"))
            raise self.abort(index, step, [f"abort requested by {who}"], None, None, who)

    def hold(self, index: int, step: CanaryStep) -> None:
        """Hold ``step`` for its window, judging as it goes; raises when it fails."""
        r = self.rollout
        limits = self.config.analysis
        start = r.monotonic()
        first = self.counters()
        canary_id, stable_id = r.release.id, self.stable_release
        manual = step.pause is None
        deadline = math.inf if step.pause is None else start + step.pause
        cap = math.inf if step.pause is None else start + step.pause * EXTEND_FACTOR
        # Traffic analysis needs traffic, a window and a route that counts requests: a
        # weight-0 step, a pause of 0 or a Kubernetes Service only runs the other checks.
        counted = not isinstance(r.traffic, RequestCounting) or r.traffic.counts_requests(
            r.environment
        )
        judged = counted and limits is not None and step.weight > 0 and step.pause != 0
        extended = False
        continued = False
        pause_text = "until --continue" if manual else f"{step.pause:g}s"
        r.progress(
            f"canary step {index + 1}/{len(self.config.steps)}: {step.weight}% of "
            f"requests to release {canary_id}, holding {pause_text}"
        )
        while True:
            now = r.monotonic()
            until = cap if extended else deadline
            if now < until and not continued:
                r.sleep(max(0.001, min(POLL, until - now)))
                now = r.monotonic()
            snap = self.counters()
            seconds = now - start
            canary = window_stats(canary_id, first.get(canary_id), snap.get(canary_id), seconds)
            stable = window_stats(stable_id, first.get(stable_id), snap.get(stable_id), seconds)
            self.check_abort(index, step)
            if self.inbox.take_continue():
                continued = True
            if now - self.units_read_at >= UNIT_CHECK_EVERY:
                breaches = self.unit_breaches()
                if breaches:
                    raise self.abort(index, step, breaches, canary, stable)
            enough = limits is not None and canary.requests >= limits.min_requests
            if judged and limits is not None and enough:
                breaches = judge(limits, canary)
                if breaches:
                    raise self.abort(index, step, breaches, canary, stable)
            ended = continued or now >= deadline
            state = "holding"
            if manual and not continued:
                state = "waiting for --continue"
            elif extended:
                state = "extending"
            if ended and judged and limits is not None and not enough and not continued:
                if now < cap:
                    if not extended:
                        extended = True
                        r.progress(
                            f"canary step {index + 1}: {canary.requests} of "
                            f"{limits.min_requests} requests needed to judge; extending the "
                            f"window up to {step.pause * EXTEND_FACTOR if step.pause else 0:g}s"
                        )
                    ended = False
                    state = "extending"
                else:
                    raise self.abort(
                        index,
                        step,
                        [
                            f"only {canary.requests} request(s) reached the canary in "
                            f"{seconds:.1f}s (min_requests {limits.min_requests}): not enough "
                            "to judge it"
                        ],
                        canary,
                        stable,
                    )
            if not ended:
                self.emit(
                    CanaryProgress(
                        index + 1,
                        len(self.config.steps),
                        step.weight,
                        state,
                        seconds,
                        step.pause,
                        canary,
                        stable,
                    )
                )
                continue
            notes = []
            if judged and limits is not None and not enough:
                notes.append(
                    f"continued with {canary.requests} of {limits.min_requests} requests: "
                    "traffic analysis not judged"
                )
            breaches = self.unit_breaches() + self.checks()
            if breaches:
                raise self.abort(index, step, breaches, canary, stable)
            figures = {
                "step": index + 1,
                "steps": len(self.config.steps),
                "weight": step.weight,
                "verdict": "passed",
                "continued": continued,
                "notes": notes,
                "canary": canary.to_json(),
                "stable": stable.to_json(),
            }
            self.results.append(figures)
            r.journal.step("analysis", figures)
            self.emit(
                CanaryProgress(
                    index + 1,
                    len(self.config.steps),
                    step.weight,
                    "passed",
                    seconds,
                    step.pause,
                    canary,
                    stable,
                )
            )
            detail = (
                f"{canary.requests} requests, {canary.error_rate:.1%} errors, "
                f"p95 {canary.p95_ms:.1f} ms"
            )
            for note in notes:
                r.progress(f"warning: canary step {index + 1}: {note}")
            r.progress(f"canary step {index + 1}/{len(self.config.steps)} passed ({detail})")
            return

    def checks(self) -> list[str]:
        """Breaches of the http checks (every canary instance) and Prometheus queries."""
        limits = self.config.analysis
        if limits is None:
            return []
        r = self.rollout
        breaches: list[str] = []
        env = {**dict(r.runtime.env), **dict(r.release.config.env)}
        for path in limits.http:
            check = HealthCheck("http", path, 1.0, HTTP_CHECK_TIMEOUT, 1, 0.0)
            for instance in self.new:
                result = r.prober(check, instance.address, env)
                if not result.ok:
                    breaches.append(f"http check on {instance.id}: {result.detail}")
        for query in limits.prometheus:
            breaches.extend(query_prometheus(query, r.release.id, r.environment))
        return breaches


def run_canary(rollout: Rollout) -> None:
    """The canary strategy: start the new set, wait until it is healthy, then for each step
    route its weight to it and hold the step's window under analysis; all passed, route
    everything to the new set and drain the previous one (kept warm).

    The first deployment of an environment has nothing to compare with: it switches at once
    (blue-green).

    Raises:
        CanaryAbortedError: when a step fails its analysis or an abort was requested (the
            engine undoes the deployment: traffic back on the stable set, canary destroyed).
        DeployFailedError: when the canary instances do not become healthy.
        UsageError: when the environment's canary configuration is missing or damaged.
        RouterError, AgentError, RuntimeDriverError, StateError: on infrastructure failures.
    """
    if rollout.policy.canary is None:
        raise UsageError(
            f"environments.{rollout.environment}.strategy: canary without steps "
            "(redeploy from the spec)"
        )
    config = rollout.policy.canary
    ops = strategy_operations(serving(rollout), desired(rollout, "canary"))
    if not rollout.previous:
        rollout.progress("first deployment: no stable release to compare with, switching at once")
        execute(rollout, ops)
        return
    execute(rollout, ops, _Steps(rollout, config))


@dataclass
class _Steps:
    """The executor's canary steps: the analysis starts when the first weight is set."""

    rollout: Rollout
    config: CanaryConfig
    canary: _Canary | None = None

    def set_weight(self, new: Sequence[Instance], step: int) -> None:
        if self.canary is None:
            inbox = ControlInbox(self.rollout.journal.store, self.rollout.journal.id)
            self.canary = _Canary(self.rollout, self.config, list(new), inbox)
            self.canary.baseline()
        self.canary.check_abort(step, self.config.steps[step])
        self.canary.shift(self.config.steps[step].weight)

    def analyse(self, step: int) -> None:
        assert self.canary is not None  # a step's weight is set before its analysis
        self.canary.hold(step, self.config.steps[step])


__all__ = [
    "CONTROL_ACTIONS",
    "EXTEND_FACTOR",
    "POLL",
    "UNIT_CHECK_EVERY",
    "AnalysisLimits",
    "CanaryConfig",
    "CanaryProgress",
    "CanaryStep",
    "CanaryWatcher",
    "ControlAction",
    "ControlInbox",
    "PrometheusQuery",
    "WindowStats",
    "describe",
    "judge",
    "query_prometheus",
    "request_control",
    "run_canary",
    "running_deployment",
    "unit_breaches",
    "window_stats",
]
