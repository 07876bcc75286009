"""Promotion: the exact image digest of one environment's release, deployed to the next.

Owns choosing what to promote (the source environment's current release, or a named one),
turning it into a :class:`~castiron.engine.deploy.Target` of the destination environment
(the destination's own config with the source's digest: the release id differs, the image
does not), and approvals (:func:`approve`), the input of the ``approvals`` gate: each is
signed by an approver's key over the environment, the release id and the OS user recording
it. The gates themselves live in :mod:`castiron.engine.policy`; they are enforced by
:func:`~castiron.engine.deploy.deploy` for promotions and plain deployments alike.

A promotion to an environment whose ``promote_from`` names another environment is refused
(rule ``promote_from``). To an environment without ``promote_from``, the environment promoted
from becomes the source of its ``soak`` and ``checks`` gates, and the digest must have deployed
successfully there.

It knows nothing of the CLI: it never prints or exits and reads no process environment.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from castiron.engine.context import EngineContext
from castiron.engine.deploy import DeployResult, Target, deploy, resolve
from castiron.engine.policy import (
    GatePolicy,
    GateResult,
    approval_payload,
    approver_keys,
    refuse,
    with_source,
)
from castiron.engine.records import current_release, load_release
from castiron.engine.release import Release
from castiron.engine.resolve import ResolvedSpec, resolve_spec
from castiron.errors import UsageError
from castiron.model import Identity, ReleaseId
from castiron.state.base import ApprovalRow, AuditDraft, StateStore, StateTx, format_time

if TYPE_CHECKING:
    from castiron.images.sign import Signer
    from castiron.spec.load import LoadedSpec

_RELEASE_ID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class Promotion:
    """What promoting ``source``'s release to the target's environment would deploy."""

    source: str
    source_release: Release
    target: Target
    """The destination's release (same digest, its own config), with its gates."""
    wrong_source: str | None = None
    """Set when the destination only accepts releases from this other environment."""

    @property
    def environment(self) -> str:
        return self.target.environment

    @property
    def gates(self) -> GatePolicy:
        """The destination's gates, with this promotion's source."""
        assert self.target.gates is not None  # prepare() always sets them
        return self.target.gates


@dataclass(frozen=True)
class PromoteResult:
    """What a promotion did."""

    source: str
    source_release: str
    result: DeployResult
    gates: list[dict[str, Any]]
    """``[{gate, passed, reason}]`` of the evaluation that allowed it (empty: no gates)."""

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of ``castiron promote``."""
        return {
            **self.result.to_json(),
            "from": self.source,
            "to": self.result.environment,
            "source_release": self.source_release,
            "gates": self.gates,
        }


def source_release(ctx: EngineContext, source: str, release: str | None = None) -> Release:
    """The release of ``source`` to promote: ``release`` (an id or unique prefix of a release
    recorded for ``source``), else the one ``source`` serves.

    Raises:
        UsageError: when ``source`` serves nothing, or ``release`` names no release of it (or
            several).
    """
    if release is None:
        current = current_release(ctx.store, source)
        if current is None:
            raise UsageError(
                f"{source!r} serves no release: deploy it first (or pass --release RELEASE)"
            )
        return current
    hits = [r.id for r in ctx.store.list_releases(source) if r.id.startswith(release)]
    if not hits:
        raise UsageError(f"no release {release!r} was ever deployed to {source!r}")
    if len(hits) > 1:
        raise UsageError(
            f"release prefix {release!r} is ambiguous in {source!r}: {', '.join(hits)}"
        )
    return load_release(ctx.store, hits[0])


def prepare(
    ctx: EngineContext,
    spec: ResolvedSpec | LoadedSpec,
    source: str,
    environment: str,
    *,
    release: str | None = None,
) -> Promotion:
    """Resolve promoting ``source``'s release (``release``, else its current one) to
    ``environment`` of ``spec``: the destination's config with the source's digest.

    Raises:
        UsageError: unknown environments, promoting to itself, nothing to promote.
        NotFoundError: when the image is no longer in the store.
        SpecError: when the spec cannot be read.
    """
    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_spec(spec)
    if source == environment:
        raise UsageError(f"cannot promote {environment!r} to itself")
    for name in (source, environment):
        if name not in resolved.environments:
            known = ", ".join(sorted(resolved.environments)) or "none"
            raise UsageError(f"no environment {name!r} in {resolved.path} (known: {known})")
    chosen = source_release(ctx, source, release)
    target = resolve(ctx, resolved, environment, chosen.digest)
    gates = target.gates or resolved.environments[environment].gates
    wrong = None
    if gates.source is None:
        gates = with_source(gates, source, resolved.environments[source].listen)
    elif gates.source != source:
        wrong = gates.source
    # A promotion leaves the host agent's drift watch as it is (only a deployment keeps it).
    return Promotion(source, chosen, replace(target, gates=gates, drift=None), wrong)


def promote(ctx: EngineContext, promotion: Promotion, *, lock_wait: float = 0.0) -> PromoteResult:
    """Deploy ``promotion`` through the destination's gates (after its plan was shown).

    Raises:
        PolicyRefusedError: (exit 5) when a gate refuses; recorded and audited.
        LockedError, DeployFailedError, StateError: as :func:`~castiron.engine.deploy.deploy`.
    """
    if promotion.wrong_source is not None:
        raise refuse(
            ctx.store,
            promotion.target,
            GateResult(
                "promote_from",
                False,
                f"{promotion.environment} accepts releases from {promotion.wrong_source} "
                f"only (promote_from), not from {promotion.source}",
                {"source": promotion.wrong_source, "requested": promotion.source},
            ),
        )
    result = deploy(ctx, promotion.target, lock_wait=lock_wait)
    gates: list[dict[str, Any]] = []
    if result.deployment is not None:
        row = ctx.store.get_deployment(result.deployment)
        recorded = row.details.get("gates") if row is not None else None
        if isinstance(recorded, dict) and isinstance(recorded.get("results"), list):
            gates = list(recorded["results"])
    return PromoteResult(promotion.source, promotion.source_release.id, result, gates)


@dataclass(frozen=True)
class Approval:
    """The outcome of :func:`approve`."""

    environment: str
    release: ReleaseId
    actor: str
    identity: Identity
    """The approver key that signed it."""
    os_user: str
    added: bool
    """False when this key had already approved it (recorded once)."""
    approvals: tuple[ApprovalRow, ...]
    """Every approval of this release for this environment, in order."""

    def to_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "release": self.release,
            "actor": self.actor,
            "identity": {"kind": self.identity.kind, "id": self.identity.id},
            "os_user": self.os_user,
            "added": self.added,
            "approvals": [_approval_json(a) for a in self.approvals],
        }


def _approval_json(row: ApprovalRow) -> dict[str, Any]:
    identity = row.identity
    return {
        "actor": row.actor,
        "identity": None if identity is None else {"kind": identity.kind, "id": identity.id},
        "os_user": row.os_user,
        "created": format_time(row.created),
    }


def approve(
    store: StateStore,
    policy: GatePolicy,
    release: str,
    signer: Signer,
    os_user: str,
    comment: str = "",
) -> Approval:
    """Record an approval of ``release`` (a release id, as plans show it) for
    ``policy.environment``, signed by ``signer`` (which must hold one of the environment's
    ``approvers`` keys) and recorded with ``os_user``; audited (``release.approve``) even
    when this key had already approved it.

    Raises:
        UsageError: when ``release`` is not a release id (16 hex digits), the environment
            lists no approvers, or ``signer``'s key is not one of them.
        StateError: when the database cannot be written.
    """
    environment = policy.environment
    if not _RELEASE_ID.match(release):
        raise UsageError(
            f"{release!r} is not a release id (16 hex digits, as `castiron promote` or "
            "`castiron plan` shows it)"
        )
    if not policy.approvers:
        raise UsageError(
            f"environment {environment!r} lists no approvers (policy.approvers): an approval "
            "would count for nothing there"
        )
    keys = approver_keys(policy)
    if signer.keyid not in {k.keyid for k in keys}:
        raise UsageError(
            f"key {signer.keyid} is not an approver of {environment!r} "
            f"(policy.approvers: {', '.join(policy.approvers)})"
        )
    rid = ReleaseId(release)
    signature = base64.b64encode(signer.sign(approval_payload(environment, rid, os_user)))
    return _record_approval(
        store,
        ApprovalRow(
            environment,
            rid,
            store.actor,
            store.clock.now(),
            comment,
            Identity("key", signer.keyid),
            os_user,
            signature.decode("ascii"),
        ),
    )


def approve_as_token(
    store: StateStore,
    environment: str,
    release: str,
    identity: Identity,
    os_user: str,
    comment: str = "",
) -> Approval:
    """Record an approval of ``release`` for ``environment`` by an API token (``identity``
    of kind ``token``, proven by the API's authentication); the gate counts it once per token
    while the token exists, is not revoked and may approve. Audited like :func:`approve`.

    Raises:
        UsageError: when ``release`` is not a release id or ``identity`` is not a token.
        StateError: when the database cannot be written.
    """
    if not _RELEASE_ID.match(release):
        raise UsageError(
            f"{release!r} is not a release id (16 hex digits, as `castiron promote` or "
            "`castiron plan` shows it)"
        )
    if identity.kind != "token":
        raise UsageError(f"{identity} is not an API token identity")
    rid = ReleaseId(release)
    return _record_approval(
        store,
        ApprovalRow(environment, rid, store.actor, store.clock.now(), comment, identity, os_user),
    )


def _record_approval(store: StateStore, row: ApprovalRow) -> Approval:
    """Store ``row`` (once per identity) with its ``release.approve`` audit entry."""
    environment, rid, identity, os_user = row.environment, row.release, row.identity, row.os_user
    comment = row.comment
    assert identity is not None

    def apply(tx: StateTx) -> bool:
        added = tx.add_approval(row)
        tx.note(added=added)
        return added

    details: dict[str, Any] = {"identity": str(identity), "os_user": os_user}
    if comment:
        details["comment"] = comment
    added = store.mutate(
        AuditDraft(
            "release.approve",
            environment=environment,
            subject=rid,
            to=rid,
            details=details,
        ),
        apply,
    )
    return Approval(
        environment,
        rid,
        store.actor,
        identity,
        os_user,
        added,
        tuple(store.approvals(environment, rid)),
    )


__all__ = [
    "Approval",
    "PromoteResult",
    "Promotion",
    "approve",
    "approve_as_token",
    "prepare",
    "promote",
    "source_release",
]
