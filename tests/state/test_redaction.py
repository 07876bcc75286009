"""The store masks the secret values its redactor knows in every captured text it writes:
deployment details, journal steps, instance data, events, gate results, approval comments and
audit details. The database files never hold the value; the audit chain still verifies."""

from __future__ import annotations

from pathlib import Path

from castiron.model import Digest, ReleaseId
from castiron.redact import Redactor
from castiron.state.base import (
    ApprovalRow,
    AuditDraft,
    DeploymentRow,
    EventRow,
    GateResultRow,
    ImageRow,
    InstanceRow,
    ReleaseRow,
    StateTx,
)
from castiron.state.sqlite import open_state

SECRET = "hunter2-db-Pa55"
D1 = Digest("sha256:" + "1" * 64)


def test_every_captured_text_is_masked_before_it_is_written(tmp_path: Path) -> None:
    redactor = Redactor()
    db = tmp_path / "home" / "state.db"
    with open_state(db, actor="a@b", redactor=redactor) as store:
        assert store.redactor is redactor
        redactor.add([SECRET])  # as resolving a secret does, after the store was opened
        now = store.clock.now()
        said = f"connecting with {SECRET}"
        rid = ReleaseId("r1")

        def apply(tx: StateTx) -> None:
            tx.record_image(ImageRow(D1, 1, now))
            tx.create_release(ReleaseRow(rid, "staging", D1, {}, now))
            tx.create_deployment(
                DeploymentRow("d1", "staging", None, rid, "blue-green", "a@b", now, details={
                    "error": said, said: [said]
                })
            )  # fmt: skip
            tx.append_step("d1", "health", "failed", {"logs": said}, now)
            tx.finish_deployment("d1", "failed", now, {"reason": said})
            tx.put_instance(InstanceRow("i1", "staging", rid, "127.0.0.1:1", "local", "up", {
                "last": said
            }))  # fmt: skip
            tx.set_instance_status("i1", "exited", {"tail": said})
            tx.add_event(EventRow(now, "staging", "instance-exited", said, {"out": said}))
            tx.add_gate_results([
                GateResultRow("g1", "staging", rid, D1, "checks", False, said, now, {"o": said})
            ])  # fmt: skip
            tx.add_approval(ApprovalRow("staging", rid, "a@b", now, said))
            tx.note(output=said)

        store.mutate(AuditDraft("test.capture", environment="staging", details={"x": said}), apply)
        deployment = store.get_deployment("d1")
        assert deployment is not None
        assert deployment.details["error"] == "connecting with ***"
        assert deployment.details["reason"] == "connecting with ***"
        assert store.steps("d1")[0].data == {"logs": "connecting with ***"}
        assert store.events()[0].message == "connecting with ***"
        assert store.gate_results("staging")[0].reason == "connecting with ***"
        assert store.approvals("staging", rid)[0].comment == "connecting with ***"
        entry = store.audit_entries("staging")[-1]
        assert entry.details == {"x": "connecting with ***", "output": "connecting with ***"}
        assert store.verify_audit().ok
        files = [p for p in db.parent.iterdir() if p.name.startswith("state.db")]
        assert {p.name for p in files} >= {"state.db", "state.db-wal"}
        for path in files:
            assert SECRET.encode() not in path.read_bytes(), path.name
