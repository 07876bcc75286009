"""Golden plans: each ``cases/*.json`` holds what is observed, what is resolved and the
operations the pure planners must produce from them (``plan``: ``deploy``, ``rollback``,
``drift_fix`` or ``down``). A change to a plan shows up here as a changed file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from castiron.engine.operations import (
    Desired,
    Operation,
    Serving,
    plan_deploy,
    plan_down,
    plan_drift_fix,
    plan_rollback,
)

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))


def run_case(case: dict[str, Any]) -> tuple[Operation, ...]:
    """The operations the planner named by ``case["plan"]`` makes of the case's inputs."""
    observed, resolved = case["observed"], case["resolved"]
    if case["plan"] == "drift_fix":
        return plan_drift_fix(
            resolved["release"],
            observed["kept"],
            observed["replace"],
            observed.get("missing", 0),
            observed.get("extra", 0),
        )
    if case["plan"] == "down":
        return plan_down(observed["release"], observed["instances"])
    serving = Serving(observed["release"], observed["in_service"], observed.get("warm", 0))
    desired = Desired(**{**resolved, "canary_weights": tuple(resolved["canary_weights"])})
    planner = {"deploy": plan_deploy, "rollback": plan_rollback}[case["plan"]]
    return planner(serving, desired)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 8


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_the_planner_makes_the_expected_operations(path: Path) -> None:
    case = json.loads(path.read_text())
    operations = run_case(case)
    assert [op.to_json() for op in operations] == case["expected_operations"]
    assert tuple(Operation.from_json(op) for op in case["expected_operations"]) == operations


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="'patch' is not one of"):
        Operation.from_json({"kind": "patch"})


def test_operations_read_compactly() -> None:
    lines = [
        op.describe()
        for op in plan_deploy(Serving("v1", 2), Desired("v2", 2, "canary", canary_weights=(10,)))
    ]
    assert lines == [
        "create 2 × v2",
        "wait until 2 healthy",
        "canary step 1: 10% to v2",
        "analyse canary step 1",
        "switch traffic v1 → v2",
        "drain 2 × v1 (keep warm)",
    ]


def test_a_first_deployment_routes_traffic_rather_than_switching_it() -> None:
    switch = plan_deploy(Serving(None), Desired("v1", 1))[-1]
    assert switch.describe() == "route traffic to v1"
