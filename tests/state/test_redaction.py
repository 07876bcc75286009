"""On SQLite, the bytes of the database files (the database and its WAL) never hold a secret
value after every captured text was written (the field-by-field checks, on both backends, are
in test_tokens_approvals_redaction.py); the audit chain still verifies."""

from __future__ import annotations

from pathlib import Path

from castiron.redact import Redactor
from castiron.state.sqlite import open_state

from .test_tokens_approvals_redaction import SECRET, write_every_captured_text


def test_every_captured_text_is_masked_before_it_is_written(tmp_path: Path) -> None:
    redactor = Redactor()
    db = tmp_path / "home" / "state.db"
    with open_state(db, actor="a@b", redactor=redactor) as store:
        assert store.redactor is redactor
        redactor.add([SECRET])  # as resolving a secret does, after the store was opened
        write_every_captured_text(store, f"connecting with {SECRET}")
        deployment = store.get_deployment("d1")
        assert deployment is not None
        assert deployment.details["error"] == "connecting with ***"
        assert store.audit_entries("staging")[-1].details["x"] == "connecting with ***"
        assert store.verify_audit().ok
        files = [p for p in db.parent.iterdir() if p.name.startswith("state.db")]
        assert {p.name for p in files} >= {"state.db", "state.db-wal"}
        for path in files:
            assert SECRET.encode() not in path.read_bytes(), path.name
