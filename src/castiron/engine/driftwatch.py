"""The host agent's drift watch of an environment, kept in line with the spec.

Owns finding an environment's drift rules (watch schedule, fix, ignore patterns) in the
resolved spec and registering or dropping the agent's periodic
``castiron drift ENV --json [--fix]``: after every deployment, whether the CLI or the API
(``castiron serve``) made it. It knows nothing of click or HTTP; the settings carry the spec
path and the environment captured at the edge.
"""

from __future__ import annotations

import contextlib
import sys

from castiron.engine.resolve import DriftRules
from castiron.errors import CastironError, NotFoundError
from castiron.settings import Settings


def drift_rules(settings: Settings, environment: str) -> DriftRules:
    """The ``drift`` section of ``environment`` in the settings' resolved spec (defaults
    without a spec file or without that environment in it).

    Raises:
        SpecError: when the spec file exists but does not validate.
    """
    if not settings.spec_path.is_file():
        return DriftRules()
    from castiron.engine.compose import resolved_spec

    env = resolved_spec(settings).environments.get(environment)
    return DriftRules() if env is None else env.drift


def sync_watch(settings: Settings, environment: str, rules: DriftRules) -> None:
    """Register (or drop) the agent's periodic ``castiron drift ENVIRONMENT`` per ``rules``.

    Raises:
        AgentError: when the agent cannot be reached.
    """
    from castiron.agent.client import AgentClient, DriftWatch, socket_path

    client = AgentClient(socket_path(settings), timeout=5.0)
    if rules.watch is None:
        with contextlib.suppress(NotFoundError):
            client.delete_watch(environment)
        return
    argv = [sys.executable, "-m", "castiron.cli.main", "drift", environment, "--json"]
    if rules.fix:
        argv.append("--fix")
    client.put_watch(
        DriftWatch(
            environment=environment,
            argv=tuple(argv),
            cwd=str(settings.spec_path.parent),
            interval=rules.watch,
            fix=rules.fix,
            env={"CASTIRON_HOME": str(settings.home), "CASTIRON_SPEC": str(settings.spec_path)},
        )
    )


def watch_after_deploy(settings: Settings, environment: str, rules: DriftRules) -> None:
    """After a deployment: keep the agent's drift watch of ``environment`` in line with
    ``rules`` (from the resolved spec the deployment used); a watch that cannot be registered
    does not fail the deployment."""
    with contextlib.suppress(CastironError):
        sync_watch(settings, environment, rules)


__all__ = ["drift_rules", "sync_watch", "watch_after_deploy"]
