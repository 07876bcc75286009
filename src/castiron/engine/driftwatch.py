"""The host agent's drift watch of an environment, kept in line with the spec — audited.

Owns:

* the watch itself (:func:`drift_watch`, pure): the agent runs ``castiron drift ENV --json
  [--fix]`` as :class:`WatchCommand` says, every ``watch`` seconds;
* registering or dropping it through the agent's API (:class:`DriftWatches`), which the
  engine's deploy verb does after every deployment, whether the CLI or the API asked for it
  (a promotion, and a deployment by the Terraform provider, whose scans follow Terraform's
  terms, leave the watch as it is), and ``castiron drift ENV`` does too. Every change of the
  agent's schedule is audited (``drift.watch.registered`` with its interval and fix,
  ``drift.watch.dropped``); registering the watch the agent already runs changes nothing and
  records nothing.

What one check prints, the one JSON object the agent reads back, is
:func:`castiron.engine.drift.check_output`.

It knows nothing of click or HTTP; the composition root gives it the agent's client and the
command (built from the settings captured at the edge).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from castiron.agent.client import DriftWatch
from castiron.errors import CastironError, NotFoundError
from castiron.settings import Settings
from castiron.state.base import AuditDraft, StateStore
from castiron.values import value

if TYPE_CHECKING:
    from castiron.engine.resolve import DriftRules

WatchChange = Literal["registered", "dropped"]
"""What :meth:`DriftWatches.sync` changed in the agent's schedule."""


class WatchAgent(Protocol):
    """What the engine needs of the host agent for drift watches (its client has it)."""

    def watches(self) -> list[DriftWatch]:
        """The watches the agent runs. Raises AgentError."""
        ...

    def put_watch(self, watch: DriftWatch) -> None:
        """Register (or replace) ``watch``. Raises AgentError."""
        ...

    def delete_watch(self, environment: str) -> None:
        """Drop the watch of ``environment``. Raises NotFoundError (none), AgentError."""
        ...


@value
class WatchCommand:
    """How the agent runs one drift check of this castiron: ``argv`` then ``drift ENV --json``
    (and ``--fix``), in ``cwd``, with ``env`` added to the agent's environment (persisted by
    the agent: it holds no secret)."""

    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str] = field(default_factory=dict)


def watch_command(settings: Settings) -> WatchCommand:
    """The command of ``settings``' castiron: this interpreter running the CLI beside the spec,
    on the same ``CASTIRON_HOME`` and spec file."""
    return WatchCommand(
        argv=(sys.executable, "-m", "castiron.cli.main"),
        cwd=str(settings.spec_path.parent),
        env={"CASTIRON_HOME": str(settings.home), "CASTIRON_SPEC": str(settings.spec_path)},
    )


def drift_watch(command: WatchCommand, environment: str, rules: DriftRules) -> DriftWatch | None:
    """The agent's watch of ``environment`` per ``rules`` (None: ``rules`` ask for none)."""
    if rules.watch is None:
        return None
    argv = [*command.argv, "drift", environment, "--json"]
    if rules.fix:
        argv.append("--fix")
    return DriftWatch(
        environment=environment,
        argv=tuple(argv),
        cwd=command.cwd,
        interval=rules.watch,
        fix=rules.fix,
        env=dict(command.env),
    )


@dataclass(frozen=True)
class DriftWatches:
    """Registers the agent's drift watches, auditing each change in ``store``'s chain."""

    agent: Callable[[], WatchAgent]
    """The agent's client (made on use; it is not started for this)."""
    command: WatchCommand

    def sync(self, store: StateStore, environment: str, rules: DriftRules) -> WatchChange | None:
        """Register (or drop) the agent's watch of ``environment`` per ``rules`` and audit the
        change; None when the agent already runs what ``rules`` ask for.

        Raises:
            AgentError: when the agent cannot be reached or refuses the watch.
            StateError: when the audit entry cannot be written.
        """
        client = self.agent()
        want = drift_watch(self.command, environment, rules)
        if want is None:
            try:
                client.delete_watch(environment)
            except NotFoundError:
                return None
            store.mutate(
                AuditDraft("drift.watch.dropped", environment=environment, subject=environment),
                lambda tx: None,
            )
            return "dropped"
        if any(w == want for w in client.watches()):
            return None
        client.put_watch(want)
        store.mutate(
            AuditDraft(
                "drift.watch.registered",
                environment=environment,
                subject=environment,
                details={"interval": want.interval, "fix": want.fix},
            ),
            lambda tx: None,
        )
        return "registered"

    def keep(self, store: StateStore, environment: str, rules: DriftRules) -> WatchChange | None:
        """:meth:`sync` after a deployment: an agent that cannot be reached (or refuses)
        does not fail the deployment, and nothing is audited then."""
        with contextlib.suppress(CastironError):
            return self.sync(store, environment, rules)
        return None


__all__ = [
    "DriftWatches",
    "WatchAgent",
    "WatchChange",
    "WatchCommand",
    "drift_watch",
    "watch_command",
]
