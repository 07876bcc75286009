"""Drift's remedy, which never patches: :func:`fix_drift`.

Under the environment's lock it detects drift again (:mod:`castiron.engine.drift.detect`),
destroys strays (audited), re-unpacks a modified release tree to a fresh directory, replaces
every drifted instance with a fresh one of the same release with zero downtime (created,
health-gated, swapped into the route atomically, drained, destroyed: journaled like a
deployment, strategy ``drift-fix``), re-applies a wrong route from the records, and writes
one ``drift.fix`` audit entry per run listing what it replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from castiron.drivers.base import Driver
from castiron.engine.baselines import RootfsHolder
from castiron.engine.drift.detect import detect_drift
from castiron.engine.drift.report import DriftReport, FixResult
from castiron.engine.execute import execute
from castiron.engine.journal import Journal, new_deployment_id
from castiron.engine.operations import Operation, plan_drift_fix
from castiron.engine.records import load_release
from castiron.engine.recovery import locked, undo_failed
from castiron.engine.release import Release
from castiron.engine.resolve import DriftRules
from castiron.engine.strategies import Policy, Rollout, backends_of, remove_instances, row_instance
from castiron.errors import (
    CastironError,
    NotFoundError,
)
from castiron.model import ImageRef, Instance
from castiron.state.base import AuditDraft, DeploymentRow, InstanceRow, StateTx, format_time

if TYPE_CHECKING:
    from castiron.engine.context import EngineContext


FIX_STRATEGY = "drift-fix"
"""The strategy name a fix run is recorded under in the deployment history."""


# --- the remedy ---------------------------------------------------------------------------------


def fix_drift(
    context: EngineContext,
    environment: str,
    *,
    baselines: Path,
    rules: DriftRules | None = None,
    full: bool = False,
    threads: int = 1,
    lock_wait: float = 0.0,
) -> FixResult:
    """Find drift in ``environment`` under its lock and remove it by replacement.

    Strays are destroyed; a modified local tree is re-unpacked to a fresh directory; each
    drifted, stopped or missing instance is replaced by a fresh one of the same release
    (created, health-gated, swapped into the route atomically with the healthy ones, then the
    drifted ones are drained and destroyed); extra instances leave the route and are
    destroyed; a wrong route is re-applied from the records. Nothing is patched. One
    ``drift.fix`` audit entry lists what was done.

    Raises:
        NotFoundError: when the environment was never deployed.
        LockedError: when another process holds the environment's lock.
        DeployFailedError: when a replacement does not become healthy (it was undone; the
            environment serves as before).
        UsageError: when a secret of the release cannot be resolved.
        RuntimeDriverError, RouterError, AgentError, ImageError, StateError: on
            infrastructure failures.
    """
    if context.store.get_environment(environment) is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    with locked(context, environment, "drift fix", lock_wait):
        report = detect_drift(
            context, environment, baselines=baselines, rules=rules, full=full, threads=threads
        )
        if report.clean or report.release is None:
            return FixResult(report)
        return _fix(context, report)


def _fix(context: EngineContext, report: DriftReport) -> FixResult:
    environment = report.environment
    row = context.store.get_environment(environment)
    assert row is not None and report.release is not None
    policy = Policy.from_json(row.config)
    release = load_release(context.store, report.release)
    driver = context.driver(policy.runtime)
    grace = min(policy.drain_timeout, 10.0)
    strays_destroyed: list[str] = []
    for stray in report.strays:
        name = str(stray.config.get("container") or stray.instance.id or stray.instance.handle)
        context.store.mutate(
            AuditDraft(
                "drift.stray.destroy",
                environment=environment,
                subject=name,
                details={"instance": stray.instance.id, "handle": stray.instance.handle},
            ),
            lambda tx: None,
        )
        driver.destroy(stray.instance, grace=grace)
        strays_destroyed.append(name)
        context.observer.progress(f"destroyed stray {name}")
    renewed: list[tuple[str, Path | None]] = []
    if report.modified_trees and isinstance(driver, RootfsHolder):
        stored = context.images.image(release.digest)
        for digest in report.modified_trees:
            context.store.mutate(
                AuditDraft("drift.tree.renew", environment=environment, subject=digest),
                lambda tx: None,
            )
            image = ImageRef(digest, stored.config_digest, context.images.root)
            if digest != release.digest:
                image = ImageRef(
                    digest, context.images.image(digest).config_digest, context.images.root
                )
            renewed.append((digest, driver.renew_rootfs(image)))
            context.observer.progress(f"re-unpacked the modified tree of {digest[:19]}")
    rows = {r.id: r for r in context.store.list_instances(environment)}
    leaving = [rows[i] for i in (*report.replace, *report.extra) if i in rows]
    kept = [
        r
        for r in rows.values()
        if r.status == "running" and r.id not in report.replace and r.id not in report.extra
    ]
    replacing = len([i for i in report.replace if i in rows])
    operations = plan_drift_fix(
        release.id, len(kept), replacing, report.add, len(leaving) - replacing
    )
    created: list[Instance] = []
    deployment: str | None = None
    route_reapplied = False
    if operations:
        created, deployment = _replace(context, release, policy, driver, kept, leaving, operations)
        route_reapplied = True
        for instance in report.recreated:
            driver.destroy(instance, grace=grace)
    elif report.reroute:
        context.traffic.switch(
            environment,
            policy.listen,
            backends_of(release.id, kept),
            drain_timeout=policy.drain_timeout,
            limits=policy.limits,
            access_log=policy.access_log,
        )
        route_reapplied = True
        context.observer.progress(f"route of {environment} re-applied from the records")
    for _digest, aside in renewed:
        if aside is not None and isinstance(driver, RootfsHolder):
            with contextlib.suppress(CastironError):
                driver.discard_rootfs(aside)
    replaced = tuple(i for i in report.replace if i in rows)
    destroyed = tuple(i for i in report.extra if i in rows)
    result = FixResult(
        report=report,
        replaced=replaced,
        created=tuple(i.id for i in created),
        destroyed=destroyed,
        strays_destroyed=tuple(strays_destroyed),
        route_reapplied=route_reapplied,
        trees_renewed=tuple(d for d, _ in renewed),
        deployment=deployment,
    )
    details = {
        **result.to_json(),
        "release": release.id,
        "findings": len(report.findings),
        "kinds": sorted({f.kind for f in report.findings}),
    }
    context.store.mutate(
        AuditDraft(
            "drift.fix",
            environment=environment,
            subject=release.id,
            from_=release.id,
            to=release.id,
            details=details,
        ),
        lambda tx: None,
    )
    return result


@dataclass
class Replacement(Rollout):
    """A rollout that replaces instances of the release already serving: the fresh ones join
    ``kept`` (its instances that stay) in one switch, and the leaving ones are destroyed once
    the router has drained them (forgotten when the replacement finishes)."""

    kept: Sequence[InstanceRow] = ()

    def switch(self, new: Sequence[Instance], keep: Sequence[InstanceRow], *, final: bool) -> None:
        """Route ``kept`` and ``new`` together, atomically.

        Raises:
            RouterError, AgentError: when the router refuses or cannot be reached.
        """
        to: list[Instance | InstanceRow] = [*self.kept, *new]
        ids = [i.id for i in to]
        self.journal.step("switch", {"to": ids, "keep": [], "final": True})
        self.traffic.switch(
            self.environment,
            self.policy.listen,
            backends_of(self.release.id, to),
            drain_timeout=self.policy.drain_timeout,
            limits=self.policy.limits,
            access_log=self.policy.access_log,
        )
        new_ids = [i.id for i in new]

        def serve(tx: StateTx) -> None:
            for iid in new_ids:
                tx.set_instance_status(iid, "running")

        self.journal.step("switched", {"to": ids, "keep": [], "final": True}, serve)
        self.progress(
            f"traffic switched: {len(new)} fresh instance(s) in, {len(self.previous)} out"
        )

    def take_out(self, leaving: Sequence[InstanceRow], *, warm: bool) -> None:
        """Journal ``leaving`` as stopping (never kept warm: it drifted)."""
        leaving_ids = [r.id for r in leaving]
        until = format_time(self.journal.store.clock.now())

        def stopping(tx: StateTx) -> None:
            for iid in leaving_ids:
                tx.set_instance_status(iid, "stopping", {"warm_until": until})

        self.journal.step("drain", {"instances": leaving_ids, "keep_warm": 0}, stopping)

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None:
        """Destroy ``leaving`` once requests already sent to them had time to finish.

        Raises:
            RuntimeDriverError: when the runtime cannot destroy one.
        """
        if leaving:
            # Let requests already sent to the leaving instances finish (the router drains them).
            self.sleep(min(self.policy.drain_timeout, 1.0))
        for r in leaving:
            self.driver.destroy(row_instance(r), grace=min(self.policy.drain_timeout, 10.0))


def _replace(
    context: EngineContext,
    release: Release,
    policy: Policy,
    driver: Driver,
    kept: list[InstanceRow],
    leaving: list[InstanceRow],
    operations: Sequence[Operation],
) -> tuple[list[Instance], str]:
    """Run ``operations`` (see :func:`~castiron.engine.operations.plan_drift_fix`): create
    fresh instances, health-gate them, route ``kept`` + them atomically, then drain and
    destroy ``leaving``; journaled as a deployment so a crash is recovered."""
    from castiron.engine.secrets import resolve_secrets
    from castiron.engine.targets import image_runtime

    environment = release.environment
    secret_values = resolve_secrets(
        release, context.environ, Path(policy.base_dir), context.store.redactor
    )
    runtime = image_runtime(context.images, release.digest)
    stored = context.images.image(release.digest)
    image = ImageRef(release.digest, stored.config_digest, context.images.root)
    now = context.store.clock.now()
    deployment = DeploymentRow(
        id=new_deployment_id(),
        environment=environment,
        from_release=release.id,
        to_release=release.id,
        strategy=FIX_STRATEGY,
        actor=context.store.actor,
        started=now,
        details={"digest": release.digest, "replace": [r.id for r in leaving]},
    )
    journal = Journal.open(
        context.store,
        deployment,
        context.observer,
        lambda tx: None,
        {"previous": [r.id for r in leaving], "release": release.id, "why": "drift"},
    )
    rollout = Replacement(
        journal=journal,
        release=release,
        policy=policy,
        image=image,
        runtime=runtime,
        secrets=secret_values,
        driver=driver,
        traffic=context.traffic,
        previous=leaving,
        prober=context.prober,
        instance_logs=context.instance_logs,
        monotonic=context.monotonic,
        sleep=context.sleep,
        kept=kept,
    )
    # Up to the switch a failure is undone; after it the environment serves the fresh set.
    switched = next(i for i, op in enumerate(operations) if op.kind == "switch") + 1
    try:
        driver.ensure_image(image)
        execute(rollout, operations[:switched])
    except (Exception, KeyboardInterrupt) as exc:
        context.observer.progress("replacing drifted instances failed: undoing it")
        undo_failed(
            context,
            exc,
            deployment,
            journal.steps(),
            policy,
            "failed",
            what=f"replacing drifted instances of {environment!r}",
        )
        raise
    execute(rollout, operations[switched:])
    new = list(rollout.created)
    leaving_ids = [r.id for r in leaving]

    def forget(tx: StateTx) -> None:
        remove_instances(tx, leaving_ids)

    journal.finish(
        "succeeded",
        {"replaced": leaving_ids, "created": [i.id for i in new], "why": "drift"},
        forget,
    )
    for iid in leaving_ids:
        context.observer.progress(f"drained and destroyed {iid}")
    return new, deployment.id
