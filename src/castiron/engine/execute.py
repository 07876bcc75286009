"""The executor: runs a plan's operations (:mod:`castiron.engine.operations`) in order.

Owns :func:`execute` and what it runs operations through: :class:`Mechanics` (a
:class:`~castiron.engine.strategies.Rollout`, journaled as a deployment, a drift fix's
replacement, or what takes an environment down) and :class:`CanarySteps` (a canary's
weighted steps and analysis, see :mod:`castiron.engine.canary`). It journals nothing itself
and must not know strategies, drivers or the traffic controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from castiron.engine.operations import KEEP_WARM_ZERO, Operation
from castiron.errors import UsageError
from castiron.model import Instance
from castiron.state.base import InstanceRow


class CanarySteps(Protocol):
    """Runs a canary's steps for the executor (see :mod:`castiron.engine.canary`)."""

    def set_weight(self, new: Sequence[Instance], step: int) -> None:
        """Route canary step ``step``'s weight to ``new`` (after honouring an abort)."""
        ...

    def analyse(self, step: int) -> None:
        """Hold step ``step``'s window under analysis; raises when it fails."""
        ...


class Mechanics(Protocol):
    """What the executor runs operations through: a :class:`Rollout` (journaled as a
    deployment), or what takes an environment down."""

    @property
    def previous(self) -> Sequence[InstanceRow]:
        """The instances the operations take out of service, in order."""
        ...

    @property
    def executed(self) -> list[Operation]:
        """The operations run so far."""
        ...

    def create(self, count: int) -> list[Instance]: ...

    def wait_healthy(self, instances: Sequence[Instance]) -> None: ...

    def switch(
        self, new: Sequence[Instance], keep: Sequence[InstanceRow], *, final: bool
    ) -> None: ...

    def take_out(self, leaving: Sequence[InstanceRow], *, warm: bool) -> None: ...

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None: ...

    def remove_route(self) -> None: ...


def execute(
    rollout: Mechanics, operations: Sequence[Operation], canary: CanarySteps | None = None
) -> None:
    """Run ``operations`` in order through ``rollout`` (a :class:`Rollout` journals each of
    its steps before it acts): ``create`` and ``wait_healthy`` make a batch of new instances
    healthy, ``switch`` routes every new instance so far (with the last ``keep`` previous
    ones beside them), ``set_weight`` and ``analyse`` go to ``canary``, ``drain`` takes the
    next previous instances out of service, ``destroy`` destroys those just drained (or,
    after no drain, the next ``count`` previous ones), ``remove_route`` removes the route.
    Every operation run is appended to ``rollout.executed``.

    Raises:
        DeployFailedError: when new instances do not become healthy.
        UsageError: when an operation cannot run here (a canary step without a canary,
            or an operation ``rollout`` refuses).
        RuntimeDriverError, RouterError, AgentError, StateError: on infrastructure failures.
    """
    old = list(rollout.previous)
    new: list[Instance] = []
    batch: list[Instance] = []
    drained: list[InstanceRow] | None = None
    retired = 0
    for op in operations:
        rollout.executed.append(op)
        if op.kind == "create":
            batch = rollout.create(op.count)
        elif op.kind == "wait_healthy":
            rollout.wait_healthy(batch)
            new.extend(batch)
            batch = []
        elif op.kind == "switch":
            keep = old[len(old) - op.keep :] if op.keep else []
            rollout.switch(new, keep, final=op.final)
        elif op.kind in ("set_weight", "analyse"):
            if canary is None:
                raise UsageError(f"operation {op.kind!r} needs a canary")
            if op.kind == "set_weight":
                canary.set_weight(new, op.step or 0)
            else:
                canary.analyse(op.step or 0)
        elif op.kind == "drain":
            drained = old[retired : retired + op.count]
            retired += len(drained)
            rollout.take_out(drained, warm=op.warm)
        elif op.kind == "destroy":
            if drained is None:
                drained = old[retired : retired + op.count]
                retired += len(drained)
            rollout.destroy(drained, op.reason or KEEP_WARM_ZERO)
            drained = None
        else:
            rollout.remove_route()


__all__ = ["CanarySteps", "Mechanics", "execute"]
