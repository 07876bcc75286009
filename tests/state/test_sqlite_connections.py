"""Several connections to one SQLite file in one long-running process (``castiron serve``)
stay valid while other processes open and close the same file.

POSIX record locks belong to the process and closing any descriptor of the file drops them
all; opening a second store used to read the file's header through a new descriptor, which
unlocked the first store's connection: another process closing its connection then deleted
the WAL under it ("file is not a database").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from castiron.state.base import AuditDraft
from castiron.state.sqlite import open_state

OTHER_PROCESS = """
import sys
from castiron.state.base import AuditDraft
from castiron.state.sqlite import open_state
with open_state(__import__("pathlib").Path(sys.argv[1]), actor="other@test") as store:
    store.mutate(AuditDraft("test.other"), lambda tx: None)
"""


def test_a_long_lived_store_survives_other_stores_and_processes(tmp_path: Path) -> None:
    path = tmp_path / "home" / "state.db"
    keep = open_state(path, actor="server@test")
    try:
        keep.mutate(AuditDraft("test.first"), lambda tx: None)
        for round_ in range(3):
            with open_state(path, actor="request@test") as other:
                other.mutate(AuditDraft(f"test.request.{round_}"), lambda tx: None)
            done = subprocess.run(
                [sys.executable, "-c", OTHER_PROCESS, str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            actions = [e.action for e in keep.audit_entries()]
            assert actions[-2:] == [f"test.request.{round_}", "test.other"]
        keep.mutate(AuditDraft("test.last"), lambda tx: None)
        assert keep.verify_audit().ok
    finally:
        keep.close()
    with open_state(path) as again:
        assert again.verify_audit().ok
        assert len(again.audit_entries()) == 8
