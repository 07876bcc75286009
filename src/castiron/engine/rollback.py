"""Rollback: back to the last known-good release, by a pointer flip when it is still warm.

Owns choosing the target (the newest release that a deployment to this environment completed
successfully, other than the one serving; a failed release is never a target) and the two
ways to get there: a *warm* rollback switches the router back to the previous release's
instances, which were kept running for ``keep_warm`` (no instance is created: one request to
the traffic controller checks that the route still serves the current release and that every
warm instance answers its health check, then flips the route); a *cold* rollback is a fresh
blue-green deployment of the stored release, also taken when the flip is refused (the route
is then left untouched and the refused attempt is closed as ``aborted``). Both are journaled
and audited as deployments with strategy ``rollback``.

Every verb takes the :class:`~castiron.engine.context.EngineContext`. It knows nothing of the
CLI; it needs no spec (the release and the environment's policy are
read from the state store).
"""

from __future__ import annotations

from dataclasses import replace

from castiron.engine.context import EngineContext
from castiron.engine.deploy import DeployResult, Target, plan_target, run
from castiron.engine.journal import Journal, new_deployment_id
from castiron.engine.records import in_service, load_release
from castiron.engine.recovery import locked, set_env, undo
from castiron.engine.release import Release
from castiron.engine.strategies import (
    DriverOnUse,
    ImageRuntime,
    Policy,
    Rollout,
    backends_of,
)
from castiron.errors import NotFoundError, UsageError
from castiron.model import ReleaseId
from castiron.state.base import DeploymentRow, InstanceRow, StateTx
from castiron.values import value


@value
class RollbackChoice:
    """Where a rollback goes and whether it can be a pointer flip."""

    release: Release
    current: ReleaseId | None
    warm: tuple[InstanceRow, ...]
    """The target's instances still running and warm (empty: a cold rollback)."""


def known_good(ctx: EngineContext, environment: str) -> list[str]:
    """Releases that a deployment to ``environment`` completed successfully, newest first."""
    seen: list[str] = []
    for deployment in ctx.store.list_deployments(environment):
        if deployment.outcome == "succeeded" and deployment.to_release not in seen:
            seen.append(deployment.to_release)
    return seen


def choose(ctx: EngineContext, environment: str, to: str | None = None) -> RollbackChoice:
    """Pick the rollback target of ``environment`` (``to``: a release id or unique prefix).

    Raises:
        NotFoundError: when the environment was never deployed.
        UsageError: when there is no known-good release to go back to, or ``to`` is not one.
    """
    row = ctx.store.get_environment(environment)
    if row is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    current = row.current_release
    good = known_good(ctx, environment)
    if to is not None:
        hits = [r for r in good if r.startswith(to)]
        if not hits:
            failed = [r.id for r in ctx.store.list_releases(environment) if r.id.startswith(to)]
            why = "it never deployed successfully there" if failed else "there is no such release"
            raise UsageError(
                f"cannot roll {environment!r} back to {to!r}: {why} "
                f"(known-good: {', '.join(good) or 'none'})"
            )
        if len(hits) > 1:
            raise UsageError(f"release prefix {to!r} is ambiguous: {', '.join(hits)}")
        target = hits[0]
        if target == current:
            raise UsageError(f"{environment!r} already serves release {target}")
    else:
        candidates = [r for r in good if r != current]
        if not candidates:
            raise UsageError(
                f"no known-good release of {environment!r} to roll back to "
                f"(serving {current or 'nothing'})"
            )
        target = candidates[0]
    release = load_release(ctx.store, target)
    warm = tuple(
        r
        for r in ctx.store.list_instances(environment)
        if r.release == target and r.status == "warm"
    )
    return RollbackChoice(release, current, warm)


def rollback(
    ctx: EngineContext, environment: str, *, to: str | None = None, lock_wait: float = 0.0
) -> DeployResult:
    """Roll ``environment`` back to its last known-good release (or ``to``).

    Raises:
        NotFoundError, UsageError: as :func:`choose`.
        LockedError: when another process holds the environment.
        DeployFailedError: when a cold rollback's new instances fail (traffic never moved).
    """
    started = ctx.monotonic()
    with locked(ctx, environment, f"rollback {to or 'known-good'}", lock_wait):
        choice = choose(ctx, environment, to)
        row = ctx.store.get_environment(environment)
        assert row is not None  # choose() checked it
        policy = Policy.from_json(row.config)
        release = choice.release
        if len(choice.warm) >= release.config.replicas:
            ctx.observer.progress(
                f"rolling {environment} back to release {release.id}: "
                f"{len(choice.warm)} warm instance(s), switching traffic"
            )
            flipped = _flip(ctx, choice, policy, started)
            if isinstance(flipped, DeployResult):
                return flipped
            why = f"the flip was refused ({flipped})"
        else:
            why = "no warm instances"
        ctx.observer.progress(
            f"rolling {environment} back to release {release.id}: {why}, "
            "deploying it afresh (blue-green)"
        )
        target = Target(release, policy, None, None)
        plan = plan_target(ctx, target, "blue-green")
        return run(ctx, target, plan, started, "blue-green", label="rollback")


def _flip(
    ctx: EngineContext, choice: RollbackChoice, policy: Policy, started: float
) -> DeployResult | str:
    """Flip the route to the warm set; the reason when the traffic controller refused (the
    attempt is then closed as ``aborted`` and traffic never moved)."""
    release = choice.release
    environment = release.environment
    previous = [
        r
        for r in in_service(ctx.store, environment)
        if r.release != release.id and r.release == choice.current
    ]
    deployment = DeploymentRow(
        id=new_deployment_id(),
        environment=environment,
        from_release=choice.current,
        to_release=release.id,
        strategy="rollback",
        actor=ctx.store.actor,
        started=ctx.store.clock.now(),
        details={"digest": release.digest, "warm": True},
    )
    journal = Journal.open(
        ctx.store,
        deployment,
        ctx.observer,
        lambda tx: None,
        {"previous": [r.id for r in previous], "release": release.id, "warm": True},
    )
    rollout = Rollout(
        journal=journal,
        release=release,
        policy=policy,
        # A flip creates nothing: the image and its runtime are not needed.
        image=None,
        runtime=ImageRuntime((), (), "/", None),
        secrets={},
        driver=DriverOnUse(policy.runtime, ctx.driver),
        traffic=ctx.traffic,
        previous=previous,
        prober=ctx.prober,
        monotonic=ctx.monotonic,
        sleep=ctx.sleep,
    )
    ids = [r.id for r in choice.warm]
    check = replace(release.config.health, healthy_after=1, start_period=0.0)
    step = {"to": ids, "keep": [], "final": True}
    journal.step("switch", step)
    try:
        outcome = ctx.traffic.flip(
            environment,
            policy.listen,
            backends_of(release.id, choice.warm),
            expect=choice.current,
            check=check,
            env=dict(release.config.env),
            drain_timeout=policy.drain_timeout,
            limits=policy.limits,
            access_log=policy.access_log,
        )
    except (Exception, KeyboardInterrupt) as exc:
        undo(ctx, deployment, journal.steps(), policy, "failed", error=str(exc))
        raise
    if not outcome.flipped:
        journal.finish("aborted", {"warm": True, "refused": outcome.reason})
        return outcome.reason
    switched = ctx.monotonic()

    def on(tx: StateTx) -> None:
        for instance_id in ids:
            tx.set_instance_status(instance_id, "running")
        set_env(ctx, tx, environment, policy, current=release.id)

    journal.step("switched", step, on)
    ctx.observer.progress(f"traffic switched: all on release {release.id}")
    rollout.drain(previous)

    def apply(tx: StateTx) -> None:
        set_env(ctx, tx, environment, policy, current=release.id, known_good=release.id)

    journal.finish("succeeded", {"warm": True}, apply)
    return DeployResult(
        environment,
        release.id,
        release.digest,
        "succeeded",
        ctx.monotonic() - started,
        deployment.id,
        {"switch_s": switched - started, "health_s": 0.0},
    )


__all__ = ["RollbackChoice", "choose", "known_good", "rollback"]
