"""State store conformance, on every backend: API tokens, approvals bound to identities, and
the masking of secret values in every text the store writes."""

from __future__ import annotations

import pytest

from castiron.errors import NotFoundError, UsageError
from castiron.model import Digest, Identity, ReleaseId
from castiron.state.base import (
    ApprovalRow,
    AuditDraft,
    DeploymentRow,
    EventRow,
    GateResultRow,
    ImageRow,
    InstanceRow,
    ManualClock,
    ReleaseRow,
    StateStore,
    StateTx,
    TokenRow,
)
from castiron.state.sqlite import TABLES, SqlStateStore

D1 = Digest("sha256:" + "1" * 64)
RID = ReleaseId("r1")
SECRET = "hunter2-db-Pa55"


def _release(store: StateStore) -> None:
    now = store.clock.now()

    def apply(tx: StateTx) -> None:
        tx.record_image(ImageRow(D1, 1, now))
        tx.create_release(ReleaseRow(RID, "staging", D1, {}, now))

    store.mutate(AuditDraft("test.release", environment="staging"), apply)


# -- tokens -------------------------------------------------------------------------------------


def test_tokens_are_recorded_found_listed_and_revoked(
    store: StateStore, clock: ManualClock
) -> None:
    now = clock.now()
    ci = TokenRow("ci", "deployer", "a" * 64, now, "tester@testhost")
    viewer = TokenRow("board", "viewer", "b" * 64, now, "tester@testhost")
    store.mutate(AuditDraft("token.create", subject="ci"), lambda tx: tx.add_token(ci))
    store.mutate(AuditDraft("token.create", subject="board"), lambda tx: tx.add_token(viewer))

    assert store.get_token("ci") == ci
    assert store.get_token("nope") is None
    assert store.token_by_hash("b" * 64) == viewer
    assert store.token_by_hash("c" * 64) is None
    assert [t.name for t in store.list_tokens()] == ["board", "ci"]

    with pytest.raises(UsageError, match=r"^a token named 'ci' already exists$"):
        store.mutate(AuditDraft("token.create", subject="ci"), lambda tx: tx.add_token(ci))

    clock.advance(5)
    first = clock.now()
    revoked = store.mutate(
        AuditDraft("token.revoke", subject="ci"), lambda tx: tx.revoke_token("ci", first)
    )
    assert revoked.revoked == first
    clock.advance(5)
    again = store.mutate(
        AuditDraft("token.revoke", subject="ci"), lambda tx: tx.revoke_token("ci", clock.now())
    )
    assert again.revoked == first  # a revoked token stays as it was
    found = store.token_by_hash("a" * 64)
    assert found is not None and found.revoked == first
    with pytest.raises(NotFoundError, match=r"^no API token named 'ghost'$"):
        store.mutate(
            AuditDraft("token.revoke", subject="ghost"),
            lambda tx: tx.revoke_token("ghost", clock.now()),
        )
    assert [e.action for e in store.audit_entries()][-3:] == [
        "token.create",
        "token.revoke",
        "token.revoke",
    ]
    assert store.verify_audit().ok


# -- approvals bound to identities ---------------------------------------------------------------


def test_approvals_are_unique_by_identity_and_keep_who_signed(store: StateStore) -> None:
    _release(store)
    now = store.clock.now()
    alice = Identity("key", "sha256:" + "a" * 64)
    bob = Identity("key", "sha256:" + "b" * 64)

    def add(row: ApprovalRow) -> bool:
        return store.mutate(
            AuditDraft("release.approve", environment="staging"), lambda tx: tx.add_approval(row)
        )

    assert add(ApprovalRow("staging", RID, "alice@h", now, "ok", alice, "alice", "c2ln"))
    # The same key under another label records nothing new.
    assert not add(ApprovalRow("staging", RID, "mallory@h", now, "", alice, "mallory", "eA=="))
    assert add(ApprovalRow("staging", RID, "alice@h", now, "", bob, "bob", "eQ=="))
    # Without an identity (recorded before identities): one per label.
    assert add(ApprovalRow("staging", RID, "old@h", now))
    assert not add(ApprovalRow("staging", RID, "old@h", now))
    assert add(ApprovalRow("staging", RID, "older@h", now))

    rows = store.approvals("staging", RID)
    assert [(r.actor, r.identity, r.os_user, r.signature) for r in rows] == [
        ("alice@h", alice, "alice", "c2ln"),
        ("alice@h", bob, "bob", "eQ=="),
        ("old@h", None, "", ""),
        ("older@h", None, "", ""),
    ]
    assert rows[0].comment == "ok"
    assert store.approvals("production", RID) == []


# -- redaction ------------------------------------------------------------------------------------


def write_every_captured_text(store: StateStore, said: str) -> None:
    """Write ``said`` through every store write that captures text: a deployment's details,
    a journal step, instance data, an event, a gate result, an approval comment, a note and
    the audit details of the one transaction (also used by the SQLite file-bytes test)."""
    _release(store)
    now = store.clock.now()

    def apply(tx: StateTx) -> None:
        tx.create_deployment(
            DeploymentRow("d1", "staging", None, RID, "blue-green", "a@b", now, details={
                "error": said, said: [said]
            })
        )  # fmt: skip
        tx.append_step("d1", "health", "failed", {"logs": said}, now)
        tx.finish_deployment("d1", "failed", now, {"reason": said})
        tx.put_instance(InstanceRow("i1", "staging", RID, "127.0.0.1:1", "local", "up", {
            "last": said
        }))  # fmt: skip
        tx.set_instance_status("i1", "exited", {"tail": said})
        tx.add_event(EventRow(now, "staging", "instance-exited", said, {"out": said}))
        tx.add_gate_results([
            GateResultRow("g1", "staging", RID, D1, "checks", False, said, now, {"o": said})
        ])  # fmt: skip
        tx.add_approval(ApprovalRow("staging", RID, "a@b", now, said))
        tx.note(output=said)

    store.mutate(AuditDraft("test.capture", environment="staging", details={"x": said}), apply)


def test_every_text_the_store_writes_is_masked(store: StateStore) -> None:
    store.redactor.add([SECRET])  # as resolving a secret does, after the store was opened
    said = f"connecting with {SECRET}"
    masked = "connecting with ***"
    write_every_captured_text(store, said)

    deployment = store.get_deployment("d1")
    assert deployment is not None
    assert deployment.details == {"error": masked, masked: [masked], "reason": masked}
    assert store.steps("d1")[0].data == {"logs": masked}
    assert store.list_instances("staging")[0].data == {"last": masked, "tail": masked}
    event = store.events()[-1]
    assert (event.message, event.data) == (masked, {"out": masked})
    result = store.gate_results("staging")[0]
    assert (result.reason, result.data) == (masked, {"o": masked})
    assert store.approvals("staging", RID)[0].comment == masked
    assert store.audit_entries("staging")[-1].details == {"x": masked, "output": masked}
    assert store.verify_audit().ok
    assert isinstance(store, SqlStateStore)
    for table in TABLES:
        _, rows = store.dump(table)
        assert SECRET not in repr(rows), table
