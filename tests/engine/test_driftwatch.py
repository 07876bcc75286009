"""The host agent's drift watch: registered by the engine's deploy verb through a real agent's
API, each change of the schedule audited — and the JSON a watch's check prints, pinned field
by field (the agent reads it back; a field that disappears or changes type fails here)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.driftkit import CHECK_OUTPUT_SCHEMA, violations

from castiron.agent.client import AgentClient, DriftWatch
from castiron.agent.lifecycle import agent_pid, ensure_agent, socket_path
from castiron.engine.drift import check_output, detect_drift, fix_drift
from castiron.engine.driftwatch import DriftWatches, WatchCommand, drift_watch
from castiron.engine.resolve import DriftRules
from castiron.model import Digest, Instance, ReleaseId
from castiron.settings import Settings, load_settings
from castiron.state.base import AuditEntry

from .conftest import World

COMMAND = WatchCommand(
    argv=("/usr/bin/python3", "-m", "castiron.cli.main"),
    cwd="/srv/hello",
    env={"CASTIRON_HOME": "/srv/hello/.castiron", "CASTIRON_SPEC": "/srv/hello/castiron.yaml"},
)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentClient]:
    """A real host agent on a home of its own (killed by its pid afterwards)."""
    settings = load_settings({}, home=tmp_path / "agent-home")
    try:
        yield ensure_agent(settings)
    finally:
        _kill_agent(settings)


def _kill_agent(settings: Settings) -> None:
    pid = agent_pid(settings)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _with_drift(world: World, section: str) -> None:
    """Give ``staging`` the spec's ``drift`` section ``section`` (flow YAML)."""
    path = world.root / "castiron.yaml"
    text = path.read_text()
    start = text.index("  staging: {")
    end = text.index("}\n", start)
    line = text[start:end]
    line = line.split(", drift: ")[0]
    path.write_text(text[:start] + line + (f", drift: {section}" if section else "") + text[end:])


def _watch_entries(world: World) -> list[AuditEntry]:
    return [e for e in world.store.audit_entries("staging") if e.action.startswith("drift.watch")]


def test_the_watch_a_rule_asks_for() -> None:
    assert drift_watch(COMMAND, "staging", DriftRules()) is None
    watch = drift_watch(COMMAND, "staging", DriftRules(watch=30.0, fix=True))
    assert watch == DriftWatch(
        environment="staging",
        argv=("/usr/bin/python3", "-m", "castiron.cli.main", "drift", "staging", "--json", "--fix"),
        cwd="/srv/hello",
        interval=30.0,
        fix=True,
        env=dict(COMMAND.env),
    )
    plain = drift_watch(COMMAND, "staging", DriftRules(watch=5.0))
    assert plain is not None and plain.argv[-2:] == ("staging", "--json") and not plain.fix


def test_a_deployment_registers_the_watch_through_the_agent_and_audits_it(
    world: World, agent: AgentClient
) -> None:
    watches = DriftWatches(agent=lambda: agent, command=COMMAND)
    _with_drift(world, "{watch: 30s, fix: true}")
    engine = world.engine(drift_watches=lambda: watches)
    engine.deploy(engine.resolve(world.spec(), "staging", "v1"))

    (watch,) = agent.watches()
    assert watch == drift_watch(COMMAND, "staging", DriftRules(watch=30.0, fix=True))
    (entry,) = _watch_entries(world)
    assert (entry.action, entry.environment, entry.subject, entry.result) == (
        "drift.watch.registered",
        "staging",
        "staging",
        "ok",
    )
    assert entry.details == {"interval": 30.0, "fix": True}
    actions = [e.action for e in world.store.audit_entries("staging")]
    assert actions.index("drift.watch.registered") > actions.index("deploy.finish")

    # The same watch again (another release, same rules): the agent's schedule is unchanged,
    # nothing more is audited.
    engine.deploy(engine.resolve(world.spec(), "staging", "v2"))
    assert len(_watch_entries(world)) == 1 and agent.watches() == [watch]

    # Another interval is a new registration, audited with it.
    _with_drift(world, "{watch: 1m}")
    engine.deploy(engine.resolve(world.spec(), "staging", "v1"))
    (watch,) = agent.watches()
    assert (watch.interval, watch.fix) == (60.0, False)
    assert _watch_entries(world)[-1].details == {"interval": 60.0, "fix": False}

    # Rules without a watch drop it (audited); dropping none records nothing.
    _with_drift(world, "")
    engine.deploy(engine.resolve(world.spec(), "staging", "v2"))
    assert agent.watches() == []
    assert [e.action for e in _watch_entries(world)] == [
        "drift.watch.registered",
        "drift.watch.registered",
        "drift.watch.dropped",
    ]
    engine.deploy(engine.resolve(world.spec(), "staging", "v1"))
    assert len(_watch_entries(world)) == 3


def test_an_agent_that_cannot_be_reached_fails_no_deployment_and_audits_nothing(
    world: World, tmp_path: Path
) -> None:
    gone = load_settings({}, home=tmp_path / "no-agent")
    watches = DriftWatches(
        agent=lambda: AgentClient(socket_path(gone), timeout=1.0), command=COMMAND
    )
    _with_drift(world, "{watch: 30s}")
    engine = world.engine(drift_watches=lambda: watches)
    result = engine.deploy(engine.resolve(world.spec(), "staging", "v1"))
    assert result.outcome == "succeeded"
    assert _watch_entries(world) == []


def test_a_rollback_target_leaves_the_watch_alone(world: World, agent: AgentClient) -> None:
    watches = DriftWatches(agent=lambda: agent, command=COMMAND)
    _with_drift(world, "{watch: 30s}")
    engine = world.engine(drift_watches=lambda: watches)
    target = engine.resolve(world.spec(), "staging", "v1")
    engine.deploy(replace(target, drift=None))
    assert agent.watches() == [] and _watch_entries(world) == []


# --- what a watch's check prints -------------------------------------------------------------


def _printed(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as the agent reads it: one line of JSON, parsed."""
    parsed: dict[str, Any] = json.loads(json.dumps(data))
    return parsed


def test_the_schema_catches_a_missing_or_retyped_field() -> None:
    good = {"findings": [], "environments": [{"environment": "s", "release": None, "findings": []}]}
    assert violations(good, CHECK_OUTPUT_SCHEMA) == []
    assert violations({"environments": []}, CHECK_OUTPUT_SCHEMA) == ["$: no 'findings'"]
    bad = {"findings": [], "environments": [{"environment": 1, "release": None, "findings": []}]}
    assert violations(bad, CHECK_OUTPUT_SCHEMA) == [
        "$.environments[0].environment: int is not string"
    ]


def test_what_a_watch_check_prints_keeps_its_schema(world: World, tmp_path: Path) -> None:
    world.deploy("staging", "v1")
    clean = detect_drift(world.engine().context, "staging", baselines=tmp_path / "drift")
    first = sorted(r.id for r in world.store.list_instances("staging"))[0]
    world.driver.kill(first)
    stray = Instance("by-hand", "hello", "staging", ReleaseId(""), "local", "", "h1", Digest(""))
    world.driver.add_stray(stray)
    found = detect_drift(world.engine().context, "staging", baselines=tmp_path / "drift")
    assert found.findings  # a stopped instance and a stray
    fixed = fix_drift(world.engine().context, "staging", baselines=tmp_path / "drift")
    assert fixed.replaced and fixed.strays_destroyed

    for results in ([(clean, None)], [(found, None)], [(fixed.report, fixed)]):
        printed = _printed(check_output(results))
        assert violations(printed, CHECK_OUTPUT_SCHEMA) == [], printed
    printed = _printed(check_output([(fixed.report, fixed)]))
    assert printed["findings"] == printed["environments"][0]["findings"]
    assert {f["kind"] for f in printed["findings"]} == {"membership"}
    assert printed["environments"][0]["fixed"]["replaced"] == list(fixed.replaced)
