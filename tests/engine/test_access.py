"""API tokens with roles: created with a secret shown once, stored hashed, revoked for good."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from castiron.engine.access import (
    GRANTS,
    Identity,
    authenticate,
    create_token,
    hash_secret,
    principal_of,
    revoke_token,
    token_json,
)
from castiron.errors import NotFoundError, UsageError
from castiron.state.sqlite import open_state


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "state.db"


def test_a_token_authenticates_as_its_identity_and_role(db: Path) -> None:
    with open_state(db, actor="admin@host") as store:
        row, secret = create_token(store, "ci-bot", "deployer")
        assert secret.startswith("cit_") and len(secret) > 40
        who = authenticate(store, secret)
        assert who is not None
        assert who.identity == Identity("token", "ci-bot")
        assert who.identity.actor == "token:ci-bot"
        assert who.role == "deployer" and who.can("deploy") and not who.can("approve")
        assert authenticate(store, secret + "x") is None
        assert authenticate(store, "not-a-token") is None
        assert token_json(row)["created_by"] == "admin@host"
        assert "hash" not in token_json(row) and "token" not in token_json(row)
        entry = store.audit_entries()[-1]
        assert (entry.action, entry.subject) == ("token.create", "ci-bot")
        assert entry.actor == "admin@host"
        assert secret not in repr(entry)


def test_only_the_hash_is_stored(db: Path) -> None:
    with open_state(db) as store:
        _, secret = create_token(store, "viewer", "viewer")
    dump = "\n".join(sqlite3.connect(db).iterdump())
    assert secret not in dump
    assert hash_secret(secret) in dump


def test_revoked_tokens_and_sessions_stop_working(db: Path) -> None:
    with open_state(db) as store:
        _, secret = create_token(store, "alice", "approver")
        assert principal_of(store, "alice") is not None
        revoked = revoke_token(store, "alice")
        assert revoked.revoked is not None
        assert authenticate(store, secret) is None
        assert principal_of(store, "alice") is None
        with pytest.raises(NotFoundError, match=r"^no API token named 'bob'$"):
            revoke_token(store, "bob")


@pytest.mark.parametrize(
    ("name", "role", "message"),
    [
        ("Bad Name", "viewer", "bad token name 'Bad Name': use 1-63 characters"),
        ("ok", "root", "unknown role 'root' \\(known: viewer, deployer, approver, admin\\)"),
    ],
)
def test_bad_names_and_roles_are_refused(db: Path, name: str, role: str, message: str) -> None:
    with open_state(db) as store:
        with pytest.raises(UsageError, match=message):
            create_token(store, name, role)
        assert store.list_tokens() == []


def test_a_name_is_taken_once(db: Path) -> None:
    with open_state(db) as store:
        create_token(store, "ci", "viewer")
        with pytest.raises(UsageError, match=r"^a token named 'ci' already exists$"):
            create_token(store, "ci", "admin")
        assert [t.role for t in store.list_tokens()] == ["viewer"]


def test_roles_grant_what_the_docs_say() -> None:
    assert GRANTS["viewer"] == {"read"}
    assert GRANTS["deployer"] == {"read", "deploy"}
    assert GRANTS["approver"] == {"read", "approve"}
    assert GRANTS["admin"] == {"read", "deploy", "approve", "admin"}
