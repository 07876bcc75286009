"""The deploy engine: resolve, plan, lock, journal, execute a strategy, audit — and recover.

Owns :class:`Engine`, where the spec meets the runtime: it resolves an image reference to a
digest once (:meth:`Engine.resolve`), plans (:meth:`Engine.plan`, pure apart from reads), and
deploys under the environment's lock (:meth:`Engine.deploy`): every step is journaled before
it acts, a failure undoes what was created and leaves traffic where it was. It also owns
recovery of a deployment whose process died (:meth:`Engine.recover`: before the final switch
it is undone, after it it is completed), reaping warm instances past ``keep_warm``
(:meth:`Engine.reap`) and taking an environment down (:meth:`Engine.down`).

The engine is given its collaborators (state store, image store, drivers by runtime, the
traffic controller, a clock) and never reads the process environment, prints, or exits; see
:mod:`castiron.compose` for how the CLI builds one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.drivers.base import Driver
from castiron.engine.journal import (
    Journal,
    SilentObserver,
    StepObserver,
    finish_deployment,
    new_deployment_id,
)
from castiron.engine.operations import Operation, plan_down
from castiron.engine.release import Release, release_from_json, release_id
from castiron.engine.strategies import (
    STRATEGIES,
    ImageRuntime,
    Policy,
    Prober,
    Rollout,
    Target,
    backends_of,
    execute,
    remove_instances,
    row_instance,
)
from castiron.errors import (
    CastironError,
    DeployFailedError,
    ImageError,
    LockedError,
    NotFoundError,
    UsageError,
)
from castiron.health import probe
from castiron.model import Digest, ImageRef, Instance, ReleaseId
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
    format_time,
    parse_time,
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


def image_runtime(images: ImageStore, digest: str) -> ImageRuntime:
    """How the image ``digest`` says to run it: entrypoint + cmd, env, workdir, user.

    Raises:
        NotFoundError: when the image is not in the store.
        ImageError: when its config is damaged.
    """
    config = images.image(digest).config.get("config") or {}
    if not isinstance(config, dict):
        raise ImageError(f"image {digest}: config is not an object")
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    env: list[tuple[str, str]] = []
    for item in config.get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep:
            env.append((name, value))
    if not command:
        raise ImageError(f"image {digest} has no entrypoint or cmd: nothing to run")
    user = config.get("User")
    return ImageRuntime(
        command=tuple(str(a) for a in command),
        env=tuple(env),
        workdir=str(config.get("WorkingDir") or "/"),
        user=str(user) if user else None,
    )


def newest_image(images: ImageStore, app: str) -> tuple[Digest, str | None]:
    """The most recently added image of ``app`` in the store, and its most recent tag.

    Raises:
        UsageError: when the store has no image of ``app`` (bake one first).
    """
    from castiron.images import oci

    for descriptor in reversed(images.index()):
        if descriptor.artifact_type is not None:
            continue
        try:
            title = images.image(descriptor.digest).annotations.get(oci.ANN_TITLE)
        except (ImageError, NotFoundError):
            continue
        if title == app:
            return descriptor.digest, descriptor.annotations.get(oci.ANN_REF_NAME)
    raise UsageError(
        f"no image of app {app!r} in {images.root}: run `castiron bake` first (or pass --image REF)"
    )


class Engine:
    """Deploys releases to environments; one per CLI invocation (or API request)."""

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
        self.store = store
        self.os_user = os_user if os_user is not None else current_os_user()
        """The OS user deploying (an identity, from the uid): its own approvals never count."""
        self._images = images
        self._driver_for = driver_for
        self._traffic_factory = traffic
        self._traffic: TrafficController | None = None
        self.environ: Mapping[str, str] = dict(environ or {})
        self.observer: StepObserver = observer if observer is not None else SilentObserver()
        self.instance_logs = instance_logs
        self.prober = prober
        self.monotonic = monotonic
        self.sleep = sleep
        self.locks = locks if locks is not None else LockManager(store)
        self.drift_watches = drift_watches
        """Makes what registers the host agent's drift watches after a deployment, on use
        (None: never)."""

    # --- collaborators (built on first use: read commands stay fast) -------------------------

    @property
    def images(self) -> ImageStore:
        """The image store (given, or made by the given factory on first use: a warm rollback
        never reads an image)."""
        if callable(self._images):
            self._images = self._images()
        return self._images

    @property
    def traffic(self) -> TrafficController:
        """The traffic controller (built on first use)."""
        if self._traffic is None:
            self._traffic = self._traffic_factory()
        return self._traffic

    def driver(self, runtime: str) -> Driver:
        """The driver of ``runtime``.

        Raises:
            UsageError: when the runtime is not available.
        """
        return self._driver_for(runtime)

    # --- resolve and plan ------------------------------------------------------------------

    def resolve(
        self, spec: ResolvedSpec | LoadedSpec, environment: str, image: str | None = None
    ) -> Target:
        """Resolve ``environment`` of the spec with image ``image`` (a tag, digest or unique
        prefix; default: the newest baked image of the app) to a :class:`Target`.

        ``spec`` is the resolved spec (:func:`~castiron.engine.resolve.cached_resolve_spec`
        gives it without pydantic), or a validated one, resolved here.
        The reference is resolved to a digest here, once; everything after uses the digest.

        Raises:
            UsageError: unknown environment, no image, unsupported strategy.
            NotFoundError: when ``image`` names nothing in the store.
        """
        from castiron.engine.resolve import STRATEGY_NAMES, ResolvedSpec, resolve_spec
        from castiron.images import oci

        resolved = spec if isinstance(spec, ResolvedSpec) else resolve_spec(spec)
        env = resolved.environment(environment)
        if image is None:
            digest, tag = newest_image(self.images, resolved.app)
        else:
            digest = self.images.resolve(image)
            tag = image if image in self.images.tags() else None
        if env.strategy not in STRATEGY_NAMES:
            raise UsageError(
                f"environments.{environment}.strategy.type: {env.strategy!r} is not "
                f"available yet (use one of: {', '.join(STRATEGY_NAMES)})"
            )
        stored = self.images.image(digest)
        release = Release(id=release_id(digest, env.config), digest=digest, config=env.config)
        policy = Policy(
            app=resolved.app,
            runtime=env.config.runtime,
            listen=env.listen,
            strategy=env.strategy,
            batch=env.batch,
            drain_timeout=env.drain_timeout,
            keep_warm=env.keep_warm,
            keep_warm_releases=env.keep_warm_releases,
            deploy_timeout=env.deploy_timeout,
            base_dir=str(resolved.base_dir),
            canary=env.canary,
            router=env.router,
        )
        return Target(
            release,
            policy,
            tag,
            stored.annotations.get(oci.ANN_REVISION),
            env.gates,
            env.drift,
        )

    def current_release(self, environment: str) -> Release | None:
        """The release the environment serves, as recorded (None before the first deploy)."""
        row = self.store.get_environment(environment)
        if row is None or row.current_release is None:
            return None
        return self.load_release(row.current_release)

    def load_release(self, release_id: str) -> Release:
        """A recorded release.

        Raises:
            NotFoundError: when it is not recorded.
        """
        row = self.store.get_release(ReleaseId(release_id))
        if row is None:
            raise NotFoundError(f"no release {release_id} in the state store")
        return release_from_json({"id": row.id, "digest": row.digest, "config": row.config})

    def in_service(self, environment: str) -> list[InstanceRow]:
        """Recorded instances of ``environment`` that serve (or are about to)."""
        return [r for r in self.store.list_instances(environment) if r.status == "running"]

    def plan(self, target: Target, strategy: str | None = None) -> Plan:
        """What deploying ``target`` with ``strategy`` (default: its policy's) would do, with
        the operations that will run (reads state; changes nothing)."""
        current = self.current_release(target.environment)
        running = [
            r
            for r in self.in_service(target.environment)
            if current is not None and r.release == current.id
        ]
        from dataclasses import replace

        from castiron.engine.operations import Serving, plan_deploy
        from castiron.engine.plan import plan_deployment
        from castiron.engine.strategies import desired_of

        strategy = strategy or target.policy.strategy
        plan = plan_deployment(current, target.release, len(running), strategy)
        serving = Serving(None if current is None else current.id, len(running))
        operations = plan_deploy(serving, desired_of(target.release, target.policy, strategy))
        return replace(plan, operations=operations if plan.has_changes else ())

    # --- locking, recovery, reaping ------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, environment: str, purpose: str, wait: float = 0.0) -> Iterator[None]:
        """Hold ``environment``'s lock; recover and reconcile it first, and reap warm instances
        past ``keep_warm`` after the work (destroying them is housekeeping: it should not delay
        a deployment or a rollback; they are not in service, so it can wait).

        Raises:
            LockedError: when another live process holds it after ``wait`` seconds.
        """

        def waiting(lease: Any) -> None:
            self.observer.progress(f"waiting for the lock held by {lease.holder} ({lease.purpose})")

        with self.locks.acquire(environment, purpose, wait=wait, on_wait=waiting) as held:
            self.recover(environment)
            self.reconcile(environment)
            yield
            held.check()
            self.reap(environment)

    def needs_housekeeping(self, environment: str | None = None) -> list[str]:
        """Environments with an interrupted deployment or a warm instance past keep_warm
        (two cheap reads each; no agent, no driver)."""
        names = (
            [environment]
            if environment is not None
            else [e.name for e in self.store.list_environments()]
        )
        now = self.store.clock.now()
        out = []
        for name in names:
            pending = any(
                d.outcome == "running" for d in self.store.list_deployments(name, limit=5)
            )
            if pending or any(_warm_due(r, now) for r in self.store.list_instances(name)):
                out.append(name)
        return out

    def housekeeping(self, environment: str | None = None) -> list[str]:
        """Recover interrupted deployments and reap expired warm instances where needed and
        the environment's lock is free; returns the environments it tidied.

        Raises:
            RuntimeDriverError, RouterError, AgentError, StateError: when recovery cannot act.
        """
        done = []
        for name in self.needs_housekeeping(environment):
            with contextlib.suppress(LockedError), self.locked(name, "recovery"):
                done.append(name)
        return done

    def recover(self, environment: str) -> list[DeploymentRow]:
        """Finish or undo deployments of ``environment`` whose process died (call with the
        environment's lock held): after the final traffic switch they are completed, before
        it they are undone (new instances destroyed, traffic back where it was).

        Raises:
            StateError, RuntimeDriverError, RouterError, AgentError: when recovery cannot act.
        """
        done: list[DeploymentRow] = []
        for deployment in self.store.list_deployments(environment, limit=20):
            if deployment.outcome != "running":
                continue
            self.observer.progress(f"recovering interrupted deployment {deployment.id}")
            steps = self.store.steps(deployment.id)
            policy = self._policy_of(environment)
            finals = [s for s in steps if s.step in ("switch", "switched") and s.data.get("final")]
            forward = any(s.step == "switched" for s in finals)
            if not forward and finals:
                forward = self._route_is_final(environment, deployment, finals[-1].data)
            if forward:
                done.append(self._complete(deployment, steps, policy))
            else:
                done.append(self.undo(deployment, steps, policy, "aborted", recovered=True))
        return done

    def _route_is_final(
        self, environment: str, deployment: DeploymentRow, data: Mapping[str, Any]
    ) -> bool:
        routing = self.traffic.current(environment)
        if routing is None or routing.stable is None or routing.canary_weight:
            return False
        return routing.stable.release == deployment.to_release and routing.backend_ids == set(
            data.get("to", [])
        )

    def _complete(
        self, deployment: DeploymentRow, steps: Sequence[Any], policy: Policy
    ) -> DeploymentRow:
        previous = [str(i) for s in steps if s.step == "start" for i in s.data.get("previous", [])]
        rows = {r.id: r for r in self.store.list_instances(deployment.environment)}
        leaving = [rows[i] for i in previous if i in rows and rows[i].status == "running"]
        new_ids = [i for s in steps if s.step == "switched" for i in s.data.get("to", [])]
        now = self.store.clock.now()
        until = now.timestamp() + policy.keep_warm
        to = deployment.to_release

        def apply(tx: StateTx) -> None:
            for instance_id in new_ids:
                if instance_id in rows:
                    tx.set_instance_status(instance_id, "running")
            for row in leaving:
                tx.set_instance_status(row.id, "warm", {"warm_until": _iso(until)})
            self.set_env(tx, deployment.environment, policy, current=to, known_good=to)

        return finish_deployment(
            self.store,
            deployment,
            "succeeded",
            {"recovered": True, "resolution": "completed after the traffic switch"},
            apply,
            action="deploy.recover",
        )

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
        """Undo ``deployment`` after ``exc`` stopped it (call inside the ``except``).

        Returns only for an unexpected ``exc`` (not a :class:`CastironError`), which the caller
        re-raises as it is.

        Raises:
            DeployFailedError: naming ``what`` failed and that it was undone, or that undoing
                failed too (the next command retries the recovery).
        """
        reason = str(exc) if isinstance(exc, CastironError) else repr(exc)
        try:
            self.undo(deployment, steps, policy, outcome, error=reason, extra=extra)
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
        """Put traffic back on the previous instances, destroy this deployment's instances
        and close it with ``outcome`` (call with the lock held).

        Raises:
            RouterError, AgentError, RuntimeDriverError, StateError: when it cannot act.
        """
        environment = deployment.environment
        previous = [str(i) for s in steps if s.step == "start" for i in s.data.get("previous", [])]
        planned = {str(s.data.get("instance")) for s in steps if s.step == "create"}
        rows = {r.id: r for r in self.store.list_instances(environment)}
        back = [rows[i] for i in previous if i in rows]
        moved = any(s.step == "switch" for s in steps)
        if moved:
            if back:
                self.traffic.switch(
                    environment,
                    policy.listen,
                    backends_of(back[0].release, back),
                    drain_timeout=policy.drain_timeout,
                    limits=policy.limits,
                    access_log=policy.access_log,
                )
            else:
                self.traffic.remove(environment)
        ours = [r for r in rows.values() if r.data.get("deployment") == deployment.id]
        driver = self.driver(policy.runtime)
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
            self.set_env(tx, environment, policy, current=deployment.from_release)

        return finish_deployment(
            self.store,
            deployment,
            outcome,
            details,
            apply,
            action="deploy.recover" if recovered else "deploy.finish",
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
            traffic=self.traffic,
            previous=previous,
            prober=self.prober,
            instance_logs=self.instance_logs,
            monotonic=self.monotonic,
            sleep=self.sleep,
        )

    def _policy_of(self, environment: str) -> Policy:
        row = self.store.get_environment(environment)
        if row is None:
            raise NotFoundError(f"environment {environment!r} was never deployed")
        return Policy.from_json(row.config)

    def set_env(
        self,
        tx: StateTx,
        environment: str,
        policy: Policy,
        *,
        current: ReleaseId | None,
        known_good: ReleaseId | None = None,
    ) -> None:
        """Record (in ``tx``) that ``environment`` serves ``current`` under ``policy``."""
        row = self.store.get_environment(environment)
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
                updated=self.store.clock.now(),
            )
        )

    def reconcile(self, environment: str) -> list[str]:
        """Mirror what the router serves into the records (call with the lock held).

        The agent replaces an instance that died with a new one and swaps it into the route;
        the replacement is recorded here as in service, and records of instances that are gone
        are dropped. Returns the ids adopted or dropped.

        Raises:
            AgentError, StateError: when the router or the records cannot be read or written.
        """
        row = self.store.get_environment(environment)
        if row is None or row.current_release is None:
            return []
        routing = self.traffic.current(environment)
        if routing is None:
            return []
        policy = Policy.from_json(row.config)
        rows = {r.id: r for r in self.store.list_instances(environment)}
        adopt: list[InstanceRow] = []
        for backend_set in (routing.stable, routing.canary):
            if backend_set is None:
                continue
            release = self.store.get_release(ReleaseId(backend_set.release))
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
        stale = [
            r for r in rows.values() if r.status == "running" and r.id not in routing.backend_ids
        ]
        if stale:
            driver = self.driver(policy.runtime)
            for r in stale:
                if driver.inspect(row_instance(r)).state in ("exited", "missing"):
                    drop.append(r.id)
        if not adopt and not drop:
            return []

        def apply(tx: StateTx) -> None:
            for r in adopt:
                tx.put_instance(r)
            remove_instances(tx, drop)

        self.store.mutate(
            AuditDraft(
                "instance.reconcile",
                environment=environment,
                details={"adopted": [r.id for r in adopt], "dropped": drop},
            ),
            apply,
        )
        return [r.id for r in adopt] + drop

    def reap(self, environment: str) -> list[str]:
        """Destroy warm instances of ``environment`` past their ``keep_warm``, and those beyond
        its ``keep_warm_releases`` (see :func:`surplus_warm`); call with the lock held.
        Returns their ids.

        Raises:
            RuntimeDriverError: when an instance cannot be destroyed.
        """
        now = self.store.clock.now()
        rows = self.store.list_instances(environment)
        expired = [r for r in rows if _warm_due(r, now)]
        env_row = self.store.get_environment(environment)
        surplus: list[InstanceRow] = []
        if env_row is not None:
            keep = Policy.from_json(env_row.config).keep_warm_releases
            live = [r for r in rows if r not in expired]
            drained = [
                d.from_release
                for d in self.store.list_deployments(environment, limit=200)
                if d.from_release is not None and d.outcome == "succeeded"
            ]
            surplus = surplus_warm(live, env_row.current_release, keep, self._replicas_of, drained)
        due = expired + surplus
        if not due:
            return []
        by_runtime: dict[str, list[InstanceRow]] = {}
        for row in due:
            by_runtime.setdefault(row.runtime, []).append(row)
        ids = [r.id for r in due]
        for runtime, group in by_runtime.items():
            driver = self.driver(runtime)
            for row in group:
                driver.destroy(row_instance(row), grace=5.0)
        why = [
            *(["keep_warm expired"] if expired else []),
            *(["beyond keep_warm_releases"] if surplus else []),
        ]
        self.store.mutate(
            AuditDraft(
                "instance.reap",
                environment=environment,
                subject=",".join(ids),
                details={"ids": ids, "why": " and ".join(why)},
            ),
            lambda tx: remove_instances(tx, ids),
        )
        if expired:
            self.observer.progress(f"destroyed {len(expired)} warm instance(s) past keep_warm")
        if surplus:
            self.observer.progress(
                f"destroyed {len(surplus)} warm instance(s) beyond keep_warm_releases"
            )
        return ids

    def _replicas_of(self, release: ReleaseId) -> int:
        try:
            return self.load_release(release).config.replicas
        except CastironError:
            return 0  # an unknown release is no rollback target

    # --- deploy ------------------------------------------------------------------------------

    def deploy(
        self, target: Target, *, lock_wait: float = 0.0, strategy: str | None = None
    ) -> DeployResult:
        """Deploy ``target`` under the environment's lock; then (deployed, or already
        serving it) keep the host agent's drift watch of the environment in line with
        ``target.drift`` (:meth:`keep_drift_watch`).

        Raises:
            LockedError: when another deployment holds the environment.
            DeployFailedError: when it failed; it was undone and traffic never moved.
            UsageError: when a secret cannot be resolved.
            RuntimeDriverError, RouterError, AgentError, StateError: on infrastructure
                failures (after undoing what was created).
        """
        result = self._deploy(target, lock_wait, strategy)
        if target.drift is not None:
            self.keep_drift_watch(target.environment, target.drift)
        return result

    def keep_drift_watch(self, environment: str, rules: DriftRules) -> None:
        """Register (or drop) the host agent's drift watch of ``environment`` per ``rules``,
        audited (``drift.watch.registered`` with its interval, ``drift.watch.dropped``) when
        the agent's schedule changes. An agent that cannot be reached does not fail the
        caller; nothing happens without :attr:`drift_watches`."""
        if self.drift_watches is not None:
            self.drift_watches().keep(self.store, environment, rules)

    def _deploy(self, target: Target, lock_wait: float, strategy: str | None) -> DeployResult:
        started = self.monotonic()
        release = target.release
        with self.locked(target.environment, f"deploy {release.id}", lock_wait):
            plan = self.plan(target, strategy)
            if not plan.has_changes:
                self.observer.progress(f"{target.environment} already runs release {release.id}")
                return DeployResult(
                    target.environment,
                    release.id,
                    release.digest,
                    "unchanged",
                    self.monotonic() - started,
                )
            from castiron.engine.policy import enforce

            report = enforce(self, target)  # refuses before any instance is created
            return self.run(
                target,
                plan,
                started,
                strategy or target.policy.strategy,
                details=report.details() if report is not None else None,
            )

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
        """Execute ``plan`` with ``strategy`` (call with the lock held; see :meth:`deploy`).

        ``details`` are added to the deployment's recorded details (e.g. the gates passed).

        ``label`` is the strategy name recorded in history (``rollback`` for a cold rollback).

        Raises:
            DeployFailedError, UsageError, StateError: as :meth:`deploy`.
        """
        release, policy = target.release, target.policy
        environment = target.environment
        from castiron.engine.secrets import resolve_secrets

        secret_values = resolve_secrets(
            release, self.environ, Path(policy.base_dir), self.store.redactor
        )
        runtime = image_runtime(self.images, release.digest)
        stored = self.images.image(release.digest)
        image = ImageRef(release.digest, stored.config_digest, self.images.root)
        previous = [
            r
            for r in self.in_service(environment)
            if plan.current is not None and r.release == plan.current.id
        ]
        size = stored.manifest_size + sum(layer.size for layer in stored.layers)
        env_row = self.store.get_environment(environment)
        now = self.store.clock.now()

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
            actor=self.store.actor,
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
            self.store,
            deployment,
            self.observer,
            prepare,
            {"previous": [r.id for r in previous], "release": release.id, "tag": target.tag},
        )
        driver = self.driver(policy.runtime)
        rollout = self.rollout(
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
            self.observer.progress("deployment failed: undoing it")
            # A canary that fails its analysis is "aborted" (and carries its figures).
            outcome = "aborted"
            if isinstance(exc, CastironError):
                outcome = getattr(exc, "outcome", "failed")
            self.undo_failed(
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
            self.set_env(tx, environment, policy, current=release.id, known_good=release.id)

        journal.finish("succeeded", {"health_s": round(rollout.health_s, 3)}, apply)
        timings = {"health_s": rollout.health_s}
        if rollout.switched_at is not None:
            timings["switch_s"] = rollout.switched_at - started
        return DeployResult(
            environment,
            release.id,
            release.digest,
            "succeeded",
            self.monotonic() - started,
            deployment.id,
            timings,
            tuple(rollout.executed),
        )

    # --- down ----------------------------------------------------------------------------------

    def down(self, environment: str, *, lock_wait: float = 0.0) -> list[str]:
        """Stop everything in ``environment``: route removed, instances destroyed (audited).

        Returns the ids of the destroyed instances.

        Raises:
            NotFoundError: when the environment was never deployed.
            LockedError: when another process holds its lock.
        """
        policy = self._policy_of(environment)
        with self.locked(environment, "down", lock_wait):
            rows = self.store.list_instances(environment)
            self.store.mutate(
                AuditDraft(
                    "env.down.start",
                    environment=environment,
                    details={"instances": [r.id for r in rows]},
                ),
                lambda tx: None,
            )
            env_row = self.store.get_environment(environment)
            current = env_row.current_release if env_row is not None else None
            teardown = Teardown(self, environment, policy, rows)
            execute(teardown, plan_down(current, len(rows)))
            ids = teardown.destroyed

            def apply(tx: StateTx) -> None:
                remove_instances(tx, [r.id for r in rows])
                self.set_env(tx, environment, policy, current=None)

            self.store.mutate(
                AuditDraft(
                    "env.down",
                    environment=environment,
                    details={"destroyed": ids},
                ),
                apply,
            )
        self.observer.progress(f"{environment}: route removed, {len(ids)} instance(s) destroyed")
        return ids


@dataclass
class Teardown:
    """Takes an environment down for the executor
    (:func:`~castiron.engine.strategies.execute`): ``remove_route`` removes its route,
    ``destroy`` destroys its recorded instances and any stray of it the runtime still runs.
    It creates, routes and drains nothing."""

    engine: Engine
    environment: str
    policy: Policy
    previous: list[InstanceRow]
    executed: list[Operation] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    """Ids of the instances destroyed (strays included)."""

    def remove_route(self) -> None:
        self.engine.traffic.remove(self.environment)

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None:
        from castiron.engine.runtimes import sweep

        driver = self.engine.driver(self.policy.runtime)
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
    "DeployResult",
    "Engine",
    "Target",
    "image_runtime",
    "newest_image",
]
