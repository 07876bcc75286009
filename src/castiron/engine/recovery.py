"""Recovery and housekeeping of an environment: its lock, interrupted deployments, the
router's view mirrored into the records, and warm instances past their time.

Owns the verbs that run around every mutating command under the environment's lock
(:func:`locked`): finishing or undoing a deployment whose process died (:func:`recover`:
before the final traffic switch it is undone, after it it is completed), undoing a deployment
that failed (:func:`undo`, :func:`undo_failed`), adopting the agent's replacements
(:func:`reconcile`) and destroying warm instances past ``keep_warm`` (:func:`reap`). Every
verb takes the :class:`~castiron.engine.context.EngineContext`.

It must not know strategies, the spec or how a deployment starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from castiron.engine.journal import finish_deployment
from castiron.engine.records import load_release
from castiron.engine.strategies import Policy, backends_of, remove_instances, row_instance
from castiron.errors import CastironError, DeployFailedError, LockedError, NotFoundError
from castiron.model import ReleaseId
from castiron.state.base import (
    AuditDraft,
    DeploymentRow,
    EnvironmentRow,
    InstanceRow,
    StateTx,
    format_time,
    parse_time,
)

if TYPE_CHECKING:
    from castiron.engine.context import EngineContext


@contextlib.contextmanager
def locked(ctx: EngineContext, environment: str, purpose: str, wait: float = 0.0) -> Iterator[None]:
    """Hold ``environment``'s lock; recover and reconcile it first, and reap warm instances
    past ``keep_warm`` after the work (destroying them is housekeeping: it should not delay
    a deployment or a rollback; they are not in service, so it can wait).

    Raises:
        LockedError: when another live process holds it after ``wait`` seconds.
    """

    def waiting(lease: Any) -> None:
        ctx.observer.progress(f"waiting for the lock held by {lease.holder} ({lease.purpose})")

    with ctx.locks.acquire(environment, purpose, wait=wait, on_wait=waiting) as held:
        recover(ctx, environment)
        reconcile(ctx, environment)
        yield
        held.check()
        reap(ctx, environment)


def needs_housekeeping(ctx: EngineContext, environment: str | None = None) -> list[str]:
    """Environments with an interrupted deployment or a warm instance past keep_warm
    (two cheap reads each; no agent, no driver)."""
    names = (
        [environment]
        if environment is not None
        else [e.name for e in ctx.store.list_environments()]
    )
    now = ctx.store.clock.now()
    out = []
    for name in names:
        pending = any(d.outcome == "running" for d in ctx.store.list_deployments(name, limit=5))
        if pending or any(_warm_due(r, now) for r in ctx.store.list_instances(name)):
            out.append(name)
    return out


def housekeeping(ctx: EngineContext, environment: str | None = None) -> list[str]:
    """Recover interrupted deployments and reap expired warm instances where needed and
    the environment's lock is free; returns the environments it tidied.

    Raises:
        RuntimeDriverError, RouterError, AgentError, StateError: when recovery cannot act.
    """
    done = []
    for name in needs_housekeeping(ctx, environment):
        with contextlib.suppress(LockedError), locked(ctx, name, "recovery"):
            done.append(name)
    return done


def recover(ctx: EngineContext, environment: str) -> list[DeploymentRow]:
    """Finish or undo deployments of ``environment`` whose process died (call with the
    environment's lock held): after the final traffic switch they are completed, before
    it they are undone (new instances destroyed, traffic back where it was).

    Raises:
        StateError, RuntimeDriverError, RouterError, AgentError: when recovery cannot act.
    """
    done: list[DeploymentRow] = []
    for deployment in ctx.store.list_deployments(environment, limit=20):
        if deployment.outcome != "running":
            continue
        ctx.observer.progress(f"recovering interrupted deployment {deployment.id}")
        steps = ctx.store.steps(deployment.id)
        policy = policy_of(ctx, environment)
        finals = [s for s in steps if s.step in ("switch", "switched") and s.data.get("final")]
        forward = any(s.step == "switched" for s in finals)
        if not forward and finals:
            forward = _route_is_final(ctx, environment, deployment, finals[-1].data)
        if forward:
            done.append(_complete(ctx, deployment, steps, policy))
        else:
            done.append(undo(ctx, deployment, steps, policy, "aborted", recovered=True))
    return done


def _route_is_final(
    ctx: EngineContext, environment: str, deployment: DeploymentRow, data: Mapping[str, Any]
) -> bool:
    routing = ctx.traffic.current(environment)
    if routing is None or routing.stable is None or routing.canary_weight:
        return False
    return routing.stable.release == deployment.to_release and routing.backend_ids == set(
        data.get("to", [])
    )


def _complete(
    ctx: EngineContext, deployment: DeploymentRow, steps: Sequence[Any], policy: Policy
) -> DeploymentRow:
    previous = [str(i) for s in steps if s.step == "start" for i in s.data.get("previous", [])]
    rows = {r.id: r for r in ctx.store.list_instances(deployment.environment)}
    leaving = [rows[i] for i in previous if i in rows and rows[i].status == "running"]
    new_ids = [i for s in steps if s.step == "switched" for i in s.data.get("to", [])]
    now = ctx.store.clock.now()
    until = now.timestamp() + policy.keep_warm
    to = deployment.to_release

    def apply(tx: StateTx) -> None:
        for instance_id in new_ids:
            if instance_id in rows:
                tx.set_instance_status(instance_id, "running")
        for row in leaving:
            tx.set_instance_status(row.id, "warm", {"warm_until": _iso(until)})
        set_env(ctx, tx, deployment.environment, policy, current=to, known_good=to)

    return finish_deployment(
        ctx.store,
        deployment,
        "succeeded",
        {"recovered": True, "resolution": "completed after the traffic switch"},
        apply,
        action="deploy.recover",
    )


def undo_failed(
    ctx: EngineContext,
    exc: BaseException,
    deployment: DeploymentRow,
    steps: Sequence[Any],
    policy: Policy,
    outcome: Any,
    *,
    what: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Undo ``deployment`` after ``exc`` stopped it (call inside the ``except``).

    Returns only for an unexpected ``exc`` (not a :class:`CastironError`), which the caller
    re-raises as it is.

    Raises:
        DeployFailedError: naming ``what`` failed and that it was undone, or that undoing
            failed too (the next command retries the recovery).
    """
    reason = str(exc) if isinstance(exc, CastironError) else repr(exc)
    try:
        undo(ctx, deployment, steps, policy, outcome, error=reason, extra=extra)
    except CastironError as undo_exc:
        raise DeployFailedError(
            f"{reason}\nand undoing it failed too: {undo_exc} (the next castiron "
            f"command on {deployment.environment!r} retries the recovery)"
        ) from exc
    if isinstance(exc, DeployFailedError):
        raise exc
    if isinstance(exc, CastironError):
        raise DeployFailedError(f"{what} failed and was undone: {reason}") from exc


def undo(
    ctx: EngineContext,
    deployment: DeploymentRow,
    steps: Sequence[Any],
    policy: Policy,
    outcome: Any,
    *,
    recovered: bool = False,
    error: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> DeploymentRow:
    """Put traffic back on the previous instances, destroy this deployment's instances
    and close it with ``outcome`` (call with the lock held).

    Raises:
        RouterError, AgentError, RuntimeDriverError, StateError: when it cannot act.
    """
    environment = deployment.environment
    previous = [str(i) for s in steps if s.step == "start" for i in s.data.get("previous", [])]
    planned = {str(s.data.get("instance")) for s in steps if s.step == "create"}
    rows = {r.id: r for r in ctx.store.list_instances(environment)}
    back = [rows[i] for i in previous if i in rows]
    moved = any(s.step == "switch" for s in steps)
    if moved:
        if back:
            ctx.traffic.switch(
                environment,
                policy.listen,
                backends_of(back[0].release, back),
                drain_timeout=policy.drain_timeout,
                limits=policy.limits,
                access_log=policy.access_log,
            )
        else:
            ctx.traffic.remove(environment)
    ours = [r for r in rows.values() if r.data.get("deployment") == deployment.id]
    driver = ctx.driver(policy.runtime)
    for row in ours:
        driver.destroy(row_instance(row), grace=min(policy.drain_timeout, 10.0))
    known = {r.id for r in ours}
    for observed in driver.observe(policy.app, environment):
        if observed.instance.id in planned and observed.instance.id not in known:
            driver.destroy(observed.instance, grace=5.0)
    details: dict[str, Any] = {
        "resolution": "undone: new instances destroyed, traffic on the previous release",
        "destroyed": sorted(known),
    }
    if recovered:
        details["recovered"] = True
    if error:
        details["error"] = error[:500]
    details.update(extra or {})  # e.g. a canary's analysis figures
    back_ids = [r.id for r in back]

    def apply(tx: StateTx) -> None:
        remove_instances(tx, sorted(known))
        for instance_id in back_ids:
            if rows[instance_id].status != "running":
                tx.set_instance_status(instance_id, "running")
        set_env(ctx, tx, environment, policy, current=deployment.from_release)

    return finish_deployment(
        ctx.store,
        deployment,
        outcome,
        details,
        apply,
        action="deploy.recover" if recovered else "deploy.finish",
    )


def policy_of(ctx: EngineContext, environment: str) -> Policy:
    row = ctx.store.get_environment(environment)
    if row is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    return Policy.from_json(row.config)


def set_env(
    ctx: EngineContext,
    tx: StateTx,
    environment: str,
    policy: Policy,
    *,
    current: ReleaseId | None,
    known_good: ReleaseId | None = None,
) -> None:
    """Record (in ``tx``) that ``environment`` serves ``current`` under ``policy``."""
    row = ctx.store.get_environment(environment)
    tx.upsert_environment(
        EnvironmentRow(
            name=environment,
            runtime=policy.runtime,
            listen=policy.listen,
            config=policy.to_json(),
            current_release=current,
            known_good_release=known_good
            if known_good is not None
            else (row.known_good_release if row is not None else None),
            updated=ctx.store.clock.now(),
        )
    )


def reconcile(ctx: EngineContext, environment: str) -> list[str]:
    """Mirror what the router serves into the records (call with the lock held).

    The agent replaces an instance that died with a new one and swaps it into the route;
    the replacement is recorded here as in service, and records of instances that are gone
    are dropped. Returns the ids adopted or dropped.

    Raises:
        AgentError, StateError: when the router or the records cannot be read or written.
    """
    row = ctx.store.get_environment(environment)
    if row is None or row.current_release is None:
        return []
    routing = ctx.traffic.current(environment)
    if routing is None:
        return []
    policy = Policy.from_json(row.config)
    rows = {r.id: r for r in ctx.store.list_instances(environment)}
    adopt: list[InstanceRow] = []
    for backend_set in (routing.stable, routing.canary):
        if backend_set is None:
            continue
        release = ctx.store.get_release(ReleaseId(backend_set.release))
        for backend in backend_set.backends:
            if backend.id in rows or release is None:
                continue
            adopt.append(
                InstanceRow(
                    id=backend.id,
                    environment=environment,
                    release=release.id,
                    address=backend.address,
                    runtime=policy.runtime,
                    status="running",
                    data={"app": policy.app, "image": release.digest, "replacement": True},
                )
            )
    drop: list[str] = []
    stale = [r for r in rows.values() if r.status == "running" and r.id not in routing.backend_ids]
    if stale:
        driver = ctx.driver(policy.runtime)
        for r in stale:
            if driver.inspect(row_instance(r)).state in ("exited", "missing"):
                drop.append(r.id)
    if not adopt and not drop:
        return []

    def apply(tx: StateTx) -> None:
        for r in adopt:
            tx.put_instance(r)
        remove_instances(tx, drop)

    ctx.store.mutate(
        AuditDraft(
            "instance.reconcile",
            environment=environment,
            details={"adopted": [r.id for r in adopt], "dropped": drop},
        ),
        apply,
    )
    return [r.id for r in adopt] + drop


def reap(ctx: EngineContext, environment: str) -> list[str]:
    """Destroy warm instances of ``environment`` past their ``keep_warm``, and those beyond
    its ``keep_warm_releases`` (see :func:`surplus_warm`); call with the lock held.
    Returns their ids.

    Raises:
        RuntimeDriverError: when an instance cannot be destroyed.
    """
    now = ctx.store.clock.now()
    rows = ctx.store.list_instances(environment)
    expired = [r for r in rows if _warm_due(r, now)]
    env_row = ctx.store.get_environment(environment)
    surplus: list[InstanceRow] = []
    if env_row is not None:
        keep = Policy.from_json(env_row.config).keep_warm_releases
        live = [r for r in rows if r not in expired]
        drained = [
            d.from_release
            for d in ctx.store.list_deployments(environment, limit=200)
            if d.from_release is not None and d.outcome == "succeeded"
        ]
        surplus = surplus_warm(
            live, env_row.current_release, keep, lambda r: _replicas_of(ctx, r), drained
        )
    due = expired + surplus
    if not due:
        return []
    by_runtime: dict[str, list[InstanceRow]] = {}
    for row in due:
        by_runtime.setdefault(row.runtime, []).append(row)
    ids = [r.id for r in due]
    for runtime, group in by_runtime.items():
        driver = ctx.driver(runtime)
        for row in group:
            driver.destroy(row_instance(row), grace=5.0)
    why = [
        *(["keep_warm expired"] if expired else []),
        *(["beyond keep_warm_releases"] if surplus else []),
    ]
    ctx.store.mutate(
        AuditDraft(
            "instance.reap",
            environment=environment,
            subject=",".join(ids),
            details={"ids": ids, "why": " and ".join(why)},
        ),
        lambda tx: remove_instances(tx, ids),
    )
    if expired:
        ctx.observer.progress(f"destroyed {len(expired)} warm instance(s) past keep_warm")
    if surplus:
        ctx.observer.progress(
            f"destroyed {len(surplus)} warm instance(s) beyond keep_warm_releases"
        )
    return ids


def _replicas_of(ctx: EngineContext, release: ReleaseId) -> int:
    try:
        return load_release(ctx.store, release).config.replicas
    except CastironError:
        return 0  # an unknown release is no rollback target


def surplus_warm(
    rows: Sequence[InstanceRow],
    current: ReleaseId | None,
    keep: int,
    replicas_of: Callable[[ReleaseId], int],
    drained: Sequence[ReleaseId] = (),
) -> list[InstanceRow]:
    """The warm instances among ``rows`` that no rollback needs: copies of the ``current``
    release, instances of releases older than the ``keep`` most recently drained ones, and
    older copies of a kept release beyond its replica count (a release deployed again and
    again leaves a warm set each time). ``drained`` lists releases newest drained first (the
    ``from`` release of each succeeded deployment, newest first); within a release, and for
    releases it does not name, the later ``warm_until`` is newer. Pure."""
    rank: dict[str, int] = {}
    for i, release in enumerate(drained):
        rank.setdefault(release, i)
    warm = sorted(
        (r for r in rows if r.status == "warm"),
        key=lambda r: (
            -rank.get(r.release, len(rank)),
            str(r.data.get("warm_until", "")),
            r.id,
        ),
        reverse=True,
    )
    kept: dict[str, int] = {}
    out: list[InstanceRow] = []
    for row in warm:
        if row.release == current:
            out.append(row)
        elif row.release in kept:
            if kept[row.release] > 0:
                kept[row.release] -= 1
            else:
                out.append(row)
        elif len(kept) < keep:
            kept[row.release] = replicas_of(row.release) - 1
            if kept[row.release] < 0:
                out.append(row)
        else:
            out.append(row)
    return out


def _warm_due(row: InstanceRow, now: datetime) -> bool:
    if row.status not in ("warm", "stopping"):
        return False
    until = row.data.get("warm_until")
    if not isinstance(until, str):
        return True
    try:
        return parse_time(until) <= now
    except ValueError:
        return True


def _iso(timestamp: float) -> str:
    return format_time(datetime.fromtimestamp(timestamp, UTC))


__all__ = [
    "housekeeping",
    "locked",
    "needs_housekeeping",
    "policy_of",
    "reap",
    "reconcile",
    "recover",
    "set_env",
    "surplus_warm",
    "undo",
    "undo_failed",
]
