"""The audit head file is written once per store, not per mutation: it exists from the first
mutation, may lag behind the database while a store is open (or after its process died), and
catches up when the store is closed or verifies."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from castiron.state import audit
from castiron.state.sqlite import open_state

from .conftest import append


def _file_seq(db: Path) -> int:
    return int(json.loads(db.with_name("audit.head").read_text())["seq"])


def test_the_head_file_exists_from_the_first_mutation_and_catches_up_on_close(
    tmp_path: Path,
) -> None:
    db = tmp_path / "home" / "state.db"
    store = open_state(db, actor="a@b")
    append(store, 1)
    assert _file_seq(db) == 1
    append(store, 3)
    with open_state(db, actor="c@d") as other:
        assert other.verify_audit().ok  # a lagging head file is not tampering
    store.close()
    assert _file_seq(db) == 4
    head = audit.read_head_file(db.with_name("audit.head"))
    with open_state(db, actor="c@d") as other:
        assert head == other.audit_head()


def test_verifying_in_the_same_store_writes_the_head_first(tmp_path: Path) -> None:
    db = tmp_path / "home" / "state.db"
    with open_state(db, actor="a@b") as store:
        append(store, 3)
        report = store.verify_audit()
        assert report.ok and _file_seq(db) == 3


def test_a_killed_process_leaves_a_verifiable_chain(tmp_path: Path) -> None:
    db = tmp_path / "home" / "state.db"
    with open_state(db, actor="a@b") as store:
        append(store, 2)
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from castiron.state.base import AuditDraft
        from castiron.state.sqlite import open_state
        store = open_state(Path({str(db)!r}), actor="killed@host")
        for _ in range(3):
            store.mutate(AuditDraft("test.step", environment="staging"), lambda tx: None)
        os._exit(9)  # no close: the head file is left behind the chain
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == 9
    assert _file_seq(db) == 2
    with open_state(db, actor="c@d") as store:
        report = store.verify_audit()
        assert report.ok and report.entries == 5
