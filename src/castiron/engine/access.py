"""API access: tokens with roles, and the identity a request acts as.

Owns the roles (``viewer``, ``deployer``, ``approver``, ``admin``) and what each may do, the
token secrets (random, shown once; only their SHA-256 is stored, through the state store) and
turning a presented secret into a :class:`Principal`. An :class:`Identity` is *who* as castiron
can prove it: ``kind`` (``token`` here; a signing key or the OS user elsewhere) and ``id``;
its :attr:`Identity.actor` (``token:NAME``) is what the state store records in audit entries,
approvals and deployments, so an approval through the API counts once per token.

It knows nothing of HTTP, click or rendering and reads no process environment.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any, Literal, get_args

from castiron.errors import NotFoundError, UsageError
from castiron.model import Identity
from castiron.state.base import AuditDraft, StateStore, StateTx, TokenRow, format_time_short
from castiron.values import value

Role = Literal["viewer", "deployer", "approver", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)

Permission = Literal["read", "deploy", "approve", "admin"]
"""``read``: every GET; ``deploy``: deploy, rollback, promote, canary continue/abort;
``approve``: approvals; ``admin``: taking an environment down."""

GRANTS: dict[Role, frozenset[Permission]] = {
    "viewer": frozenset({"read"}),
    "deployer": frozenset({"read", "deploy"}),
    "approver": frozenset({"read", "approve"}),
    "admin": frozenset({"read", "deploy", "approve", "admin"}),
}

TOKEN_PREFIX = "cit_"
"""Every secret starts with this, so scanners can spot a leaked one."""

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@value
class Principal:
    """An authenticated caller: its identity and role."""

    identity: Identity
    role: Role

    def can(self, permission: Permission) -> bool:
        """Whether this caller's role grants ``permission``."""
        return permission in GRANTS[self.role]


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a token secret (secrets are 256 random bits: no salt or stretching
    is needed to make a stolen hash useless)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def token_json(row: TokenRow) -> dict[str, Any]:
    """A token as JSON: never its secret nor its hash."""
    return {
        "name": row.name,
        "role": row.role,
        "created": format_time_short(row.created),
        "created_by": row.created_by,
        "revoked": format_time_short(row.revoked) if row.revoked else None,
    }


def check_role(role: str) -> Role:
    """``role`` as a :data:`Role`.

    Raises:
        UsageError: when it is not one.
    """
    for known in ROLES:
        if role == known:
            return known
    raise UsageError(f"unknown role {role!r} (known: {', '.join(ROLES)})")


def create_token(store: StateStore, name: str, role: str) -> tuple[TokenRow, str]:
    """Create the token ``name`` with ``role``; returns its row and its secret (shown once).
    Audited as ``token.create`` (without the secret).

    Raises:
        UsageError: for a bad name or role, or when the name is taken.
        StateError: when the database cannot be written.
    """
    if not _NAME.match(name):
        raise UsageError(
            f"bad token name {name!r}: use 1-63 characters a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    checked = check_role(role)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = TokenRow(name, checked, hash_secret(secret), store.clock.now(), store.actor)

    def apply(tx: StateTx) -> None:
        tx.add_token(row)

    store.mutate(AuditDraft("token.create", subject=name, details={"role": checked}), apply)
    return row, secret


def revoke_token(store: StateStore, name: str) -> TokenRow:
    """Revoke the token ``name`` (it stops working at once). Audited as ``token.revoke``.

    Raises:
        NotFoundError: when there is no such token.
        StateError: when the database cannot be written.
    """
    if store.get_token(name) is None:
        raise NotFoundError(f"no API token named {name!r}")
    now = store.clock.now()
    return store.mutate(
        AuditDraft("token.revoke", subject=name), lambda tx: tx.revoke_token(name, now)
    )


def authenticate(store: StateStore, secret: str) -> Principal | None:
    """The caller presenting ``secret``, or None when it is no live token."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    row = store.token_by_hash(hash_secret(secret))
    if row is None or row.revoked is not None:
        return None
    return Principal(Identity("token", row.name), check_role(row.role))


def principal_of(store: StateStore, name: str) -> Principal | None:
    """The caller a live token ``name`` stands for (a session names its token), or None."""
    row = store.get_token(name)
    if row is None or row.revoked is not None:
        return None
    return Principal(Identity("token", row.name), check_role(row.role))


__all__ = [
    "GRANTS",
    "ROLES",
    "TOKEN_PREFIX",
    "Identity",
    "Permission",
    "Principal",
    "Role",
    "authenticate",
    "check_role",
    "create_token",
    "hash_secret",
    "principal_of",
    "revoke_token",
    "token_json",
]
