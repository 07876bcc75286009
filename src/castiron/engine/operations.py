"""Operations: what a deployment, a rollback, a drift fix or ``down`` will do, step by step.

Owns :class:`Operation` (one step: create instances, wait until they are healthy, switch
traffic, set a canary's weight, analyse a canary step, drain, destroy, remove the route) and
the pure planners that turn what is observed (:class:`Serving`) and what is resolved
(:class:`Desired`) into a tuple of them: :func:`plan_deploy` (blue-green, rolling, canary),
:func:`plan_rollback`, :func:`plan_drift_fix` and :func:`plan_down`. The same tuple is shown
by ``castiron plan`` and run by the executor (:func:`castiron.engine.strategies.execute`).

It performs no I/O and knows nothing of drivers, traffic, the state store or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from castiron.values import value

OperationKind = Literal[
    "create",
    "wait_healthy",
    "switch",
    "set_weight",
    "analyse",
    "drain",
    "destroy",
    "remove_route",
]
"""The closed set of steps a plan is made of."""

OPERATION_KINDS: tuple[str, ...] = get_args(OperationKind)

ROLLING_BATCH = "replaced by a rolling batch"
KEEP_WARM_ZERO = "keep_warm is 0"
"""Why drained instances are destroyed at once (recorded in their audit entry)."""


@value
class Operation:
    """One step of a plan; fields that do not apply to its kind keep their defaults."""

    kind: OperationKind
    release: str | None = None
    """The release the step acts on (created, routed to, drained, destroyed)."""
    count: int = 0
    """Instances created, waited for, routed to (a switch: the new set so far), drained or
    destroyed."""
    keep: int = 0
    """A switch: instances of the previous release left in the route (weighted by count)."""
    final: bool = False
    """A switch that completes the move: the environment then serves ``release``."""
    source: str | None = None
    """A switch: the release traffic moves from."""
    warm: bool = False
    """A switch: to instances kept warm (a pointer flip); a drain: kept warm afterwards."""
    step: int | None = None
    """A canary's step (0-based) for ``set_weight`` and ``analyse``."""
    weight: int | None = None
    """A canary step's share of requests, in percent."""
    reason: str | None = None
    """Why instances are destroyed."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind`` and the fields that apply (defaults are left out)."""
        out: dict[str, Any] = {"kind": self.kind}
        for name in ("release", "count", "keep", "final", "source", "warm"):
            value = getattr(self, name)
            if value:
                out[name] = value
        for name in ("step", "weight", "reason"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Operation:
        """The operation ``data`` describes (as :meth:`to_json` writes it).

        Raises:
            ValueError: when ``kind`` is not an operation kind.
        """
        kind = data.get("kind")
        if kind not in OPERATION_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(OPERATION_KINDS)}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def describe(self) -> str:
        """One line for people, e.g. ``create 2 × REL`` or ``switch traffic OLD → REL``."""
        release = self.release or "?"
        if self.kind == "create":
            return f"create {self.count} × {release}"
        if self.kind == "wait_healthy":
            return f"wait until {self.count} healthy"
        if self.kind == "switch":
            share = f" ({self.count}/{self.count + self.keep} instances)" if self.keep else ""
            warm = " (warm instances, a pointer flip)" if self.warm else ""
            if self.source is None:
                return f"route traffic to {release}{share}{warm}"
            return f"switch traffic {self.source} → {release}{share}{warm}"
        if self.kind == "set_weight":
            return f"canary step {(self.step or 0) + 1}: {self.weight}% to {release}"
        if self.kind == "analyse":
            return f"analyse canary step {(self.step or 0) + 1}"
        if self.kind == "drain":
            kept = "keep warm" if self.warm else "then destroy"
            return f"drain {self.count} × {release} ({kept})"
        if self.kind == "destroy":
            why = f" ({self.reason})" if self.reason else ""
            return f"destroy {self.count} × {release}{why}"
        return "remove the route"


@value
class Serving:
    """What is observed in an environment before a plan."""

    release: str | None
    """The release it serves (None: nothing yet)."""
    in_service: int = 0
    """Instances of ``release`` in service."""
    warm: int = 0
    """Instances of the target release kept warm (a rollback flips to them)."""


@value
class Desired:
    """What the environment is to run, as resolved (or recorded, for a rollback)."""

    release: str
    replicas: int
    strategy: str = "blue-green"
    batch: int = 1
    canary_weights: tuple[int, ...] = ()
    """The weight of each canary step (``strategy: canary``)."""
    keep_warm: float = 600.0
    whole_releases: bool = False
    """The runtime routes every instance of a release or none (a Kubernetes Service):
    a rolling batch's previous instances are destroyed at once."""


def plan_deploy(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    """The operations deploying ``desired`` runs; none when ``serving`` already runs its
    release with enough instances (otherwise the whole set is replaced, even for the same
    release)."""
    if serving.release == desired.release and serving.in_service >= desired.replicas:
        return ()
    return strategy_operations(serving, desired)


def strategy_operations(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    """The operations of ``desired.strategy`` replacing ``serving``'s instances in service
    by ``desired.replicas`` new ones (a canary with nothing serving switches at once)."""
    if desired.strategy == "rolling":
        return _rolling(serving, desired)
    if desired.strategy == "canary" and serving.in_service > 0:
        return _canary(serving, desired)
    return _blue_green(serving, desired)


def _start(desired: Desired, count: int) -> list[Operation]:
    return [
        Operation("create", desired.release, count),
        Operation("wait_healthy", desired.release, count),
    ]


def _retire(serving: Serving, desired: Desired) -> list[Operation]:
    """Drain the previous instances (kept warm unless ``keep_warm`` is 0)."""
    if serving.in_service <= 0:
        return []
    warm = desired.keep_warm > 0
    ops = [Operation("drain", serving.release, serving.in_service, warm=warm)]
    if not warm:
        ops.append(Operation("destroy", serving.release, serving.in_service, reason=KEEP_WARM_ZERO))
    return ops


def _switch(serving: Serving, desired: Desired, count: int, keep: int = 0) -> Operation:
    source = serving.release if serving.in_service > 0 else None
    return Operation("switch", desired.release, count, keep=keep, final=keep == 0, source=source)


def _blue_green(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    return (
        *_start(desired, desired.replicas),
        _switch(serving, desired, desired.replicas),
        *_retire(serving, desired),
    )


def _rolling(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    ops: list[Operation] = []
    batch = max(1, desired.batch)
    old = serving.in_service
    new = retired = 0
    while new < desired.replicas:
        count = min(batch, desired.replicas - new)
        ops += _start(desired, count)
        new += count
        keep = max(0, old - new) if new < desired.replicas else 0
        ops.append(_switch(serving, desired, new, keep))
        if desired.whole_releases:
            leaving = old - keep - retired
            if leaving > 0:
                ops.append(Operation("drain", serving.release, leaving))
                ops.append(Operation("destroy", serving.release, leaving, reason=ROLLING_BATCH))
                retired += leaving
    if not desired.whole_releases:
        ops += _retire(serving, desired)
    return tuple(ops)


def _canary(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    ops = _start(desired, desired.replicas)
    for index, weight in enumerate(desired.canary_weights):
        ops.append(Operation("set_weight", desired.release, step=index, weight=weight))
        ops.append(Operation("analyse", desired.release, step=index))
    return (*ops, _switch(serving, desired, desired.replicas), *_retire(serving, desired))


def plan_rollback(serving: Serving, desired: Desired) -> tuple[Operation, ...]:
    """The operations of a rollback to ``desired.release``: a pointer flip to its warm
    instances when there are enough of them, else a fresh blue-green deployment of it (also
    what runs when the traffic controller refuses the flip)."""
    if serving.warm >= desired.replicas:
        flip = Operation(
            "switch",
            desired.release,
            serving.warm,
            final=True,
            source=serving.release if serving.in_service > 0 else None,
            warm=True,
        )
        return (flip, *_retire(serving, desired))
    cold = Desired(desired.release, desired.replicas, "blue-green", keep_warm=desired.keep_warm)
    return strategy_operations(serving, cold)


def plan_drift_fix(
    release: str, kept: int, replace: int, missing: int = 0, extra: int = 0
) -> tuple[Operation, ...]:
    """The operations replacing ``replace`` drifted (or stopped) instances of ``release`` and
    adding ``missing`` ones beside the ``kept`` healthy ones, and retiring ``extra``: the new
    ones are health-gated, routed with the kept ones at once, then the leaving ones are
    drained and destroyed. Nothing to replace, add or retire: no operations."""
    count = replace + missing
    leaving = replace + extra
    if not count and not leaving:
        return ()
    ops: list[Operation] = []
    if count:
        ops += [
            Operation("create", release, count),
            Operation("wait_healthy", release, count),
        ]
    ops.append(Operation("switch", release, kept + count, final=True, source=release))
    ops.append(Operation("drain", release, leaving))
    if leaving:
        ops.append(Operation("destroy", release, leaving, reason="drift"))
    return tuple(ops)


def plan_down(release: str | None, instances: int) -> tuple[Operation, ...]:
    """The operations of taking an environment down: its route removed, then every one of
    its ``instances`` (in service, warm or stopping) destroyed, and any stray of it the
    runtime still runs (so there is a ``destroy`` even with no instance recorded)."""
    return (
        Operation("remove_route", release),
        Operation("destroy", release, instances, reason="down"),
    )


__all__ = [
    "KEEP_WARM_ZERO",
    "OPERATION_KINDS",
    "ROLLING_BATCH",
    "Desired",
    "Operation",
    "OperationKind",
    "Serving",
    "plan_deploy",
    "plan_down",
    "plan_drift_fix",
    "plan_rollback",
    "strategy_operations",
]
