"""The deployment journal: every step written (and audited) before it acts.

Owns the step vocabulary of a deployment (:data:`STEPS`), opening a deployment record,
appending steps, and closing it with an outcome, each in one audited :meth:`StateStore.mutate`
transaction together with the state change the step makes. An observer hears each step right
after it is journaled and before it acts, which is where progress is shown (and where a test
may stop the process, to prove recovery from that exact point).

It knows nothing of drivers, traffic or the CLI.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from castiron.state.base import (
    AuditDraft,
    DeploymentOutcome,
    DeploymentRow,
    JsonObject,
    StateStore,
    StateTx,
    StepRow,
)

STEPS = ("start", "create", "created", "health", "switch", "switched", "drain", "finish")
"""Journal steps in the order a deployment writes them.

``start`` the deployment is recorded; ``create`` an instance is about to be created (its id is
journaled first); ``created`` it exists and is recorded; ``health`` waiting for health;
``switch`` traffic is about to move; ``switched`` traffic has moved; ``drain`` the previous
instances leave service (kept warm); ``finish`` the outcome is about to be written.
"""


class StepObserver(Protocol):
    """Hears about a deployment as it goes (progress lines, test pauses)."""

    def step(self, step: str, data: JsonObject) -> None:
        """Called right after ``step`` is journaled, before it acts."""
        ...

    def progress(self, message: str) -> None:
        """A line for a human watching the deployment."""
        ...


class SilentObserver:
    """An observer that ignores everything."""

    def step(self, step: str, data: JsonObject) -> None:
        pass

    def progress(self, message: str) -> None:
        pass


def new_deployment_id() -> str:
    """A fresh deployment id: ``d-`` and 12 random hex digits."""
    return "d-" + secrets.token_hex(6)


@dataclass
class Journal:
    """The journal of one deployment in ``store``."""

    store: StateStore
    deployment: DeploymentRow
    observer: StepObserver

    @property
    def id(self) -> str:
        """The deployment id."""
        return self.deployment.id

    @classmethod
    def open(
        cls,
        store: StateStore,
        deployment: DeploymentRow,
        observer: StepObserver,
        prepare: Callable[[StateTx], None],
        details: JsonObject,
    ) -> Journal:
        """Record ``deployment`` as started (after ``prepare`` records what it needs, such as
        the image and the release) and journal its ``start`` step, in one audited transaction.

        Raises:
            StateError: when the database cannot be written.
        """
        d = deployment

        def apply(tx: StateTx) -> None:
            prepare(tx)
            tx.create_deployment(d)
            tx.append_step(d.id, "start", "ok", dict(details), store.clock.now())

        store.mutate(
            AuditDraft(
                "deploy.start",
                environment=d.environment,
                subject=d.id,
                from_=d.from_release,
                to=d.to_release,
                details={"strategy": d.strategy, **dict(details)},
            ),
            apply,
        )
        journal = cls(store, d, observer)
        observer.step("start", details)
        return journal

    def step(
        self,
        step: str,
        data: JsonObject | None = None,
        apply: Callable[[StateTx], Any] | None = None,
        *,
        state: str = "ok",
    ) -> None:
        """Journal ``step`` (and make ``apply``'s state change in the same transaction).

        Raises:
            StateError: when the database cannot be written.
        """
        payload = dict(data or {})

        def run(tx: StateTx) -> None:
            tx.append_step(self.id, step, state, payload, self.store.clock.now())
            if apply is not None:
                apply(tx)

        self.store.mutate(
            AuditDraft(
                f"deploy.{step}",
                environment=self.deployment.environment,
                subject=self.id,
                details=payload,
            ),
            run,
        )
        self.observer.step(step, payload)

    def finish(
        self,
        outcome: DeploymentOutcome,
        details: JsonObject | None = None,
        apply: Callable[[StateTx], Any] | None = None,
        *,
        action: str = "deploy.finish",
    ) -> DeploymentRow:
        """Close the deployment with ``outcome`` (audited with ``result`` = the outcome).

        Raises:
            StateError: when the database cannot be written.
        """
        return finish_deployment(
            self.store, self.deployment, outcome, details, apply, action=action
        )

    def steps(self) -> list[StepRow]:
        """Every step journaled so far, in order."""
        return self.store.steps(self.id)


def finish_deployment(
    store: StateStore,
    deployment: DeploymentRow,
    outcome: DeploymentOutcome,
    details: JsonObject | None = None,
    apply: Callable[[StateTx], Any] | None = None,
    *,
    action: str = "deploy.finish",
) -> DeploymentRow:
    """Write ``deployment``'s ``finish`` step and outcome in one audited transaction.

    Raises:
        StateError: when the database cannot be written.
    """
    payload = dict(details or {})
    now = store.clock.now()

    def run(tx: StateTx) -> DeploymentRow:
        tx.append_step(deployment.id, "finish", outcome, payload, now)
        if apply is not None:
            apply(tx)
        return tx.finish_deployment(deployment.id, outcome, now, payload)

    return store.mutate(
        AuditDraft(
            action,
            environment=deployment.environment,
            subject=deployment.id,
            from_=deployment.from_release,
            to=deployment.to_release,
            result=outcome,
            details=payload,
        ),
        run,
    )


__all__ = [
    "STEPS",
    "Journal",
    "SilentObserver",
    "StepObserver",
    "finish_deployment",
    "new_deployment_id",
]
