"""What the API and the dashboard ask of castiron: the same library calls as the CLI.

Owns one function per read (environments at a glance, an environment's status, releases and
their diff, history, a deployment with its steps, the audit log and its verification, drift,
promotion gates and approvals, locks) and per mutation (deploy, rollback, promote, approve,
canary continue/abort, down). Mutations open their own engine whose state store records the
caller's :class:`~castiron.engine.access.Identity` as the actor, so they pass through the
same locks, policy gates and audit chain as the CLI's.

It knows nothing of HTTP (starlette) or HTML, and reads no process environment: the settings
were captured when the server started.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from castiron.api.events import EventWatcher
from castiron.compose import agent_running, drift_dir, open_engine, resolved_spec
from castiron.engine.access import Identity
from castiron.engine.deploy import Engine
from castiron.engine.journal import StepObserver
from castiron.errors import CastironError, NotFoundError, UsageError
from castiron.model import ReleaseId
from castiron.settings import Settings
from castiron.state.base import (
    AuditEntry,
    DeploymentRow,
    StateStore,
    format_time_short,
    parse_time,
)
from castiron.state.locks import LockManager

ABORT_WAIT = 120.0
"""Seconds an abort through the API waits for the canary to be undone."""


@runtime_checkable
class Following(Protocol):
    """An observer that wants the store its deployment is journaled in (to find it)."""

    def follow(self, store: StateStore) -> None: ...


@contextlib.contextmanager
def reading(settings: Settings) -> Iterator[Engine]:
    """An engine for reads: it never starts the agent."""
    with open_engine(settings, start_agent=False) as engine:
        yield engine


@contextlib.contextmanager
def state(settings: Settings) -> Iterator[StateStore]:
    """The state store of ``settings``, opened the way every command opens it."""
    with reading(settings) as engine:
        yield engine.store


@contextlib.contextmanager
def acting(
    settings: Settings, identity: Identity, observer: StepObserver | None = None
) -> Iterator[Engine]:
    """An engine whose every audit entry, lock and approval is recorded as ``identity``."""
    with open_engine(replace(settings, actor=identity.actor), observer=observer) as engine:
        if isinstance(observer, Following):
            observer.follow(engine.store)
        yield engine


def deployment_json(d: DeploymentRow) -> dict[str, Any]:
    """A deployment row as JSON (who, what, when, outcome)."""
    duration = (d.finished - d.started).total_seconds() if d.finished is not None else None
    return {
        "id": d.id,
        "environment": d.environment,
        "from": d.from_release,
        "to": d.to_release,
        "strategy": d.strategy,
        "actor": d.actor,
        "started": format_time_short(d.started),
        "finished": format_time_short(d.finished) if d.finished else None,
        "duration_s": None if duration is None else round(duration, 3),
        "outcome": d.outcome,
        "digest": d.details.get("digest"),
        "tag": d.details.get("tag"),
        "error": d.details.get("error"),
    }


class OverviewCache:
    """The last :func:`overview`, reused while nothing changed.

    Every change of state is a mutation, and every mutation appends to the audit chain, so
    the chain's head (and how far the event watcher read it, for drift) says exactly when the
    overview is stale; ages are computed afresh on each call. Measured: 50 concurrent API
    clients on 50 environments wait on one ~15 ms overview each without it (see
    docs/benchmarks.md)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._items: list[dict[str, Any]] = []

    def get(self, settings: Settings, watcher: EventWatcher | None) -> list[dict[str, Any]]:
        with reading(settings) as engine:
            head = engine.store.audit_head()
            key = (head.seq if head is not None else 0, watcher.last_seq if watcher else 0)
            with self._lock:
                if key != self._key:
                    self._items = _overview(engine, watcher)
                    self._key = key
                items = self._items
        now = datetime.now(UTC)
        return [_aged(item, now) for item in items]


def _aged(item: dict[str, Any], now: datetime) -> dict[str, Any]:
    """``item`` with its age now (and without the time it was computed from)."""
    out = {k: v for k, v in item.items() if k != "updated_at"}
    moment = item["updated_at"]
    out["age_s"] = None if moment is None else round((now - moment).total_seconds(), 1)
    return out


def overview(settings: Settings, watcher: EventWatcher | None) -> list[dict[str, Any]]:
    """Every environment at a glance: release, digest, health (instances running of those
    wanted), age, warm rollback target, drift, last deployment. No probes: one query per
    environment at most, for a dashboard that stays fast with thousands of deployments."""
    now = datetime.now(UTC)
    with reading(settings) as engine:
        items = _overview(engine, watcher)
    return [_aged(item, now) for item in items]


def _overview(engine: Engine, watcher: EventWatcher | None) -> list[dict[str, Any]]:
    store = engine.store
    instances: dict[str, list[Any]] = {}
    for row in store.list_instances():
        instances.setdefault(row.environment, []).append(row)
    out = []
    for env in store.list_environments():
        rows = instances.get(env.name, [])
        running = [r for r in rows if r.status == "running"]
        warm = sorted({r.release for r in rows if r.status == "warm"})
        release = store.get_release(env.current_release) if env.current_release else None
        wanted = release.config.get("replicas") if release is not None else None
        last = store.list_deployments(env.name, limit=1)
        drift = watcher.drift.get(env.name) if watcher is not None else None
        if not env.current_release:
            health = "down"
        elif isinstance(wanted, int) and len(running) >= wanted:
            health = "ok"
        else:
            health = "degraded"
        out.append(
            {
                "name": env.name,
                "runtime": env.runtime,
                "listen": env.listen,
                "release": env.current_release,
                "digest": release.digest if release is not None else None,
                "health": health,
                "instances": {"running": len(running), "wanted": wanted},
                "updated": format_time_short(env.updated) if env.updated else None,
                "updated_at": env.updated,
                "known_good": env.known_good_release,
                "warm": warm[0] if warm else None,
                "drift": None
                if drift is None
                else {"time": drift.time, "findings": drift.findings},
                "last_deployment": deployment_json(last[0]) if last else None,
            }
        )
    return out


def environment(settings: Settings, name: str) -> dict[str, Any]:
    """``castiron status ENV`` as JSON (health probes, router counters when the agent runs).

    Raises:
        NotFoundError: when the environment was never deployed.
    """
    from castiron.engine.status import environment_status

    router = agent_running(settings) is not None
    with reading(settings) as engine:
        return environment_status(engine, name, router=router)


def known(engine: Engine, name: str) -> None:
    """Raises NotFoundError when ``name`` was never deployed."""
    if engine.store.get_environment(name) is None:
        raise NotFoundError(f"environment {name!r} was never deployed")


def releases(settings: Settings, name: str) -> dict[str, Any]:
    """``castiron releases ENV`` as JSON."""
    from castiron.engine.status import releases as list_releases

    with reading(settings) as engine:
        known(engine, name)
        return list_releases(engine, name)


def history(settings: Settings, name: str, limit: int | None) -> dict[str, Any]:
    """Deployments of ``name``, newest first (who, what, when, outcome)."""
    with reading(settings) as engine:
        known(engine, name)
        rows = engine.store.list_deployments(name, limit=limit)
    return {"environment": name, "deployments": [deployment_json(d) for d in rows]}


def deployments(settings: Settings, name: str | None, limit: int | None) -> dict[str, Any]:
    """Deployments of every environment (or ``name``), newest first."""
    with reading(settings) as engine:
        rows = engine.store.list_deployments(name, limit=limit)
    return {"deployments": [deployment_json(d) for d in rows]}


def deployment(settings: Settings, deployment_id: str) -> dict[str, Any]:
    """A deployment with its journal steps and the events of its environment meanwhile.

    Raises:
        NotFoundError: when there is no such deployment.
    """
    with reading(settings) as engine:
        row = engine.store.get_deployment(deployment_id)
        if row is None:
            raise NotFoundError(f"no deployment {deployment_id!r}")
        steps = engine.store.steps(deployment_id)
        events = [
            e
            for e in engine.store.events(row.environment, since=row.started)
            if row.finished is None or e.time <= row.finished
        ]
    return {
        **deployment_json(row),
        "steps": [step_json(s) for s in steps],
        "events": [
            {"time": format_time_short(e.time), "kind": e.kind, "message": e.message}
            for e in events
        ],
    }


def step_json(step: Any) -> dict[str, Any]:
    """One journal step as JSON."""
    return {
        "seq": step.seq,
        "step": step.step,
        "state": step.state,
        "at": format_time_short(step.at),
        "data": dict(step.data),
    }


def release(settings: Settings, release_id: str) -> dict[str, Any]:
    """A release: digest and resolved config (secret values are never in it).

    Raises:
        NotFoundError: when there is no such release.
    """
    with reading(settings) as engine:
        row = engine.store.get_release(ReleaseId(release_id))
    if row is None:
        raise NotFoundError(f"no release {release_id!r}")
    return {
        "id": row.id,
        "environment": row.environment,
        "digest": row.digest,
        "created": format_time_short(row.created),
        "config": dict(row.config),
    }


def diff(settings: Settings, before: str, after: str) -> dict[str, Any]:
    """Field-level changes from release ``before`` to release ``after`` (secrets masked).

    Raises:
        NotFoundError: when either release is unknown.
    """
    from castiron.engine.plan import diff_releases

    with reading(settings) as engine:
        for rid in (before, after):
            if engine.store.get_release(ReleaseId(rid)) is None:
                raise NotFoundError(f"no release {rid!r}")
        changes = diff_releases(engine.load_release(before), engine.load_release(after))
    return {
        "from": before,
        "to": after,
        "changes": [{"field": c.field, "before": c.before, "after": c.after} for c in changes],
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "time": entry.time,
        "actor": entry.actor,
        "action": entry.action,
        "environment": entry.environment,
        "subject": entry.subject,
        "from": entry.from_,
        "to": entry.to,
        "result": entry.result,
        "details": dict(entry.details),
        "hash": entry.hash,
    }


def audit(
    settings: Settings, name: str | None, since: str | None, limit: int | None
) -> dict[str, Any]:
    """Audit entries (newest ``limit`` of them), oldest first.

    Raises:
        UsageError: when ``since`` is not an ISO 8601 time with a zone.
    """
    moment = None
    if since is not None:
        try:
            moment = parse_time(since)
        except ValueError:
            raise UsageError(f"since: {since!r} is not an ISO 8601 time with a zone") from None
    with reading(settings) as engine:
        entries = engine.store.audit_entries(name, since=moment)
    if limit is not None:
        entries = entries[-limit:] if limit else []
    return {"entries": [audit_json(e) for e in entries]}


def verify(settings: Settings) -> dict[str, Any]:
    """``castiron audit verify`` as JSON."""
    with reading(settings) as engine:
        return engine.store.verify_audit().as_json()


def drift(settings: Settings, name: str) -> dict[str, Any]:
    """A quick drift scan of ``name`` (changes nothing, records nothing).

    Raises:
        NotFoundError: when the environment was never deployed.
    """
    from castiron.engine.drift import detect_drift

    with reading(settings) as engine:
        known(engine, name)
        return detect_drift(engine.context, name, baselines=drift_dir(settings)).to_json()


def locks(settings: Settings) -> dict[str, Any]:
    """Every recorded lock, live or not."""
    with reading(settings) as engine:
        return {"locks": [s.as_json() for s in LockManager(engine.store).status()]}


def promotions(settings: Settings, name: str | None) -> dict[str, Any]:
    """Policy evaluations (each promotion or gated deployment), newest first."""
    with reading(settings) as engine:
        rows = engine.store.gate_results(environment=name)
    grouped: dict[str, dict[str, Any]] = {}
    for r in rows:
        item = grouped.setdefault(
            r.evaluation,
            {
                "evaluation": r.evaluation,
                "environment": r.environment,
                "release": r.release,
                "digest": r.digest,
                "checked": format_time_short(r.checked),
                "passed": True,
                "gates": [],
            },
        )
        item["gates"].append({"gate": r.gate, "passed": r.passed, "reason": r.reason})
        item["passed"] = item["passed"] and r.passed
    return {"promotions": list(reversed(grouped.values()))}


def gates(settings: Settings, name: str) -> dict[str, Any]:
    """The promotion gates of ``name``, the candidate release (what ``promote`` or ``deploy``
    would bring now), what each gate would say now, and its approvals.

    Raises:
        UsageError: when ``name`` is not in the spec; SpecError when the spec is invalid.
    """
    from castiron.engine.policy import preview
    from castiron.engine.promote import prepare

    spec = resolved_spec(settings)
    policy = spec.environment(name).gates
    with reading(settings) as engine:
        out: dict[str, Any] = {
            "environment": name,
            "promote_from": policy.source,
            "policy": policy.to_json(),
            "candidate": None,
            "preview": [],
            "approvals": [],
            "note": None,
        }
        try:
            if policy.source is not None:
                target = prepare(engine.context, spec, policy.source, name).target
            else:
                target = engine.resolve(spec, name, None)
        except CastironError as exc:
            out["note"] = str(exc)
            return out
        active = target.gates if target.gates is not None else policy
        out["candidate"] = {"release": target.release.id, "digest": target.release.digest}
        if active.active:
            out["preview"] = [r.to_json() for r in preview(engine.context, target, active).results]
        out["approvals"] = [
            {
                "actor": a.actor,
                "created": format_time_short(a.created),
                "comment": a.comment,
            }
            for a in engine.store.approvals(name, target.release.id)
        ]
    return out


# --- mutations ----------------------------------------------------------------------------------


def deploy(
    settings: Settings,
    identity: Identity,
    name: str,
    image: str | None,
    lock_wait: float,
    observer: StepObserver,
) -> dict[str, Any]:
    """``castiron deploy ENV [--image REF] --yes`` as ``identity``."""
    spec = resolved_spec(settings)
    with acting(settings, identity, observer) as engine:
        target = engine.resolve(spec, name, image)
        result = engine.deploy(target, lock_wait=lock_wait).to_json()
    return result


def rollback(
    settings: Settings,
    identity: Identity,
    name: str,
    to: str | None,
    lock_wait: float,
    observer: StepObserver,
) -> dict[str, Any]:
    """``castiron rollback ENV [--to RELEASE]`` as ``identity``."""
    from castiron.engine.rollback import rollback as roll_back

    with acting(settings, identity, observer) as engine:
        return roll_back(engine.context, name, to=to, lock_wait=lock_wait).to_json()


def promote(
    settings: Settings,
    identity: Identity,
    source: str,
    name: str,
    release_id: str | None,
    lock_wait: float,
    observer: StepObserver,
) -> dict[str, Any]:
    """``castiron promote FROM TO --yes`` as ``identity`` (through TO's gates)."""
    from castiron.engine.promote import prepare
    from castiron.engine.promote import promote as run_promotion

    spec = resolved_spec(settings)
    with acting(settings, identity, observer) as engine:
        promotion = prepare(engine.context, spec, source, name, release=release_id)
        return run_promotion(engine.context, promotion, lock_wait=lock_wait).to_json()


def approve(
    settings: Settings, identity: Identity, name: str, release_id: str, comment: str
) -> dict[str, Any]:
    """``castiron approve ENV RELEASE`` as ``identity`` (counted once per identity)."""
    from castiron.engine.promote import approve_as_token

    resolved_spec(settings).environment(name)  # an environment of the spec, or UsageError
    with acting(settings, identity) as engine:
        approval = approve_as_token(
            engine.store, name, release_id, identity, settings.os_user, comment
        )
    return {
        **approval.to_json(),
        "approvers": [str(a.identity) for a in approval.approvals if a.identity is not None],
    }


def canary_continue(settings: Settings, identity: Identity, name: str) -> dict[str, Any]:
    """``castiron deploy ENV --continue`` as ``identity``."""
    from castiron.engine.canary import request_control

    with acting(settings, identity) as engine:
        row = request_control(engine.store, name, "continue")
    return {"environment": name, "deployment": row.id, "requested": "continue"}


def canary_abort(
    settings: Settings, identity: Identity, name: str, observer: StepObserver
) -> dict[str, Any]:
    """``castiron abort ENV`` as ``identity``: waits until the deployment is undone.

    Raises:
        DeployFailedError: when it finished otherwise or is still running after the wait.
    """
    from castiron.engine.canary import request_control
    from castiron.errors import DeployFailedError

    with acting(settings, identity, observer) as engine:
        row: DeploymentRow | None = request_control(engine.store, name, "abort")
        assert row is not None
        deployment_id = row.id
        engine.housekeeping(name)
        deadline = time.monotonic() + ABORT_WAIT
        while row is not None and row.outcome == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            row = engine.store.get_deployment(deployment_id)
    if row is None or row.outcome == "running":
        raise DeployFailedError(
            f"asked deployment {deployment_id} of {name!r} to abort, but it is still running"
        )
    if row.outcome != "aborted":
        raise DeployFailedError(
            f"deployment {row.id} of {name!r} finished as {row.outcome} before the abort "
            "took effect (use rollback to go back)"
        )
    return {
        "environment": name,
        "deployment": row.id,
        "outcome": row.outcome,
        "release": row.from_release,
    }


def down(
    settings: Settings, identity: Identity, name: str, lock_wait: float, observer: StepObserver
) -> dict[str, Any]:
    """``castiron down ENV --yes`` as ``identity``."""
    with acting(settings, identity, observer) as engine:
        destroyed = engine.down(name, lock_wait=lock_wait)
    return {"environment": name, "destroyed": destroyed}


__all__ = [
    "Following",
    "OverviewCache",
    "acting",
    "approve",
    "audit",
    "canary_abort",
    "canary_continue",
    "deploy",
    "deployment",
    "deployment_json",
    "deployments",
    "diff",
    "down",
    "drift",
    "environment",
    "gates",
    "history",
    "locks",
    "overview",
    "promote",
    "promotions",
    "reading",
    "release",
    "releases",
    "rollback",
    "state",
    "verify",
]
