"""Deployment strategies: blue-green and rolling, on top of the mechanics of one rollout.

Owns :class:`Rollout`, the steps every strategy is made of (create an instance, wait for
health, switch traffic, drain the previous instances, destroy), each journaled before it acts;
and the strategies themselves, each its planner and the executor
(:func:`castiron.engine.execute.execute`, which runs a plan's operations through those steps):
:func:`blue_green` (start the whole new set, switch at once) and :func:`rolling` (batches
behind the router with ``max_unavailable`` 0: a batch of new instances becomes healthy, then
takes the place of as many previous ones, which are drained).

Instances leaving service are never destroyed by a strategy: they are kept warm (for an
instant rollback, and so an interrupted rollout can always be undone) unless ``keep_warm`` is 0.
It knows nothing of the CLI or the spec file.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from castiron.drivers.base import Driver
from castiron.engine.execute import CanarySteps, Mechanics, execute
from castiron.engine.journal import Journal
from castiron.engine.operations import (
    KEEP_WARM_ZERO,
    ROLLING_BATCH,
    Desired,
    Operation,
    Serving,
    strategy_operations,
)
from castiron.engine.release import Release
from castiron.engine.resolve import DeploySettings, SettingsView
from castiron.engine.runtimes import KUBERNETES_ADDRESS_PREFIX, instance_port
from castiron.errors import CastironError, DeployFailedError, UsageError
from castiron.health import HealthTracker, ProbeResult, probe
from castiron.model import (
    HealthCheck,
    ImageRef,
    Instance,
    InstanceSpec,
    Isolation,
    Observed,
    ReleaseId,
)
from castiron.state.base import AuditDraft, EnvironmentRow, InstanceRow, StateTx, format_time
from castiron.traffic.base import Backend, BackendSet, Limits
from castiron.traffic.controller import TrafficController
from castiron.values import value

if TYPE_CHECKING:
    from castiron.engine.resolve import DriftRules, GatePolicy, StrategyName

Prober = Callable[[HealthCheck, str, Mapping[str, str]], ProbeResult]
"""Runs one health probe against an address (injected so tests need no real servers)."""

LOG_LINES = 20
"""Lines of a failing instance's output shown when a deployment fails."""

FIRST_POLL = 0.01
"""Seconds between health probes of a new instance until it first answers (a refused
connection costs next to nothing, and traffic should move as soon as the app is up)."""

INSPECT_EVERY = 0.1
"""Seconds between asking the runtime whether a new instance that fails its probe exited."""

HEALTH_REPORT_EVERY = 3.0
"""Seconds between progress lines giving each still-unhealthy instance's last probe result."""


@value
class ImageRuntime:
    """How the image says to run it (from its OCI config), resolved by the engine."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    workdir: str
    user: str | None


@value
class Policy(SettingsView):
    """An environment's deployment policy, as recorded with the environment: the app, its
    runtime and address, and the :class:`DeploySettings` it was resolved with.

    Kept in the state store (not only in the spec) so rollback, recovery and ``down`` need
    no spec file. Its JSON is flat (the settings' keys beside its own), as recorded so far.
    """

    app: str
    runtime: str
    listen: str
    settings: DeploySettings = field(default_factory=DeploySettings)
    base_dir: str = "."
    """The spec's directory: ``file:`` secrets are read relative to it."""

    @property
    def limits(self) -> Limits:
        """The router limits of this environment."""
        data = dict(self.router or {})
        data.pop("access_log", None)
        return Limits(**data)

    @property
    def access_log(self) -> bool:
        """Whether the router writes an access log for this environment."""
        return bool((self.router or {}).get("access_log", False))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "app": self.app,
            "runtime": self.runtime,
            "listen": self.listen,
            **self.settings.to_json(),
            "base_dir": self.base_dir,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        """The policy recorded as ``data`` (unknown keys ignored, missing ones defaulted)."""
        own = {k: data[k] for k in ("app", "runtime", "listen", "base_dir") if k in data}
        return cls(**own, settings=DeploySettings.from_json(data))


@value
class Target:
    """A release ready to deploy: digest resolved once, with the policy it deploys under."""

    release: Release
    policy: Policy
    tag: str | None
    """The tag the image was asked for by (None when given by digest or by default)."""
    git_commit: str | None
    gates: GatePolicy | None = None
    """The environment's policy gates, enforced before any instance is created
    (see :mod:`castiron.engine.policy`); None: no gates (a rollback's target)."""
    drift: DriftRules | None = None
    """The environment's drift rules: after a deployment the host agent's drift watch is
    registered (or dropped) per them; None: the watch is left as it is (a rollback's target)."""

    @property
    def environment(self) -> str:
        return self.release.environment


class DriverOnUse:
    """The driver of ``runtime``, built by ``build`` on first use: a warm rollback only moves
    traffic and never needs one (building the local driver imports the runtime's modules)."""

    def __init__(self, runtime: str, build: Callable[[str], Driver]) -> None:
        self.name = runtime
        self._build = build
        self._driver: Driver | None = None

    def _get(self) -> Driver:
        if self._driver is None:
            self._driver = self._build(self.name)
        return self._driver

    def ensure_image(self, image: ImageRef) -> None:
        self._get().ensure_image(image)

    def create(self, spec: InstanceSpec) -> Instance:
        return self._get().create(spec)

    def destroy(self, instance: Instance, grace: float) -> None:
        self._get().destroy(instance, grace)

    def observe(self, app: str, environment: str) -> list[Observed]:
        return self._get().observe(app, environment)

    def inspect(self, instance: Instance) -> Observed:
        return self._get().inspect(instance)


def instance_row(instance: Instance, deployment: str, status: str) -> InstanceRow:
    """The state record of a created instance."""
    return InstanceRow(
        id=instance.id,
        environment=instance.environment,
        release=instance.release,
        address=instance.address,
        runtime=instance.runtime,
        status=status,
        data={
            "app": instance.app,
            "handle": instance.handle,
            "image": instance.image,
            "deployment": deployment,
        },
    )


def row_instance(row: InstanceRow) -> Instance:
    """The driver's view of a recorded instance."""
    data = row.data
    return Instance(
        id=row.id,
        app=str(data.get("app", "")),
        environment=row.environment,
        release=row.release,
        runtime=row.runtime,
        address=row.address,
        handle=str(data.get("handle", "")),
        image=data.get("image", ""),
    )


def backends_of(release: str, instances: Sequence[Instance | InstanceRow]) -> BackendSet:
    """The backend set of ``instances`` of ``release``."""
    return BackendSet(release, tuple(Backend(i.id, i.address) for i in instances))


@dataclass
class Rollout:
    """The mechanics of moving one environment to ``release``; strategies compose them."""

    journal: Journal
    release: Release
    policy: Policy
    image: ImageRef | None
    """The image instances are created from (None for a rollout that creates none: a warm
    rollback only moves traffic)."""
    runtime: ImageRuntime
    secrets: Mapping[str, str]
    driver: Driver
    traffic: TrafficController
    previous: list[InstanceRow]
    """Instances in service when the deployment started (the previous release's)."""
    prober: Prober = probe
    instance_logs: Callable[[Instance], str] | None = None
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    created: list[Instance] = field(default_factory=list)
    health_s: float = 0.0
    """Seconds spent waiting for new instances to become healthy."""
    switched_at: float | None = None
    """``monotonic()`` when traffic moved to the new set for good."""
    executed: list[Operation] = field(default_factory=list)
    """The operations run so far (see :func:`execute`)."""

    @property
    def environment(self) -> str:
        return self.release.environment

    def progress(self, message: str) -> None:
        self.journal.observer.progress(message)

    # --- instances -----------------------------------------------------------------------

    def instance_spec(self, instance_id: str) -> InstanceSpec:
        """What the driver needs to create one instance of the release.

        Raises:
            DeployFailedError: when the rollout was given no image to create from.
        """
        if self.image is None:
            raise DeployFailedError(f"release {self.release.id}: no image to create from")
        return release_instance_spec(
            self.release, self.image, self.runtime, self.secrets, instance_id, self.journal.id
        )

    def create(self, count: int) -> list[Instance]:
        """Create ``count`` new instances, each journaled before and recorded after.

        Raises:
            RuntimeDriverError: when the runtime cannot create one.
        """
        made: list[Instance] = []
        for _ in range(count):
            instance_id = (
                f"{self.release.config.app}-{self.environment}-"
                f"{self.release.id[:6]}-{secrets.token_hex(3)}"
            )
            self.journal.step("create", {"instance": instance_id, "release": self.release.id})
            instance = self.driver.create(self.instance_spec(instance_id))
            self.created.append(instance)
            made.append(instance)
            row = instance_row(instance, self.journal.id, "starting")
            self.journal.step(
                "created",
                {"instance": instance.id, "address": instance.address},
                lambda tx, row=row: tx.put_instance(row),  # type: ignore[misc]
            )
            self.progress(f"created {instance.id} at {instance.address}")
        return made

    def wait_healthy(self, instances: Sequence[Instance]) -> None:
        """Probe ``instances`` until every one is healthy.

        Raises:
            DeployFailedError: when one exits, or is not healthy within ``deploy_timeout``,
                with its last probe result and the end of its output.
        """
        check = self.release.config.health
        self.journal.step("health", {"instances": [i.id for i in instances]})
        self.progress(
            f"waiting for {len(instances)} instance(s) to pass {_describe(check)} "
            f"(timeout {self.policy.deploy_timeout:g}s)"
        )
        started = self.monotonic()
        deadline = started + self.policy.deploy_timeout
        # Where the runtime judges readiness itself (Kubernetes: the kubelet already asked
        # for healthy_after successes), one ready answer is the verdict.
        judged = replace(check, healthy_after=1)
        trackers = {
            i.id: HealthTracker(
                judged if i.address.startswith(KUBERNETES_ADDRESS_PREFIX) else check, started
            )
            for i in instances
        }
        pending = list(instances)
        env = {**dict(self.runtime.env), **dict(self.release.config.env)}
        inspected: dict[str, float] = {}
        reported = started
        while pending:
            for instance in list(pending):
                result = self.prober(check, instance.address, env)
                now = self.monotonic()
                if trackers[instance.id].record(result, now):
                    pending.remove(instance)
                    self.progress(f"{instance.id} is healthy ({result.detail})")
                    continue
                # Asking the runtime whether the instance exited is a round trip: do it at
                # most every INSPECT_EVERY while the cheap probe keeps failing.
                if now - inspected.get(instance.id, -INSPECT_EVERY) >= INSPECT_EVERY:
                    inspected[instance.id] = now
                    observed = self.driver.inspect(instance)
                    if observed.state in ("exited", "missing"):
                        code = f" with status {observed.exit_code}" if observed.exit_code else ""
                        self._fail(instance, f"exited{code} before becoming healthy")
            if not pending:
                break
            if self.monotonic() - reported >= HEALTH_REPORT_EVERY:
                reported = self.monotonic()
                for instance in pending:
                    last = trackers[instance.id].last
                    self.progress(
                        f"{instance.id} not healthy yet after {reported - started:.0f}s of "
                        f"{self.policy.deploy_timeout:g}s: "
                        f"{last.detail if last is not None else 'no probe answered'}"
                    )
            if self.monotonic() >= deadline:
                last = trackers[pending[0].id].last
                detail = last.detail if last is not None else "no probe answered"
                self._fail(
                    pending[0],
                    f"not healthy after {self.policy.deploy_timeout:g}s (last probe: {detail})",
                )
            # Until an instance first answers, poll briskly: traffic should move as soon as
            # the app is up, not up to one interval later. Then honour the interval for the
            # rest of the healthy_after streak.
            answered = any(trackers[i.id].streak > 0 for i in pending)
            pause = check.interval if answered else min(check.interval, FIRST_POLL)
            self.sleep(min(max(pause, 0.001), max(0.0, deadline - self.monotonic())))
        self.health_s += self.monotonic() - started

    def _fail(self, instance: Instance, why: str) -> None:
        message = f"instance {instance.id} of release {self.release.id} {why}"
        tail = self.logs_of(instance)
        if tail:
            message += "\nlast output:\n" + tail
        if self.policy.runtime == "local":  # the agent keeps a destroyed instance's log file
            message += (
                f"\nall of its output: castiron logs {self.environment} --instance {instance.id}"
            )
        raise DeployFailedError(message)

    def logs_of(self, instance: Instance) -> str:
        """The last lines of ``instance``'s output ("" when they cannot be read)."""
        if self.instance_logs is None:
            return ""
        try:
            text = self.instance_logs(instance)
        except CastironError:
            return ""
        lines = [line for line in text.splitlines() if line.strip()]
        return "\n".join(lines[-LOG_LINES:])

    # --- traffic ---------------------------------------------------------------------------

    def switch(
        self,
        new: Sequence[Instance],
        keep: Sequence[InstanceRow],
        *,
        final: bool,
    ) -> None:
        """Route traffic to ``new`` (plus ``keep`` of the previous release, weighted by count)
        atomically; ``final`` marks the switch that completes the rollout.

        Raises:
            RouterError, AgentError: when the router refuses or cannot be reached.
        """
        ids = [i.id for i in new]
        kept = [r.id for r in keep]
        self.journal.step("switch", {"to": ids, "keep": kept, "final": final})
        new_set = backends_of(self.release.id, new)
        if keep:
            from_release = keep[0].release
            weight = round(100 * len(new) / (len(new) + len(keep)))
            self.traffic.switch(
                self.environment,
                self.policy.listen,
                backends_of(from_release, keep),
                canary=new_set,
                canary_weight=weight,
                drain_timeout=self.policy.drain_timeout,
                limits=self.policy.limits,
                access_log=self.policy.access_log,
            )
        else:
            self.traffic.switch(
                self.environment,
                self.policy.listen,
                new_set,
                drain_timeout=self.policy.drain_timeout,
                limits=self.policy.limits,
                access_log=self.policy.access_log,
            )
        if final:
            self.switched_at = self.monotonic()
        release_id = self.release.id

        def apply(tx: StateTx) -> None:
            for instance_id in ids:
                tx.set_instance_status(instance_id, "running")
            if final:
                self._set_current(tx, release_id)

        self.journal.step("switched", {"to": ids, "keep": kept, "final": final}, apply)
        share = "all" if not keep else f"{len(new)}/{len(new) + len(keep)} instances"
        self.progress(f"traffic switched: {share} on release {release_id}")

    def _set_current(self, tx: StateTx, release_id: ReleaseId) -> None:
        row = self.journal.store.get_environment(self.environment)
        tx.upsert_environment(
            EnvironmentRow(
                name=self.environment,
                runtime=self.policy.runtime,
                listen=self.policy.listen,
                config=self.policy.to_json(),
                current_release=ReleaseId(release_id),
                known_good_release=row.known_good_release if row is not None else None,
                updated=self.journal.store.clock.now(),
            )
        )

    def drain(self, leaving: Sequence[InstanceRow], *, keep_warm: bool = True) -> None:
        """Take ``leaving`` out of service: kept warm for ``keep_warm``, or destroyed at once
        (after the router's drain) when it is 0 or ``keep_warm`` is False."""
        if not leaving:
            return
        warm = keep_warm and self.policy.keep_warm > 0
        self.take_out(leaving, warm=warm)
        if not warm:
            self.destroy(leaving, KEEP_WARM_ZERO if keep_warm else ROLLING_BATCH)

    def take_out(self, leaving: Sequence[InstanceRow], *, warm: bool) -> None:
        """Journal ``leaving`` out of service: kept warm for the policy's ``keep_warm`` when
        ``warm``, else about to be destroyed (``stopping``)."""
        ids = [r.id for r in leaving]
        until = self.journal.store.clock.now() + timedelta(seconds=self.policy.keep_warm)

        def apply(tx: StateTx) -> None:
            for instance_id in ids:
                tx.set_instance_status(
                    instance_id,
                    "warm" if warm else "stopping",
                    {"warm_until": format_time(until)},
                )

        self.journal.step(
            "drain", {"instances": ids, "keep_warm": self.policy.keep_warm if warm else 0}, apply
        )
        if warm:
            self.progress(
                f"{len(ids)} previous instance(s) drained, kept warm for "
                f"{self.policy.keep_warm:g}s (instant rollback)"
            )

    def remove_route(self) -> None:
        """A rollout never removes its environment's route.

        Raises:
            UsageError: always.
        """
        raise UsageError("a rollout never removes the route (castiron down does)")

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None:
        """Destroy ``leaving`` (taken out of service: the router drains them first) and
        forget them, audited with ``why``.

        Raises:
            RuntimeDriverError: when the runtime cannot destroy one.
        """
        ids = [r.id for r in leaving]
        for row in leaving:
            self.driver.destroy(row_instance(row), grace=self.policy.drain_timeout)
        self.journal.store.mutate(
            _draft("instance.destroy", self.environment, ids, why),
            lambda tx: remove_instances(tx, ids),
        )
        self.progress(f"{len(ids)} previous instance(s) drained and destroyed")


def release_instance_spec(
    release: Release,
    image: ImageRef,
    runtime: ImageRuntime,
    secrets: Mapping[str, str],
    instance_id: str,
    deployment_id: str,
) -> InstanceSpec:
    """What a driver needs to create instance ``instance_id`` of ``release`` (its secret
    values in ``secrets``) during the deployment ``deployment_id``."""
    cfg = release.config
    env = {**dict(runtime.env), **dict(cfg.env), **dict(secrets)}
    isolation: Isolation = "auto"
    if cfg.isolation in ("sandbox", "none"):
        isolation = "sandbox" if cfg.isolation == "sandbox" else "none"
    return InstanceSpec(
        id=instance_id,
        app=cfg.app,
        environment=cfg.environment,
        release=release.id,
        image=image,
        command=runtime.command,
        env=env,
        workdir=runtime.workdir,
        port=instance_port(cfg),
        user=runtime.user,
        secret_names=frozenset(secrets),
        isolation=isolation,
        writable=cfg.writable,
        memory=cfg.memory,
        cpus=cfg.cpus,
        labels={
            "castiron.app": cfg.app,
            "castiron.environment": cfg.environment,
            "castiron.release": release.id,
            "castiron.deployment": deployment_id,
        },
        health=cfg.health,
        network=cfg.network,
    )


def remove_instances(tx: StateTx, ids: Sequence[str]) -> None:
    """Forget destroyed instances."""
    for instance_id in ids:
        tx.remove_instance(instance_id)


def _draft(action: str, environment: str, ids: Sequence[str], why: str) -> AuditDraft:
    return AuditDraft(
        action, environment=environment, subject=",".join(ids), details={"why": why, "ids": ids}
    )


def _describe(check: HealthCheck) -> str:
    if check.kind == "http":
        return f"GET {check.target}"
    if check.kind == "command":
        return "the health command"
    return "a TCP connect"


def desired(rollout: Rollout, strategy: str) -> Desired:
    """What ``rollout`` moves its environment to, for the planner."""
    return desired_of(rollout.release, rollout.policy, strategy)


def desired_of(release: Release, policy: Policy, strategy: str | None = None) -> Desired:
    """What deploying ``release`` under ``policy`` (with ``strategy``, default the
    policy's) moves its environment to, for the planner."""
    weights = tuple(s.weight for s in policy.canary.steps) if policy.canary is not None else ()
    return Desired(
        release=release.id,
        replicas=release.config.replicas,
        strategy=strategy or policy.strategy,
        batch=policy.batch,
        canary_weights=weights,
        keep_warm=policy.keep_warm,
        whole_releases=routes_whole_releases(policy),
    )


def serving(rollout: Rollout) -> Serving:
    """What serves before ``rollout``: its previous instances, of one release."""
    previous = rollout.previous
    return Serving(previous[0].release if previous else None, len(previous))


def blue_green(rollout: Rollout) -> None:
    """Start the whole new set, wait until every one is healthy, switch at once, drain."""
    execute(rollout, strategy_operations(serving(rollout), desired(rollout, "blue-green")))


def routes_whole_releases(policy: Policy) -> bool:
    """Whether ``policy``'s runtime routes to every instance of a release or to none (a
    Kubernetes Service selects pods by release): an instance of the previous release that
    leaves service in a rolling batch must then go at once, or it keeps taking a share."""
    return policy.runtime == "kubernetes"


def rolling(rollout: Rollout) -> None:
    """Replace in batches of ``policy.batch`` with no instance less in service at any time.

    Where the runtime routes whole releases (Kubernetes), each batch scales the new release
    up, waits until it is ready, then scales the previous release down by as many: the
    previous instances are destroyed batch by batch instead of kept warm (a rollback after a
    rolling deployment there starts the previous release again)."""
    execute(rollout, strategy_operations(serving(rollout), desired(rollout, "rolling")))


STRATEGIES: dict[StrategyName, Callable[[Rollout], None]] = {
    "blue-green": blue_green,
    "rolling": rolling,
}
"""The strategies of this module by the name used in ``strategy.type`` (the canary's is
:func:`castiron.engine.canary.run_canary`, built on these)."""


__all__ = [
    "FIRST_POLL",
    "INSPECT_EVERY",
    "LOG_LINES",
    "STRATEGIES",
    "CanarySteps",
    "DriverOnUse",
    "ImageRuntime",
    "Mechanics",
    "Policy",
    "Prober",
    "Rollout",
    "Target",
    "backends_of",
    "blue_green",
    "desired",
    "desired_of",
    "execute",
    "instance_row",
    "release_instance_spec",
    "rolling",
    "routes_whole_releases",
    "row_instance",
    "serving",
]
