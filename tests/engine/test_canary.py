"""The canary strategy on the fake runtime, with a router fake whose counters move as a
deterministic load would move them: weights step up, analysis passes or aborts (error rate,
p95, too few requests, http checks, a real Prometheus HTTP server on loopback), ``continue``
and ``abort`` requests from another process arrive through the journal, and a crash mid-canary
is undone by recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from castiron.engine.canary import (
    WindowStats,
    judge,
    query_prometheus,
    request_control,
    window_stats,
)
from castiron.engine.deploy import DeployResult
from castiron.engine.resolve import AnalysisLimits, CanaryConfig, PrometheusQuery
from castiron.errors import CanaryAbortedError, NotFoundError, SpecError, UsageError
from castiron.health import ProbeResult
from castiron.model import HealthCheck
from castiron.spec.load import load_spec
from castiron.traffic.base import ReleaseCounters, Stickiness
from castiron.traffic.controller import MemoryTraffic
from castiron.traffic.stats import ReleaseStats

from .conftest import SPEC, Crash, FakePrometheus, Recorder, World, fake_prober, vector

CANARY_ENV = """
  canary:
    listen: 127.0.0.1:18090
    deploy_timeout: 5s
    keep_warm: 10m
    drain_timeout: 1s
    strategy:
      type: canary
      steps: {steps}
      analysis: {analysis}
      sticky: {{cookie: cid}}
"""

GOOD_STEPS = "[{weight: 10, pause: 2s}, {weight: 50, pause: 2s}]"
ANALYSIS = "{max_error_rate: 0.05, max_p95_ms: 200, min_requests: 20}"


@dataclass
class LoadTraffic(MemoryTraffic):
    """Routing in memory whose counters serve ``per_poll`` requests per read, split by the
    canary weight exactly; a release in ``fail_every`` answers 500 to every Nth request and
    takes ``latency_ms`` per request. ``on_read`` runs before every read (another process)."""

    per_poll: int = 50
    fail_every: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    on_read: Callable[[int], None] | None = None
    reads: int = 0
    stats: dict[str, ReleaseStats] = field(default_factory=dict)
    _carry: float = 0.0

    def counters(self, environment: str) -> list[ReleaseCounters]:
        self.reads += 1
        if self.on_read is not None:
            self.on_read(self.reads)
        config = self.routes.get(environment)
        if config is not None and config.stable is not None:
            for _ in range(self.per_poll):
                self._carry += config.canary_weight / 100 if config.canary is not None else 0
                chosen = config.stable
                if self._carry >= 1 and config.canary is not None:
                    self._carry -= 1
                    chosen = config.canary
                stats = self.stats.setdefault(chosen.release, ReleaseStats(chosen.release))
                stats.requests += 1
                every = self.fail_every.get(chosen.release, 0)
                status = 500 if every and stats.requests % every == 0 else 200
                stats.observe(status, self.latency_ms.get(chosen.release, 3.0))
        return [s.snapshot() for s in self.stats.values()]


@pytest.fixture
def canary_world(world: World) -> Callable[..., World]:
    """``world`` with a ``canary`` environment (steps and analysis as given) and a router
    fake with counters; ``v1`` is deployed there first (blue-green: nothing to compare)."""

    def _make(steps: str = GOOD_STEPS, analysis: str = ANALYSIS) -> World:
        spec = SPEC + CANARY_ENV.format(steps=steps, analysis=analysis)
        (world.root / "castiron.yaml").write_text(spec)
        world.traffic = LoadTraffic()
        first = world.deploy("canary", "v1")
        assert isinstance(first, DeployResult) and first.outcome == "succeeded"
        return world

    return _make


def release_of(world: World, tag: str) -> str:
    engine = world.engine()
    return engine.resolve(world.spec(), "canary", tag).release.id


def test_a_good_release_steps_through_its_weights_and_is_promoted(
    canary_world: Callable[..., World],
) -> None:
    world = canary_world()
    v1 = world.store.get_environment("canary")
    assert v1 is not None
    stable = v1.current_release
    recorder = Recorder()
    started = world.time.now
    result = world.deploy("canary", "v2", recorder)
    assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    weights = [(c.canary_weight, c.sticky) for c in world.traffic.history if c.canary is not None]
    assert weights == [(10, Stickiness("cookie", "cid")), (50, Stickiness("cookie", "cid"))]
    final = world.traffic.routes["canary"]
    assert final.canary is None and final.stable is not None
    assert final.stable.release == result.release
    # Two windows of 2 s each.
    assert world.time.now - started >= 4.0
    rows = world.store.list_instances("canary")
    assert sorted(r.status for r in rows) == ["running", "running", "warm", "warm"]
    assert {r.release for r in rows if r.status == "warm"} == {stable}
    steps = world.store.steps(str(result.deployment))
    analysis = [s.data for s in steps if s.step == "analysis"]
    assert [a["verdict"] for a in analysis] == ["passed", "passed"]
    assert [a["weight"] for a in analysis] == [10, 50]
    assert analysis[1]["canary"]["requests"] >= 20
    assert analysis[1]["canary"]["error_rate"] == 0
    assert any("canary step 2/2 passed" in line for line in recorder.lines)


def test_a_release_with_errors_is_aborted_at_the_first_step(
    canary_world: Callable[..., World],
) -> None:
    world = canary_world()
    assert isinstance(world.traffic, LoadTraffic)
    bad = release_of(world, "v2")
    world.traffic.fail_every[bad] = 5  # 20 % errors
    before = {r.id for r in world.store.list_instances("canary")}
    with pytest.raises(CanaryAbortedError) as caught:
        world.deploy("canary", "v2")
    message = str(caught.value)
    assert "aborted at step 1/2 (weight 10%)" in message
    assert "error rate 20.0% > max_error_rate 5.0%" in message
    # Traffic back on the stable release only; no canary instance left anywhere.
    route = world.traffic.routes["canary"]
    assert route.canary is None and route.stable is not None and route.stable.release != bad
    assert {r.id for r in world.store.list_instances("canary")} == before
    assert not [i for i in world.driver.observe("hello", "canary") if i.instance.release == bad]
    # Only the first step's weight was ever given to it.
    assert [c.canary_weight for c in world.traffic.history if c.canary is not None] == [10]
    deployment = world.store.list_deployments("canary", limit=1)[0]
    assert deployment.outcome == "aborted"
    figures = deployment.details["analysis"]
    assert figures["step"] == 1 and figures["weight"] == 10
    assert figures["canary"]["requests"] >= 20 and figures["canary"]["error_rate"] == 0.2
    env = world.store.get_environment("canary")
    assert env is not None and env.current_release == route.stable.release


def test_a_slow_release_is_aborted_on_p95(canary_world: Callable[..., World]) -> None:
    world = canary_world()
    assert isinstance(world.traffic, LoadTraffic)
    world.traffic.latency_ms[release_of(world, "v2")] = 400.0
    with pytest.raises(CanaryAbortedError, match=r"p95 \d+\.\d ms > max_p95_ms 200 ms"):
        world.deploy("canary", "v2")


def test_too_few_requests_extend_the_window_then_abort(
    canary_world: Callable[..., World],
) -> None:
    world = canary_world()
    assert isinstance(world.traffic, LoadTraffic)
    world.traffic.per_poll = 1  # 10 % of one request per read: far too few
    recorder = Recorder()
    started = world.time.now
    with pytest.raises(CanaryAbortedError, match=r"min_requests 20\): not enough to judge"):
        world.deploy("canary", "v2", recorder)
    assert world.time.now - started >= 6.0  # 3 x the 2 s pause
    assert any("extending the window up to 6s" in line for line in recorder.lines)


def test_manual_step_waits_for_continue(canary_world: Callable[..., World]) -> None:
    world = canary_world(steps="[{weight: 20, pause: manual}]")
    assert isinstance(world.traffic, LoadTraffic)

    def operator(reads: int) -> None:
        if reads == 40:  # another process, 40 polls (8 s) into the manual step
            request_control(world.store, "canary", "continue")

    world.traffic.on_read = operator
    started = world.time.now
    result = world.deploy("canary", "v2")
    assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    assert world.time.now - started >= 7.5
    steps = world.store.steps(str(result.deployment))
    assert [s.step for s in steps if s.step in ("continue", "analysis")] == [
        "continue",
        "analysis",
    ]
    entries = [e.action for e in world.store.audit_entries()]
    assert "deploy.continue" in entries


def test_abort_request_during_a_step(canary_world: Callable[..., World]) -> None:
    world = canary_world()
    assert isinstance(world.traffic, LoadTraffic)
    before = {r.id for r in world.store.list_instances("canary")}

    def operator(reads: int) -> None:
        if reads == 5:
            request_control(world.store, "canary", "abort")

    world.traffic.on_read = operator
    with pytest.raises(CanaryAbortedError, match="abort requested by tester@testhost"):
        world.deploy("canary", "v2")
    assert {r.id for r in world.store.list_instances("canary")} == before
    route = world.traffic.routes["canary"]
    assert route.canary is None
    assert world.store.list_deployments("canary", limit=1)[0].outcome == "aborted"


def test_control_requests_need_a_running_deployment(canary_world: Callable[..., World]) -> None:
    world = canary_world()
    with pytest.raises(NotFoundError, match="no deployment of 'canary' is running"):
        request_control(world.store, "canary", "continue")


def test_continue_is_refused_for_a_deployment_that_is_not_a_canary(world: World) -> None:
    recorder = Recorder(crash_at="health")
    with pytest.raises(Crash):
        world.deploy("staging", "v1", recorder)
    with pytest.raises(UsageError, match="is blue-green: only a canary waits"):
        request_control(world.store, "staging", "continue")


def test_a_crash_mid_canary_is_undone_by_recovery(canary_world: Callable[..., World]) -> None:
    world = canary_world()
    env = world.store.get_environment("canary")
    assert env is not None
    before = {r.id for r in world.store.list_instances("canary")}
    with pytest.raises(Crash):
        world.deploy("canary", "v2", Recorder(crash_at="analysis"))  # step 1 judged, then killed
    assert world.traffic.routes["canary"].canary_weight == 10
    done = world.engine().recover("canary")
    assert [d.outcome for d in done] == ["aborted"]
    route = world.traffic.routes["canary"]
    assert route.canary is None and route.stable is not None
    assert route.stable.release == env.current_release
    assert {r.id for r in world.store.list_instances("canary")} == before


def test_the_first_deployment_has_nothing_to_compare_and_switches_at_once(world: World) -> None:
    (world.root / "castiron.yaml").write_text(
        SPEC + CANARY_ENV.format(steps=GOOD_STEPS, analysis=ANALYSIS)
    )
    recorder = Recorder()
    result = world.deploy("canary", "v1", recorder)
    assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    assert [c.canary for c in world.traffic.history] == [None]
    assert any("no stable release to compare with" in line for line in recorder.lines)


# --- http checks and Prometheus --------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "breached"),
    [
        (vector(0.5, 1.0), False),
        (vector(), False),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "0.2"]}}, False),
        (vector(0.5, 3.0), True),
        ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "NaN"]}}, True),
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, True),
        (None, True),  # the server refuses the query
    ],
)
def test_prometheus_instant_queries(
    prometheus: FakePrometheus, answer: dict[str, Any] | None, breached: bool
) -> None:
    query = 'errors{release="r1",env="prod"}'
    if answer is not None:
        prometheus.answers[query] = answer
    check = PrometheusQuery(prometheus.url, 'errors{release="$RELEASE",env="$ENVIRONMENT"}', 1.0)
    breaches = query_prometheus(check, "r1", "prod")
    assert bool(breaches) is breached, breaches
    assert prometheus.queries == [query]


def test_an_unreachable_prometheus_fails_safe(prometheus: FakePrometheus) -> None:
    check = PrometheusQuery("http://127.0.0.1:9", "up", 1.0)
    assert "query failed" in query_prometheus(check, "r1", "prod")[0]


@pytest.mark.parametrize(("value", "outcome"), [(0.5, "succeeded"), (7.0, "aborted")])
def test_prometheus_analysis_gates_each_step(
    canary_world: Callable[..., World], prometheus: FakePrometheus, value: float, outcome: str
) -> None:
    analysis = (
        "{min_requests: 5, prometheus: "
        f"{{url: '{prometheus.url}', query: 'latency{{release=\"$RELEASE\"}}', max: 1}}}}"
    )
    world = canary_world(steps="[{weight: 30, pause: 1s}]", analysis=analysis)
    release = release_of(world, "v2")
    prometheus.answers[f'latency{{release="{release}"}}'] = vector(value)
    if outcome == "aborted":
        with pytest.raises(CanaryAbortedError, match=r"= 7 > max 1"):
            world.deploy("canary", "v2")
    else:
        result = world.deploy("canary", "v2")
        assert isinstance(result, DeployResult) and result.outcome == "succeeded"
    assert world.store.list_deployments("canary", limit=1)[0].outcome == outcome


@pytest.mark.parametrize(
    ("paths", "outcome"), [("[/ready]", "succeeded"), ("[/ready, /broken]", "aborted")]
)
def test_http_checks_run_on_every_canary_instance(
    canary_world: Callable[..., World], paths: str, outcome: str
) -> None:
    world = canary_world(
        steps="[{weight: 30, pause: 1s}]", analysis=f"{{min_requests: 5, http: {paths}}}"
    )
    asked: list[tuple[str, str]] = []

    def prober(check: HealthCheck, address: str, env: Mapping[str, str]) -> ProbeResult:
        asked.append((check.target, address))
        if check.target == "/broken":
            return ProbeResult(False, "GET /broken: 503 Service Unavailable")
        return fake_prober(check, address, env)

    engine = world.engine()
    engine.prober = prober
    target = engine.resolve(world.spec(), "canary", "v2")
    if outcome == "aborted":
        with pytest.raises(CanaryAbortedError, match=r"http check on .*: GET /broken: 503"):
            engine.deploy(target)
    else:
        assert engine.deploy(target).outcome == "succeeded"
    canary = {a for t, a in asked if t == "/ready"}
    assert len(canary) == 2  # every canary instance
    assert world.store.list_deployments("canary", limit=1)[0].outcome == outcome


# --- the window arithmetic and the spec ------------------------------------------------------


def counters(requests: int, errors: int, slow: int) -> ReleaseCounters:
    stats = ReleaseStats("r")
    for i in range(requests):
        stats.requests += 1
        stats.observe(500 if i < errors else 200, 300.0 if i < slow else 3.0)
    return stats.snapshot()


def test_window_stats_diff_two_snapshots() -> None:
    before = counters(100, 0, 100)  # a slow past must not count in this window
    after_stats = ReleaseStats("r")
    for i in range(200):
        after_stats.requests += 1
        after_stats.observe(200 if i < 100 or i % 10 else 500, 300.0 if i < 100 else 3.0)
    w = window_stats("r", before, after_stats.snapshot(), 2.0)
    assert (w.requests, w.errors) == (100, 10)
    assert w.error_rate == pytest.approx(0.1) and w.rate == pytest.approx(50.0)
    assert w.p95_ms <= 5.0
    # A listener restarted in between: the later snapshot alone is the window.
    assert window_stats("r", before, counters(10, 1, 0), 1.0).requests == 10
    assert window_stats("r", None, None, 1.0).requests == 0


def test_judge_names_each_breach() -> None:
    limits = AnalysisLimits(max_error_rate=0.01, max_p95_ms=100, min_requests=5)
    assert judge(limits, WindowStats("r", 1.0, 100, 0, 50.0)) == []
    assert judge(limits, WindowStats("r", 1.0, 100, 5, 150.0)) == [
        "error rate 5.0% > max_error_rate 1.0% (5 of 100 requests)",
        "p95 150.0 ms > max_p95_ms 100 ms",
    ]


def test_the_canary_config_round_trips_through_the_policy(world: World) -> None:
    (world.root / "castiron.yaml").write_text(
        SPEC
        + CANARY_ENV.format(
            steps="[{weight: 5, pause: 30s}, {weight: 50, pause: manual}]", analysis=ANALYSIS
        )
    )
    target = world.engine().resolve(world.spec(), "canary", "v1")
    assert target.policy.canary is not None
    config = target.policy.canary
    assert config is not None
    assert [(s.weight, s.pause) for s in config.steps] == [(5, 30.0), (50, None)]
    assert config.sticky == Stickiness("cookie", "cid")
    assert config.analysis == AnalysisLimits(0.05, 200.0, 20)
    assert CanaryConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("{type: canary}", "strategy: steps: a canary needs at least one step"),
        (
            "{type: canary, steps: [{weight: 5}], sticky: {cookie: a, header: b}}",
            "give exactly one of cookie or header",
        ),
        ("{type: canary, steps: [{weight: 5}], analysis: {http: [ready]}}", "is not an HTTP path"),
        ("{type: canary, steps: [{weight: 5, pause: soon}]}", "or 'manual'"),
    ],
)
def test_bad_canary_specs_are_refused(world: World, strategy: str, message: str) -> None:
    text = SPEC + f"  bad: {{listen: 127.0.0.1:18099, strategy: {strategy}}}\n"
    (world.root / "castiron.yaml").write_text(text)
    with pytest.raises(SpecError) as caught:
        load_spec(world.root / "castiron.yaml", world.environ)
    assert message in str(caught.value)
