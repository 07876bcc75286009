"""The state store's contract: row values, the audit draft, the clock and two protocols.

:class:`StateStore` is what the engine and the CLI hold: typed reads, plus exactly one way to
change anything, :meth:`StateStore.mutate`, which runs a caller's function against a
:class:`StateTx` and appends the matching audit entry in the same transaction. A
:class:`StateTx` only exists inside ``mutate``; once the transaction ends it refuses every call,
so there is no path to a write without an audit entry. The single exception is
:meth:`StateStore.renew_lease`, the lock heartbeat, which only moves a held lease's expiry
forward (auditing every heartbeat would flood the chain with noise).

This module knows no database technology (SQLite and PostgreSQL implement it), no spec, no
runtime, and does not read the environment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeVar

from castiron.model import Digest, Identity, ReleaseId
from castiron.redact import Redactor
from castiron.values import value

T = TypeVar("T")

JsonObject = Mapping[str, Any]
"""A JSON object (keys are strings, values JSON-serialisable)."""

LeaseKind = Literal["lease", "manual"]
"""``lease``: held by a live process and renewed by a heartbeat; ``manual``: a maintenance lock
taken with ``castiron lock acquire`` that only expires at its ttl."""


# --------------------------------------------------------------------------------------------
# time


def format_time(moment: datetime) -> str:
    """``moment`` as UTC ISO 8601 with microseconds and a ``Z``: ``2026-11-30T10:00:00.000000Z``.

    Fixed width, so the text sorts like the time it names.
    """
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; pass an aware one")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_time_short(moment: datetime) -> str:
    """``moment`` as UTC ISO 8601 to the second, for people: ``2026-11-30T10:00:00Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse a time written by :func:`format_time` (or any ISO 8601 form with an offset).

    Raises:
        ValueError: when ``text`` is not an ISO 8601 time with a zone.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return moment.astimezone(UTC)


class Clock(Protocol):
    """Where time comes from; injected so tests can move it."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a :class:`ManualClock` just advances)."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told (or when something sleeps on it). For tests."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start if start is not None else datetime(2026, 11, 30, 10, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self._now = self._now + timedelta(seconds=seconds)


# --------------------------------------------------------------------------------------------
# rows


@value
class ImageRow:
    """An image in the store, by manifest digest."""

    digest: Digest
    size: int
    created: datetime
    source: str = ""
    """How it was made (``bake``, ``import:FILE``, ``docker:REF``...)."""
    data: JsonObject = field(default_factory=dict)


@value
class TagRow:
    """A human name bound once to a digest."""

    tag: str
    digest: Digest
    created: datetime


@value
class EnvironmentRow:
    """A named target as last deployed to."""

    name: str
    runtime: str
    listen: str
    config: JsonObject = field(default_factory=dict)
    current_release: ReleaseId | None = None
    known_good_release: ReleaseId | None = None
    updated: datetime | None = None


@value
class ReleaseRow:
    """Image digest + the resolved runtime config of one environment; never changes."""

    id: ReleaseId
    environment: str
    digest: Digest
    config: JsonObject
    created: datetime


DeploymentOutcome = Literal["running", "succeeded", "failed", "rolled_back", "aborted"]


@value
class DeploymentRow:
    """Moving an environment from one release to another."""

    id: str
    environment: str
    from_release: ReleaseId | None
    to_release: ReleaseId
    strategy: str
    actor: str
    started: datetime
    finished: datetime | None = None
    outcome: DeploymentOutcome = "running"
    details: JsonObject = field(default_factory=dict)
    git_commit: str | None = None


@value
class StepRow:
    """One journal entry of a deployment, written before the step acts."""

    deployment_id: str
    seq: int
    step: str
    state: str
    data: JsonObject
    at: datetime


@value
class InstanceRow:
    """One running unit of a release, as recorded."""

    id: str
    environment: str
    release: ReleaseId
    address: str
    runtime: str
    status: str
    data: JsonObject = field(default_factory=dict)


@value
class EventRow:
    """Something worth telling a human about an environment."""

    time: datetime
    environment: str
    kind: str
    message: str
    data: JsonObject = field(default_factory=dict)
    id: int | None = None
    """Assigned by the store."""


@value
class Lease:
    """Who holds an environment's lock, for what, until when."""

    environment: str
    token: str
    """Random; only the holder knows it (renewal and release check it)."""
    holder: str
    """The actor, ``user@host``."""
    pid: int | None
    """The holding process; ``None`` for a manual lock (its process has long exited)."""
    host: str
    purpose: str
    kind: LeaseKind
    acquired: datetime
    expires: datetime


@value
class ApprovalRow:
    """One approval of a release for an environment (the input of the ``approvals`` gate).

    Unique by (environment, release, identity): approving twice with one key records once.
    """

    environment: str
    release: ReleaseId
    actor: str
    """The ``CASTIRON_ACTOR`` label (``user@host``): shown, never counted."""
    created: datetime
    comment: str = ""
    identity: Identity | None = None
    """What the approval is bound to (a signing key); None for approvals recorded before
    castiron required one (never counted)."""
    os_user: str = ""
    """The OS user of the process that recorded it (from its uid, not the environment)."""
    signature: str = ""
    """Base64 DER signature by ``identity``'s key of
    :func:`castiron.engine.policy.approval_payload`."""


@value
class GateResultRow:
    """The result of one policy gate in one evaluation (all gates checked for one change)."""

    evaluation: str
    """Shared by every gate checked together; deployments name it in their details."""
    environment: str
    release: ReleaseId
    digest: Digest
    gate: str
    """The rule: ``require_signature``, ``promote_from``, ``soak``, ``approvals``, ``checks``."""
    passed: bool
    reason: str
    checked: datetime
    data: JsonObject = field(default_factory=dict)
    """What was looked at (e.g. a check's exit code and capped output)."""
    id: int | None = None
    """Assigned by the store."""


@value
class TokenRow:
    """An API token of ``castiron serve``: its name, role and the SHA-256 of its secret."""

    name: str
    role: str
    """``viewer``, ``deployer``, ``approver`` or ``admin``."""
    hash: str
    """Hex SHA-256 of the secret (the secret itself is never stored)."""
    created: datetime
    created_by: str
    revoked: datetime | None = None


# --------------------------------------------------------------------------------------------
# audit


@value
class AuditDraft:
    """What a mutation will record. The store adds seq, time, actor and the chain fields."""

    action: str
    """A dotted verb: ``deploy.start``, ``lock.acquire``, ``tag.bind``..."""
    environment: str | None = None
    subject: str | None = None
    """What was acted on (a release id, a tag, a lock's purpose)."""
    from_: str | None = None
    to: str | None = None
    result: str = "ok"
    details: JsonObject = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.action:
            raise ValueError("an audit draft needs an action")
        # Fail at the call site, not deep inside a transaction.
        json.dumps(dict(self.details), allow_nan=False)


@value
class AuditEntry:
    """One sealed link of the audit chain (see docs/state.md for the exact bytes)."""

    seq: int
    time: str
    """UTC, :func:`format_time` form (kept as text: the hash covers these exact characters)."""
    actor: str
    action: str
    environment: str | None
    subject: str | None
    from_: str | None
    to: str | None
    result: str
    details: JsonObject
    prev: str
    """The previous entry's hash (hex), or 64 zeros for the first."""
    hash: str


@value
class SignedHead:
    """The chain's last (seq, hash), signed with the installation's ed25519 key."""

    seq: int
    hash: str
    public_key: str
    """Hex of the raw 32-byte ed25519 public key that made ``signature``."""
    signature: str
    """Hex of the 64-byte signature over :func:`castiron.state.audit.head_message`."""


# --------------------------------------------------------------------------------------------
# protocols


class StateTx(Protocol):
    """Writes, valid only inside :meth:`StateStore.mutate`. Every call after it ends raises."""

    def note(self, **details: Any) -> None:
        """Add keys to the audit entry's details (facts only known inside the transaction)."""
        ...

    def record_image(self, image: ImageRow) -> None:
        """Record an image; recording the same digest again is a no-op."""
        ...

    def bind_tag(self, tag: str, digest: Digest) -> TagRow:
        """Bind ``tag`` to ``digest`` (the image must be recorded). Idempotent.

        Raises:
            TagConflictError: when ``tag`` is already bound to another digest.
            NotFoundError: when no image ``digest`` is recorded.
        """
        ...

    def upsert_environment(self, environment: EnvironmentRow) -> None:
        """Create or replace an environment's record."""
        ...

    def create_release(self, release: ReleaseRow) -> None:
        """Record a release; the same id again with the same content is a no-op.

        Raises:
            StateError: when the id exists with different content (ids are content hashes).
            NotFoundError: when its image is not recorded.
        """
        ...

    def create_deployment(self, deployment: DeploymentRow) -> None:
        """Record a deployment as started."""
        ...

    def finish_deployment(
        self,
        deployment_id: str,
        outcome: DeploymentOutcome,
        finished: datetime,
        details: JsonObject | None = None,
    ) -> DeploymentRow:
        """Set a deployment's outcome and finish time (details are merged).

        Raises:
            NotFoundError: when there is no such deployment.
        """
        ...

    def append_step(
        self, deployment_id: str, step: str, state: str, data: JsonObject, at: datetime
    ) -> StepRow:
        """Append a journal step; its ``seq`` is the next one of the deployment.

        Raises:
            NotFoundError: when there is no such deployment.
        """
        ...

    def put_instance(self, instance: InstanceRow) -> None:
        """Record a new instance (or replace the record of the same id)."""
        ...

    def set_instance_status(
        self, instance_id: str, status: str, data: JsonObject | None = None
    ) -> InstanceRow:
        """Change an instance's recorded status (data is merged).

        Raises:
            NotFoundError: when there is no such instance.
        """
        ...

    def remove_instance(self, instance_id: str) -> None:
        """Forget a destroyed instance (no-op when unknown)."""
        ...

    def add_event(self, event: EventRow) -> EventRow:
        """Append an event; returns it with its id."""
        ...

    def get_lease(self, environment: str) -> Lease | None:
        """The lease row of ``environment`` as of this transaction (expired or not)."""
        ...

    def put_lease(self, lease: Lease) -> None:
        """Write ``lease`` as the environment's only lease (replacing any other)."""
        ...

    def delete_lease(self, environment: str) -> None:
        """Remove the environment's lease (no-op when none)."""
        ...

    def add_approval(self, approval: ApprovalRow) -> bool:
        """Record an approval; False (and nothing changes) when that actor already approved
        that release for that environment."""
        ...

    def add_gate_results(self, results: Sequence[GateResultRow]) -> None:
        """Record the gate results of one policy evaluation."""
        ...

    def add_token(self, token: TokenRow) -> None:
        """Record a new API token.

        Raises:
            UsageError: when a token of that name exists (revoked or not).
        """
        ...

    def revoke_token(self, name: str, at: datetime) -> TokenRow:
        """Mark the token ``name`` revoked at ``at`` (a revoked one stays as it was).

        Raises:
            NotFoundError: when there is no such token.
        """
        ...


class StateStore(Protocol):
    """Persistent state: typed reads, and :meth:`mutate` as the one audited writer."""

    @property
    def actor(self) -> str:
        """Who this store's mutations are recorded as."""
        ...

    @property
    def clock(self) -> Clock:
        """Where this store's timestamps come from."""
        ...

    @property
    def redactor(self) -> Redactor:
        """The secret values this store masks (``***``) in every text it writes: deployment
        details, journal steps, instance data, events, gate results, approval comments and
        audit details. Whoever resolves a secret adds its value here before using it."""
        ...

    def mutate(self, draft: AuditDraft, apply: Callable[[StateTx], T]) -> T:
        """Run ``apply`` in one transaction and append ``draft`` as an audit entry in it.

        If ``apply`` raises, nothing is written (no state, no entry) and the error propagates.

        Raises:
            StateError: when the database cannot be written.
            AuditError: when the head cannot be signed (the key is missing or another one).
        """
        ...

    def renew_lease(self, environment: str, token: str, expires: datetime) -> bool:
        """Move the expiry of the lease held with ``token`` forward. False when it is gone."""
        ...

    # reads
    def schema_migrations(self) -> list[tuple[str, str]]:
        """Applied migrations as (name, applied_at), in order."""
        ...

    def get_image(self, digest: Digest) -> ImageRow | None: ...
    def list_images(self) -> list[ImageRow]: ...
    def get_tag(self, tag: str) -> TagRow | None: ...
    def list_tags(self, digest: Digest | None = None) -> list[TagRow]: ...
    def get_environment(self, name: str) -> EnvironmentRow | None: ...
    def list_environments(self) -> list[EnvironmentRow]: ...
    def get_release(self, release_id: ReleaseId) -> ReleaseRow | None: ...
    def list_releases(self, environment: str) -> list[ReleaseRow]: ...
    def get_deployment(self, deployment_id: str) -> DeploymentRow | None: ...
    def list_deployments(
        self, environment: str | None = None, limit: int | None = None
    ) -> list[DeploymentRow]: ...
    def steps(self, deployment_id: str) -> list[StepRow]: ...
    def list_instances(self, environment: str | None = None) -> list[InstanceRow]: ...
    def events(
        self, environment: str | None = None, since: datetime | None = None
    ) -> list[EventRow]: ...
    def get_lease(self, environment: str) -> Lease | None: ...
    def list_leases(self) -> list[Lease]: ...
    def approvals(self, environment: str, release: ReleaseId) -> list[ApprovalRow]:
        """Approvals of ``release`` for ``environment``, oldest first."""
        ...

    def gate_results(
        self, environment: str | None = None, evaluation: str | None = None
    ) -> list[GateResultRow]:
        """Recorded gate results (of one environment, of one evaluation), in the order made."""
        ...

    def audit_entries(
        self, environment: str | None = None, since: datetime | None = None
    ) -> list[AuditEntry]: ...
    def get_token(self, name: str) -> TokenRow | None: ...
    def token_by_hash(self, hash: str) -> TokenRow | None:
        """The token whose secret hashes to ``hash`` (revoked or not)."""
        ...

    def list_tokens(self) -> list[TokenRow]: ...
    def audit_head(self) -> SignedHead | None:
        """The signed head stored in the database (``None`` before the first entry)."""
        ...

    def verify_audit(self) -> AuditReport:
        """Check the whole chain, the head signature and the head file beside the key."""
        ...

    def close(self) -> None: ...


@value
class AuditReport:
    """The result of verifying the chain. ``ok`` is false when ``bad_seq``/``reason`` say why."""

    entries: int
    head: SignedHead | None
    ok: bool
    bad_seq: int | None = None
    reason: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-ready object."""
        return {
            "ok": self.ok,
            "entries": self.entries,
            "bad_seq": self.bad_seq,
            "reason": self.reason,
            "head": None
            if self.head is None
            else {"seq": self.head.seq, "hash": self.head.hash, "public_key": self.head.public_key},
        }


__all__ = [
    "ApprovalRow",
    "AuditDraft",
    "AuditEntry",
    "AuditReport",
    "Clock",
    "DeploymentOutcome",
    "DeploymentRow",
    "EnvironmentRow",
    "EventRow",
    "GateResultRow",
    "ImageRow",
    "InstanceRow",
    "JsonObject",
    "Lease",
    "LeaseKind",
    "ManualClock",
    "ReleaseRow",
    "SignedHead",
    "StateStore",
    "StateTx",
    "StepRow",
    "SystemClock",
    "TagRow",
    "TokenRow",
    "format_time",
    "format_time_short",
    "parse_time",
]
