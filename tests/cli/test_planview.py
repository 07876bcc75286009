"""The plan as people and scripts read it: the operations that will run, one compact line
each, and the same operations in the plan's JSON beside every key it had before."""

from __future__ import annotations

from dataclasses import replace

from castiron.cli.planview import render_plan
from castiron.engine.operations import Desired, Serving, plan_deploy
from castiron.engine.plan import Plan, plan_deployment
from castiron.engine.release import resolve_release
from castiron.model import Digest
from castiron.spec.schema import Spec

SPEC = Spec.model_validate(
    {
        "app": "hello",
        "service": {"port": 8000, "replicas": 2},
        "environments": {"staging": {"listen": "127.0.0.1:8080"}},
    }
)
V1 = resolve_release(SPEC, "staging", Digest("sha256:" + "1" * 64))
V2 = resolve_release(SPEC, "staging", Digest("sha256:" + "2" * 64))


def planned(strategy: str = "blue-green", keep_warm: float = 600.0) -> Plan:
    plan = plan_deployment(V1, V2, 2, strategy)
    desired = Desired(V2.id, 2, strategy, keep_warm=keep_warm, canary_weights=(25,))
    return replace(plan, operations=plan_deploy(Serving(V1.id, 2), desired))


def test_the_plan_lists_its_operations() -> None:
    lines = render_plan(planned(), "v2", 600.0)
    at = lines.index("  operations:")
    assert lines[at + 1 :] == [
        f"    1. create 2 × {V2.id} (blue-green)",
        "    2. wait until 2 healthy",
        f"    3. switch traffic {V1.id} → {V2.id}",
        f"    4. drain 2 × {V1.id} (keep warm)",
    ]


def test_a_canary_plan_lists_its_steps_and_a_cold_drain_its_destroy() -> None:
    lines = render_plan(planned("canary", 0.0), None, 0.0)
    assert f"    3. canary step 1: 25% to {V2.id}" in lines
    assert "    4. analyse canary step 1" in lines
    assert lines[-2:] == [
        f"    6. drain 2 × {V1.id} (then destroy)",
        f"    7. destroy 2 × {V1.id} (keep_warm is 0)",
    ]


def test_the_json_keeps_its_keys_and_adds_the_operations() -> None:
    data = planned().to_json()
    assert list(data) == [
        "environment",
        "from",
        "to",
        "digest",
        "strategy",
        "changes",
        "create",
        "destroy",
        "has_changes",
        "operations",
    ]
    assert [op["kind"] for op in data["operations"]] == [
        "create",
        "wait_healthy",
        "switch",
        "drain",
    ]
    assert data["operations"][2] == {
        "kind": "switch",
        "release": V2.id,
        "count": 2,
        "final": True,
        "source": V1.id,
    }


def test_an_unchanged_plan_lists_no_operations() -> None:
    plan = plan_deployment(V2, V2, 2, "blue-green")
    assert "  operations:" not in render_plan(plan, None, 600.0)
    assert plan.to_json()["operations"] == []
