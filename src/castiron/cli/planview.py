"""How a plan reads for people before it runs: the plan's lines, its target's tag, the gates
and what each would say now, and the confirmation that follows them.

Shared by ``plan``, ``deploy``, ``rollback`` and ``promote``; the engine is imported on use so
CLI start-up stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from castiron.cli.context import CliContext
from castiron.cli.options import confirm

if TYPE_CHECKING:
    from castiron.engine.deploy import Engine, Target
    from castiron.engine.plan import Plan
    from castiron.engine.resolve import GatePolicy


def confirm_plan(
    cli: CliContext,
    engine: Engine,
    target: Target,
    plan: Plan,
    question: str,
    yes: bool,
    why: str | None = None,
) -> None:
    """Show ``plan`` and ``target``'s gates on stderr, then ask ``question`` (see
    :func:`confirm`) when the plan changes anything.

    Raises:
        UsageError: without a terminal and without ``--yes``.
        click.Abort: when the answer is no.
    """
    for line in render_plan(plan, tag_of(engine, target), target.policy.keep_warm, why):
        click.echo(line, err=True)
    if target.gates is not None and target.gates.active:
        for line in render_gates(engine, target):
            click.echo(line, err=True)
    if plan.has_changes:
        confirm(cli, question, yes)


def render_plan(plan: Plan, tag: str | None, keep_warm: float, why: str | None = None) -> list[str]:
    """The plan as lines for people (``why``: how the image was chosen)."""
    src = plan.current.id if plan.current is not None else "nothing"
    lines = [
        f"plan for {plan.environment}: {src} -> {plan.target.id} ({plan.strategy})",
        f"  image: {plan.target.digest}" + (f" (tag {tag})" if tag else ""),
    ]
    if why:
        lines.append(f"  image chosen: {why}")
    if not plan.has_changes:
        lines.append("  no changes: the environment already runs this release")
        return lines
    for change in plan.changes:
        if change.field == "image" or (
            plan.current is None and not change.field.startswith("env.")
        ):
            continue
        before = "(none)" if change.before is None else change.before
        after = "(none)" if change.after is None else change.after
        lines.append(f"  {change.field}: {before} -> {after}")
    if plan.current is None:
        cfg = plan.target.config
        lines.append(f"  new environment: {cfg.replicas} replica(s), health {cfg.health.kind}")
    warm = f"kept warm {keep_warm:g}s" if keep_warm > 0 else "destroyed after draining"
    drain = f", drain {plan.destroy} ({warm})" if plan.destroy else ""
    lines.append(f"  instances: create {plan.create}{drain}")
    if plan.operations:
        lines.append("  operations:")
        lines += [f"    {n}. {line}" for n, line in enumerate(operation_lines(plan), 1)]
    return lines


def operation_lines(plan: Plan) -> list[str]:
    """The plan's operations, one compact line each, releases named by their id (the
    first ``create`` also names the strategy)."""
    lines = []
    named = False
    for op in plan.operations:
        line = op.describe()
        if op.kind == "create" and not named:
            line += f" ({plan.strategy})"
            named = True
        lines.append(line)
    return lines


def tag_of(engine: Engine, target: Target) -> str | None:
    """The target's tag: the one it was named by, else the first tag bound to its digest."""
    if target.tag is not None:
        return target.tag
    for tag, digest in engine.images.tags().items():
        if digest == target.release.digest:
            return tag
    return None


def _describe(gates: GatePolicy, gate: str, url: str) -> str:
    from castiron.engine.policy import human_duration

    if gate == "require_signature":
        named = (
            ", ".join(gates.require_signature)
            if isinstance(gates.require_signature, tuple)
            else "any key in CASTIRON_HOME/keys"
        )
        return f"require_signature ({named})"
    if gate == "promote_from":
        return f"promote_from {gates.source}"
    if gate == "soak":
        return f"soak {human_duration(gates.soak or 0.0)} in {gates.source}"
    if gate == "approvals":
        return f"approvals {gates.approvals}"
    return f"checks: {len(gates.checks)} command(s) against {url}"


def render_gates(engine: Engine, target: Target) -> list[str]:
    """The plan's lines about ``target``'s gates: each gate and what it would say now (the
    checks run only when deploying). No lines when the environment has no gates."""
    from castiron.engine.policy import preview

    gates = target.gates
    if gates is None or not gates.active:
        return []
    report = preview(engine.context, target, gates)
    said = {r.gate: r for r in report.results}
    url = gates.check_url(engine.store)
    lines = [f"  gates of {target.environment} (checked before any instance is created):"]
    for gate in gates.active:
        result = said.get(gate)
        if result is None:
            verdict = "run when deploying"
        elif result.passed:
            verdict = f"ok: {result.reason}"
        else:
            verdict = f"would refuse: {result.reason}"
        lines.append(f"    {_describe(gates, gate, url)}: {verdict}")
    return lines


def gates_json(engine: Engine, target: Target) -> dict[str, object] | None:
    """The ``gates`` member of plan JSON: the policy and what each gate would say now."""
    from castiron.engine.policy import preview

    gates = target.gates
    if gates is None or not gates.active:
        return None
    report = preview(engine.context, target, gates)
    return {
        **gates.to_json(),
        "url": gates.check_url(engine.store),
        "preview": [r.to_json() for r in report.results],
    }


__all__ = [
    "confirm_plan",
    "gates_json",
    "operation_lines",
    "render_gates",
    "render_plan",
    "tag_of",
]
