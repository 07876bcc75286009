"""Plans: what a deployment will do, computed by a pure function and shown before acting.

Owns the release diff (digest, config changes with secrets masked, instance counts, strategy).
It performs no I/O: inputs are the current release, the target release and what runs. The
operations a plan runs are computed by :mod:`castiron.engine.operations` and carried here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from castiron.engine.operations import Operation
from castiron.engine.release import Release

MASK = "(secret)"


@dataclass(frozen=True)
class Change:
    """One difference between the current and the target release."""

    field: str
    before: str | None
    after: str | None


@dataclass(frozen=True)
class Plan:
    """What a deployment of ``target`` to its environment will do."""

    environment: str
    current: Release | None
    target: Release
    strategy: str
    changes: tuple[Change, ...]
    create: int
    destroy: int
    operations: tuple[Operation, ...] = ()
    """What will run, in order (see :mod:`castiron.engine.operations`)."""

    @property
    def has_changes(self) -> bool:
        """False when the environment already runs ``target`` with enough instances."""
        return bool(self.changes) or self.create > 0 or self.destroy > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "from": None if self.current is None else self.current.id,
            "to": self.target.id,
            "digest": self.target.digest,
            "strategy": self.strategy,
            "changes": [
                {"field": c.field, "before": c.before, "after": c.after} for c in self.changes
            ],
            "create": self.create,
            "destroy": self.destroy,
            "has_changes": self.has_changes,
            "operations": [op.to_json() for op in self.operations],
        }


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], out)
    elif isinstance(value, list | tuple):
        out[prefix] = ", ".join(str(v) for v in value)
    else:
        out[prefix] = "" if value is None else str(value)


def diff_releases(current: Release | None, target: Release) -> tuple[Change, ...]:
    """Field-level changes from ``current`` to ``target``; secret references are masked."""
    before: dict[str, str] = {}
    after: dict[str, str] = {}
    if current is not None:
        before["image"] = current.digest
        _flatten("", current.config.to_json(), before)
    after["image"] = target.digest
    _flatten("", target.config.to_json(), after)
    changes: list[Change] = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key.startswith("secrets."):
            old = None if old is None else MASK
            new = None if new is None else MASK
            if old == new:
                new = f"{MASK} (reference changed)"
        changes.append(Change(key, old, new))
    return tuple(changes)


def plan_deployment(current: Release | None, target: Release, running: int, strategy: str) -> Plan:
    """Plan moving an environment from ``current`` (with ``running`` instances) to ``target``.

    Deployments always create fresh instances and destroy the old ones; an environment already
    on ``target`` with enough instances gets an empty plan.
    """
    same = current is not None and current.id == target.id
    replicas = target.config.replicas
    if same:
        create = max(0, replicas - running)
        return Plan(target.environment, current, target, strategy, (), create, 0)
    return Plan(
        environment=target.environment,
        current=current,
        target=target,
        strategy=strategy,
        changes=diff_releases(current, target),
        create=replicas,
        destroy=running,
    )
