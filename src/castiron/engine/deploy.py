"""The deploy verbs — deploy, run, down — and :class:`Engine`, the facade of every verb.

Owns running a deployment under the environment's lock (:func:`deploy`: plan, gates, then
:func:`run`): every step is journaled before it acts, a failure undoes what was created and
leaves traffic where it was. It also takes an environment down (:func:`down`). Each verb takes
the :class:`~castiron.engine.context.EngineContext`; resolving and planning are the verbs of
:mod:`castiron.engine.targets` (re-exported here), recovery, undoing and reaping those of
:mod:`castiron.engine.recovery`.

:class:`Engine` holds one context and offers every verb as a method (what the CLI, the API,
the Terraform provider and the other verbs call). The engine is given its collaborators and
never reads the process environment, prints, or exits; the composition root
(:mod:`castiron.compose`) builds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.drivers.base import Driver
from castiron.engine import recovery
from castiron.engine.context import EngineContext, Lazy
from castiron.engine.execute import execute
from castiron.engine.journal import (
    Journal,
    SilentObserver,
    StepObserver,
    new_deployment_id,
)
from castiron.engine.operations import Operation, plan_down
from castiron.engine.records import current_release, in_service, load_release
from castiron.engine.recovery import locked, policy_of, set_env, surplus_warm, undo_failed
from castiron.engine.release import Release
from castiron.engine.strategies import (
    STRATEGIES,
    ImageRuntime,
    Policy,
    Prober,
    Rollout,
    Target,
    remove_instances,
    row_instance,
)
from castiron.engine.targets import image_runtime, newest_image, plan_target, resolve
from castiron.errors import (
    CastironError,
    UsageError,
)
from castiron.health import probe
from castiron.model import ImageRef, Instance, ReleaseId
from castiron.settings import current_os_user
from castiron.state.base import (
    AuditDraft,
    DeploymentRow,
    EnvironmentRow,
    ImageRow,
    InstanceRow,
    ReleaseRow,
    StateStore,
    StateTx,
)
from castiron.state.locks import LockManager
from castiron.values import value

if TYPE_CHECKING:  # loading a spec needs pydantic; read commands never do
    from castiron.engine.driftwatch import DriftWatches
    from castiron.engine.plan import Plan
    from castiron.engine.resolve import DriftRules, ResolvedSpec
    from castiron.images.store import ImageStore
    from castiron.spec.load import LoadedSpec
    from castiron.traffic.controller import TrafficController


@value
class DeployResult:
    """What a deployment (or rollback) did."""

    environment: str
    release: str
    digest: str
    outcome: str
    """``succeeded``, ``unchanged``, ``failed`` or ``aborted``."""
    duration_s: float
    deployment: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)
    """``switch_s`` (start to traffic switched), ``health_s`` (waiting for health)."""
    operations: tuple[Operation, ...] = ()
    """The operations the executor ran (see :mod:`castiron.engine.operations`)."""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``castiron deploy`` / ``rollback``."""
        return {
            "environment": self.environment,
            "release": self.release,
            "digest": self.digest,
            "outcome": self.outcome,
            "duration_s": round(self.duration_s, 3),
            "deployment": self.deployment,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


def strategy_runner(name: str) -> Callable[[Rollout], None]:
    """The strategy called ``name`` (``strategy.type``); the canary's module is imported on
    use.

    Raises:
        UsageError: when no strategy has that name.
    """
    if name == "canary":
        from castiron.engine.canary import run_canary

        return run_canary
    for known, run in STRATEGIES.items():
        if known == name:
            return run
    names = ", ".join([*STRATEGIES, "canary"])
    raise UsageError(f"strategy {name!r} is not available (use one of: {names})")


class Engine:
    """Deploys releases to environments; one per CLI invocation (or API request).

    It holds one :class:`~castiron.engine.context.EngineContext` (:attr:`context`) and offers
    the verbs as methods, each delegating to its module's function with that context.
    """

    def __init__(
        self,
        *,
        store: StateStore,
        images: ImageStore | Callable[[], ImageStore],
        driver_for: Callable[[str], Driver],
        traffic: Callable[[], TrafficController],
        environ: Mapping[str, str] | None = None,
        observer: StepObserver | None = None,
        instance_logs: Callable[[Instance], str] | None = None,
        prober: Prober = probe,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        locks: LockManager | None = None,
        os_user: str | None = None,
        drift_watches: Callable[[], DriftWatches] | None = None,
    ) -> None:
        self.context = EngineContext(
            store=store,
            image_store=Lazy(images),
            driver_for=driver_for,
            traffic_controller=Lazy(traffic),
            environ=dict(environ or {}),
            observer=observer if observer is not None else SilentObserver(),
            os_user=os_user if os_user is not None else current_os_user(),
            locks=locks if locks is not None else LockManager(store),
            prober=prober,
            monotonic=monotonic,
            sleep=sleep,
            instance_logs=instance_logs,
            drift_watches=drift_watches,
        )
        """What every verb is given."""

    # --- the context's collaborators ---------------------------------------------------------

    @property
    def store(self) -> StateStore:
        """The state store."""
        return self.context.store

    @property
    def os_user(self) -> str:
        """The OS user deploying (an identity, from the uid): its own approvals never count."""
        return self.context.os_user

    @property
    def environ(self) -> Mapping[str, str]:
        """The process environment captured at the edge."""
        return self.context.environ

    @property
    def observer(self) -> StepObserver:
        """Hears journal steps and progress lines."""
        return self.context.observer

    @property
    def instance_logs(self) -> Callable[[Instance], str] | None:
        """The last lines of an instance's output."""
        return self.context.instance_logs

    @property
    def prober(self) -> Prober:
        """Probes an instance's health."""
        return self.context.prober

    @prober.setter
    def prober(self, prober: Prober) -> None:
        self.context = replace(self.context, prober=prober)

    @property
    def monotonic(self) -> Callable[[], float]:
        """The clock durations are measured on."""
        return self.context.monotonic

    @property
    def sleep(self) -> Callable[[float], None]:
        """How the engine waits."""
        return self.context.sleep

    @property
    def locks(self) -> LockManager:
        """Leases the environments' locks."""
        return self.context.locks

    @property
    def drift_watches(self) -> Callable[[], DriftWatches] | None:
        """Makes what registers the host agent's drift watches (None: never)."""
        return self.context.drift_watches

    @property
    def images(self) -> ImageStore:
        """The image store (given, or made by the given factory on first use: a warm rollback
        never reads an image)."""
        return self.context.images

    @property
    def traffic(self) -> TrafficController:
        """The traffic controller (built on first use)."""
        return self.context.traffic

    def driver(self, runtime: str) -> Driver:
        """The driver of ``runtime``.

        Raises:
            UsageError: when the runtime is not available.
        """
        return self.context.driver(runtime)

    # --- resolve and plan (this module) ------------------------------------------------------

    def resolve(
        self, spec: ResolvedSpec | LoadedSpec, environment: str, image: str | None = None
    ) -> Target:
        """See :func:`resolve`."""
        return resolve(self.context, spec, environment, image)

    def current_release(self, environment: str) -> Release | None:
        """See :func:`castiron.engine.records.current_release`."""
        return current_release(self.store, environment)

    def load_release(self, release_id: str) -> Release:
        """See :func:`castiron.engine.records.load_release`."""
        return load_release(self.store, release_id)

    def in_service(self, environment: str) -> list[InstanceRow]:
        """See :func:`castiron.engine.records.in_service`."""
        return in_service(self.store, environment)

    def plan(self, target: Target, strategy: str | None = None) -> Plan:
        """See :func:`plan_target`."""
        return plan_target(self.context, target, strategy)

    # --- locking, recovery, reaping (castiron.engine.recovery) --------------------------------

    def locked(
        self, environment: str, purpose: str, wait: float = 0.0
    ) -> AbstractContextManager[None]:
        """See :func:`castiron.engine.recovery.locked` (a context manager)."""
        return recovery.locked(self.context, environment, purpose, wait)

    def needs_housekeeping(self, environment: str | None = None) -> list[str]:
        """See :func:`castiron.engine.recovery.needs_housekeeping`."""
        return recovery.needs_housekeeping(self.context, environment)

    def housekeeping(self, environment: str | None = None) -> list[str]:
        """See :func:`castiron.engine.recovery.housekeeping`."""
        return recovery.housekeeping(self.context, environment)

    def recover(self, environment: str) -> list[DeploymentRow]:
        """See :func:`castiron.engine.recovery.recover`."""
        return recovery.recover(self.context, environment)

    def undo_failed(
        self,
        exc: BaseException,
        deployment: DeploymentRow,
        steps: Sequence[Any],
        policy: Policy,
        outcome: Any,
        *,
        what: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """See :func:`castiron.engine.recovery.undo_failed`."""
        recovery.undo_failed(
            self.context, exc, deployment, steps, policy, outcome, what=what, extra=extra
        )

    def undo(
        self,
        deployment: DeploymentRow,
        steps: Sequence[Any],
        policy: Policy,
        outcome: Any,
        *,
        recovered: bool = False,
        error: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> DeploymentRow:
        """See :func:`castiron.engine.recovery.undo`."""
        return recovery.undo(
            self.context,
            deployment,
            steps,
            policy,
            outcome,
            recovered=recovered,
            error=error,
            extra=extra,
        )

    def rollout(
        self,
        journal: Journal,
        release: Release,
        policy: Policy,
        *,
        image: ImageRef,
        runtime: ImageRuntime,
        secrets: Mapping[str, str],
        driver: Driver,
        previous: list[InstanceRow],
    ) -> Rollout:
        """See :func:`new_rollout`."""
        return new_rollout(
            self.context,
            journal,
            release,
            policy,
            image=image,
            runtime=runtime,
            secrets=secrets,
            driver=driver,
            previous=previous,
        )

    def set_env(
        self,
        tx: StateTx,
        environment: str,
        policy: Policy,
        *,
        current: ReleaseId | None,
        known_good: ReleaseId | None = None,
    ) -> None:
        """See :func:`castiron.engine.recovery.set_env`."""
        set_env(self.context, tx, environment, policy, current=current, known_good=known_good)

    def reconcile(self, environment: str) -> list[str]:
        """See :func:`castiron.engine.recovery.reconcile`."""
        return recovery.reconcile(self.context, environment)

    def reap(self, environment: str) -> list[str]:
        """See :func:`castiron.engine.recovery.reap`."""
        return recovery.reap(self.context, environment)

    # --- deploy, run, down (this module) -------------------------------------------------------

    def deploy(
        self, target: Target, *, lock_wait: float = 0.0, strategy: str | None = None
    ) -> DeployResult:
        """See :func:`deploy`."""
        return deploy(self.context, target, lock_wait=lock_wait, strategy=strategy)

    def keep_drift_watch(self, environment: str, rules: DriftRules) -> None:
        """See :func:`keep_drift_watch`."""
        keep_drift_watch(self.context, environment, rules)

    def run(
        self,
        target: Target,
        plan: Plan,
        started: float,
        strategy: str,
        *,
        label: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> DeployResult:
        """See :func:`run`."""
        return run(self.context, target, plan, started, strategy, label=label, details=details)

    def down(self, environment: str, *, lock_wait: float = 0.0) -> list[str]:
        """See :func:`down`."""
        return down(self.context, environment, lock_wait=lock_wait)


def new_rollout(
    ctx: EngineContext,
    journal: Journal,
    release: Release,
    policy: Policy,
    *,
    image: ImageRef,
    runtime: ImageRuntime,
    secrets: Mapping[str, str],
    driver: Driver,
    previous: list[InstanceRow],
) -> Rollout:
    """A :class:`Rollout` of ``release`` journaled in ``journal``, using this engine's
    traffic controller, prober, instance logs and clocks."""
    return Rollout(
        journal=journal,
        release=release,
        policy=policy,
        image=image,
        runtime=runtime,
        secrets=secrets,
        driver=driver,
        traffic=ctx.traffic,
        previous=previous,
        prober=ctx.prober,
        instance_logs=ctx.instance_logs,
        monotonic=ctx.monotonic,
        sleep=ctx.sleep,
    )


def deploy(
    ctx: EngineContext, target: Target, *, lock_wait: float = 0.0, strategy: str | None = None
) -> DeployResult:
    """Deploy ``target`` under the environment's lock; then (deployed, or already
    serving it) keep the host agent's drift watch of the environment in line with
    ``target.drift`` (:func:`keep_drift_watch`).

    Raises:
        LockedError: when another deployment holds the environment.
        DeployFailedError: when it failed; it was undone and traffic never moved.
        UsageError: when a secret cannot be resolved.
        RuntimeDriverError, RouterError, AgentError, StateError: on infrastructure
            failures (after undoing what was created).
    """
    result = _deploy(ctx, target, lock_wait, strategy)
    if target.drift is not None:
        keep_drift_watch(ctx, target.environment, target.drift)
    return result


def keep_drift_watch(ctx: EngineContext, environment: str, rules: DriftRules) -> None:
    """Register (or drop) the host agent's drift watch of ``environment`` per ``rules``,
    audited (``drift.watch.registered`` with its interval, ``drift.watch.dropped``) when
    the agent's schedule changes. An agent that cannot be reached does not fail the
    caller; nothing happens without :attr:`drift_watches`."""
    if ctx.drift_watches is not None:
        ctx.drift_watches().keep(ctx.store, environment, rules)


def _deploy(
    ctx: EngineContext, target: Target, lock_wait: float, strategy: str | None
) -> DeployResult:
    started = ctx.monotonic()
    release = target.release
    with locked(ctx, target.environment, f"deploy {release.id}", lock_wait):
        plan = plan_target(ctx, target, strategy)
        if not plan.has_changes:
            ctx.observer.progress(f"{target.environment} already runs release {release.id}")
            return DeployResult(
                target.environment,
                release.id,
                release.digest,
                "unchanged",
                ctx.monotonic() - started,
            )
        from castiron.engine.policy import enforce

        report = enforce(ctx, target)  # refuses before any instance is created
        return run(
            ctx,
            target,
            plan,
            started,
            strategy or target.policy.strategy,
            details=report.details() if report is not None else None,
        )


def run(
    ctx: EngineContext,
    target: Target,
    plan: Plan,
    started: float,
    strategy: str,
    *,
    label: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> DeployResult:
    """Execute ``plan`` with ``strategy`` (call with the lock held; see :func:`deploy`).

    ``details`` are added to the deployment's recorded details (e.g. the gates passed).

    ``label`` is the strategy name recorded in history (``rollback`` for a cold rollback).

    Raises:
        DeployFailedError, UsageError, StateError: as :func:`deploy`.
    """
    release, policy = target.release, target.policy
    environment = target.environment
    from castiron.engine.secrets import resolve_secrets

    secret_values = resolve_secrets(release, ctx.environ, Path(policy.base_dir), ctx.store.redactor)
    runtime = image_runtime(ctx.images, release.digest)
    stored = ctx.images.image(release.digest)
    image = ImageRef(release.digest, stored.config_digest, ctx.images.root)
    previous = [
        r
        for r in in_service(ctx.store, environment)
        if plan.current is not None and r.release == plan.current.id
    ]
    size = stored.manifest_size + sum(layer.size for layer in stored.layers)
    env_row = ctx.store.get_environment(environment)
    now = ctx.store.clock.now()

    def prepare(tx: StateTx) -> None:
        tx.record_image(ImageRow(release.digest, size, now, "bake", {"tag": target.tag}))
        tx.create_release(
            ReleaseRow(release.id, environment, release.digest, release.config.to_json(), now)
        )
        tx.upsert_environment(
            EnvironmentRow(
                name=environment,
                runtime=policy.runtime,
                listen=policy.listen,
                config=policy.to_json(),
                current_release=env_row.current_release if env_row else None,
                known_good_release=env_row.known_good_release if env_row else None,
                updated=now,
            )
        )

    deployment = DeploymentRow(
        id=new_deployment_id(),
        environment=environment,
        from_release=plan.current.id if plan.current is not None else None,
        to_release=release.id,
        strategy=label or strategy,
        actor=ctx.store.actor,
        started=now,
        details={
            "digest": release.digest,
            "tag": target.tag,
            "replicas": plan.create,
            **(details or {}),
        },
        git_commit=target.git_commit,
    )
    journal = Journal.open(
        ctx.store,
        deployment,
        ctx.observer,
        prepare,
        {"previous": [r.id for r in previous], "release": release.id, "tag": target.tag},
    )
    driver = ctx.driver(policy.runtime)
    rollout = new_rollout(
        ctx,
        journal,
        release,
        policy,
        image=image,
        runtime=runtime,
        secrets=secret_values,
        driver=driver,
        previous=previous,
    )
    try:
        driver.ensure_image(image)
        strategy_runner(strategy)(rollout)
    except (Exception, KeyboardInterrupt) as exc:
        ctx.observer.progress("deployment failed: undoing it")
        # A canary that fails its analysis is "aborted" (and carries its figures).
        outcome = "aborted"
        if isinstance(exc, CastironError):
            outcome = getattr(exc, "outcome", "failed")
        undo_failed(
            ctx,
            exc,
            deployment,
            journal.steps(),
            policy,
            outcome,
            what=f"deployment of release {release.id} to {environment!r}",
            extra=getattr(exc, "details", None),
        )
        raise

    def apply(tx: StateTx) -> None:
        set_env(ctx, tx, environment, policy, current=release.id, known_good=release.id)

    journal.finish("succeeded", {"health_s": round(rollout.health_s, 3)}, apply)
    timings = {"health_s": rollout.health_s}
    if rollout.switched_at is not None:
        timings["switch_s"] = rollout.switched_at - started
    return DeployResult(
        environment,
        release.id,
        release.digest,
        "succeeded",
        ctx.monotonic() - started,
        deployment.id,
        timings,
        tuple(rollout.executed),
    )


def down(ctx: EngineContext, environment: str, *, lock_wait: float = 0.0) -> list[str]:
    """Stop everything in ``environment``: route removed, instances destroyed (audited).

    Returns the ids of the destroyed instances.

    Raises:
        NotFoundError: when the environment was never deployed.
        LockedError: when another process holds its lock.
    """
    policy = policy_of(ctx, environment)
    with locked(ctx, environment, "down", lock_wait):
        rows = ctx.store.list_instances(environment)
        ctx.store.mutate(
            AuditDraft(
                "env.down.start",
                environment=environment,
                details={"instances": [r.id for r in rows]},
            ),
            lambda tx: None,
        )
        env_row = ctx.store.get_environment(environment)
        current = env_row.current_release if env_row is not None else None
        teardown = Teardown(ctx, environment, policy, rows)
        execute(teardown, plan_down(current, len(rows)))
        ids = teardown.destroyed

        def apply(tx: StateTx) -> None:
            remove_instances(tx, [r.id for r in rows])
            set_env(ctx, tx, environment, policy, current=None)

        ctx.store.mutate(
            AuditDraft(
                "env.down",
                environment=environment,
                details={"destroyed": ids},
            ),
            apply,
        )
    ctx.observer.progress(f"{environment}: route removed, {len(ids)} instance(s) destroyed")
    return ids


@dataclass
class Teardown:
    """Takes an environment down for the executor
    (:func:`~castiron.engine.strategies.execute`): ``remove_route`` removes its route,
    ``destroy`` destroys its recorded instances and any stray of it the runtime still runs.
    It creates, routes and drains nothing."""

    context: EngineContext
    environment: str
    policy: Policy
    previous: list[InstanceRow]
    executed: list[Operation] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    """Ids of the instances destroyed (strays included)."""

    def remove_route(self) -> None:
        self.context.traffic.remove(self.environment)

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None:
        from castiron.engine.runtimes import sweep

        driver = self.context.driver(self.policy.runtime)
        ids = [r.id for r in leaving]
        for row in leaving:
            driver.destroy(row_instance(row), grace=min(self.policy.drain_timeout, 10.0))
        self.destroyed += [*ids, *sweep(driver, self.policy.app, self.environment, ids)]

    def _refuse(self) -> UsageError:
        return UsageError(f"taking {self.environment!r} down creates, routes and drains nothing")

    def create(self, count: int) -> list[Instance]:
        raise self._refuse()

    def wait_healthy(self, instances: Sequence[Instance]) -> None:
        raise self._refuse()

    def switch(self, new: Sequence[Instance], keep: Sequence[InstanceRow], *, final: bool) -> None:
        raise self._refuse()

    def take_out(self, leaving: Sequence[InstanceRow], *, warm: bool) -> None:
        raise self._refuse()


__all__ = [
    "DeployResult",
    "Engine",
    "Target",
    "deploy",
    "down",
    "image_runtime",
    "keep_drift_watch",
    "new_rollout",
    "newest_image",
    "plan_target",
    "resolve",
    "run",
    "surplus_warm",
]
