"""State store conformance: opening, migrations, refusal of bad files, typed rows, one writer."""

from __future__ import annotations

import inspect
import os
import sqlite3
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from castiron.errors import NotFoundError, SchemaTooNewError, StateCorruptError, TagConflictError
from castiron.model import Digest, ReleaseId
from castiron.state.base import (
    AuditDraft,
    DeploymentRow,
    EnvironmentRow,
    EventRow,
    ImageRow,
    InstanceRow,
    ManualClock,
    ReleaseRow,
    StateStore,
    StateTx,
)
from castiron.state.postgres import PostgresStateStore
from castiron.state.sqlite import APPLICATION_ID, SqliteStateStore, migrations, open_state

from .conftest import OpenStore, append

D1 = Digest("sha256:" + "1" * 64)
D2 = Digest("sha256:" + "2" * 64)


def _draft(action: str = "test.write") -> AuditDraft:
    return AuditDraft(action, environment="staging")


def test_missing_database_is_created_with_a_private_home(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "home" / "state.db"
    with open_state(path, actor="a@b") as store:
        assert store.schema_migrations()[0][0] == "0001_initial"
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_migrations_are_named_and_recorded_in_order(store: StateStore) -> None:
    applied = store.schema_migrations()
    assert [name for name, _ in applied] == [m.name for m in migrations()]
    assert all(at.endswith("Z") for _, at in applied)


def test_reopening_applies_nothing_twice(open_store: OpenStore) -> None:
    first = open_store().schema_migrations()
    assert open_store().schema_migrations() == first


def test_wal_foreign_keys_and_busy_timeout_are_on(tmp_path: Path) -> None:
    store = open_state(tmp_path / "state.db", actor="a@b")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("foreign_keys") == 1
    assert store.pragma("busy_timeout") > 0
    assert store.pragma("application_id") == APPLICATION_ID
    store.close()


def test_foreign_keys_are_enforced(store: StateStore, clock: ManualClock) -> None:
    release = ReleaseRow(ReleaseId("r1"), "staging", D1, {}, clock.now())
    with pytest.raises(NotFoundError, match="not recorded"):
        store.mutate(_draft(), lambda tx: tx.create_release(release))
    assert store.get_release(ReleaseId("r1")) is None
    assert store.audit_entries() == []


def _make_newer(path: Path, how: str) -> None:
    with sqlite3.connect(path) as conn:
        if how == "unknown-migration":
            conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES ('9999_future', 'x')"
            )
        else:
            conn.execute("PRAGMA user_version=99")
    conn.close()


@pytest.mark.parametrize("how", ["unknown-migration", "higher-version"])
def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path, how: str) -> None:
    path = tmp_path / "state.db"
    open_state(path, actor="a@b").close()
    _make_newer(path, how)
    before = path.read_bytes()
    with pytest.raises(SchemaTooNewError, match="newer castiron"):
        open_state(path, actor="a@b")
    assert path.read_bytes() == before


def _corrupt(path: Path, how: str) -> None:
    if how == "not-sqlite":
        path.write_bytes(b"hello, this is a text file\n" * 100)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "foreign-sqlite":
        path.unlink()
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")
        conn.close()
    elif how == "castiron-id-without-schema":
        path.unlink()
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("CREATE TABLE schema_migrations (name TEXT, applied_at TEXT)")
            conn.execute("INSERT INTO schema_migrations VALUES ('0001_initial', 'x')")
        conn.close()
    else:  # pragma: no cover
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["not-sqlite", "empty", "truncated", "foreign-sqlite", "castiron-id-without-schema"]
)
def test_corrupt_database_is_refused_and_left_untouched(tmp_path: Path, how: str) -> None:
    path = tmp_path / "state.db"
    with open_state(path, actor="a@b") as store:
        append(store, 50)
    _corrupt(path, how)
    before = path.read_bytes()
    with pytest.raises(StateCorruptError, match=str(path)):
        open_state(path, actor="a@b")
    assert path.read_bytes() == before


def test_cli_reports_a_corrupt_database(run_cli, home: Path) -> None:  # type: ignore[no-untyped-def]
    home.mkdir()
    (home / "state.db").write_text("not a database", encoding="utf-8")
    result = run_cli("audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert "not a SQLite database" in result.stderr
    assert (home / "state.db").read_text(encoding="utf-8") == "not a database"


def test_images_and_tags_bind_once(store: StateStore, clock: ManualClock) -> None:
    image = ImageRow(D1, 1234, clock.now(), "bake", {"layers": 2})
    store.mutate(_draft("image.record"), lambda tx: tx.record_image(image))
    store.mutate(_draft("image.record"), lambda tx: tx.record_image(image))  # idempotent
    assert store.get_image(D1) == image
    assert store.list_images() == [image]

    tag = store.mutate(_draft("tag.bind"), lambda tx: tx.bind_tag("v1", D1))
    assert store.mutate(_draft("tag.bind"), lambda tx: tx.bind_tag("v1", D1)) == tag
    assert store.get_tag("v1") == tag
    assert store.list_tags(D1) == [tag]

    store.mutate(_draft(), lambda tx: tx.record_image(ImageRow(D2, 1, clock.now())))
    with pytest.raises(TagConflictError, match="'v1' is already bound to sha256:1111"):
        store.mutate(_draft("tag.bind"), lambda tx: tx.bind_tag("v1", D2))
    with pytest.raises(NotFoundError, match="no image"):
        store.mutate(_draft("tag.bind"), lambda tx: tx.bind_tag("v2", Digest("sha256:" + "3" * 64)))
    assert store.get_tag("v1") == tag


def _seed_release(store: StateStore, clock: ManualClock, rid: str = "r1") -> ReleaseRow:
    release = ReleaseRow(
        ReleaseId(rid), "staging", D1, {"replicas": 2, "env": {"A": "1"}}, clock.now()
    )

    def apply(tx: StateTx) -> None:
        tx.record_image(ImageRow(D1, 1, clock.now()))
        tx.create_release(release)

    store.mutate(_draft("release.create"), apply)
    return release


def test_environments_releases_deployments_and_journal(
    store: StateStore, clock: ManualClock
) -> None:
    r1 = _seed_release(store, clock, "r1")
    r2 = _seed_release(store, clock, "r2")
    assert store.get_release(ReleaseId("r1")) == r1
    assert store.list_releases("staging") == [r1, r2]

    env = EnvironmentRow("staging", "local", "127.0.0.1:8080", {"replicas": 2}, r1.id)
    store.mutate(_draft("env.upsert"), lambda tx: tx.upsert_environment(env))
    moved = EnvironmentRow("staging", "local", "127.0.0.1:8080", {}, r2.id, r1.id, clock.now())
    store.mutate(_draft("env.upsert"), lambda tx: tx.upsert_environment(moved))
    assert store.get_environment("staging") == moved
    assert store.list_environments() == [moved]

    dep = DeploymentRow(
        "d1",
        "staging",
        r1.id,
        r2.id,
        "blue-green",
        "tester@testhost",
        clock.now(),
        git_commit="abc123",
    )
    store.mutate(_draft("deploy.start"), lambda tx: tx.create_deployment(dep))
    clock.advance(1)
    s1 = store.mutate(
        _draft(), lambda tx: tx.append_step("d1", "create", "started", {"n": 2}, clock.now())
    )
    s2 = store.mutate(_draft(), lambda tx: tx.append_step("d1", "create", "done", {}, clock.now()))
    assert (s1.seq, s2.seq) == (1, 2)
    assert store.steps("d1") == [s1, s2]
    done = store.mutate(
        _draft("deploy.finish"),
        lambda tx: tx.finish_deployment("d1", "succeeded", clock.now(), {"took": 1}),
    )
    assert done.outcome == "succeeded"
    assert store.get_deployment("d1") == done
    assert store.list_deployments("staging", limit=1) == [done]
    with pytest.raises(NotFoundError):
        store.mutate(_draft(), lambda tx: tx.append_step("nope", "x", "y", {}, clock.now()))


def test_same_release_id_with_other_content_is_refused(
    store: StateStore, clock: ManualClock
) -> None:
    _seed_release(store, clock, "r1")
    other = ReleaseRow(ReleaseId("r1"), "staging", D1, {"replicas": 3}, clock.now())
    with pytest.raises(Exception, match="other content"):
        store.mutate(_draft(), lambda tx: tx.create_release(other))


def test_instances_and_events(store: StateStore, clock: ManualClock) -> None:
    r1 = _seed_release(store, clock)
    inst = InstanceRow("i1", "staging", r1.id, "127.0.0.1:9001", "local", "starting", {"pid": 7})
    store.mutate(_draft(), lambda tx: tx.put_instance(inst))
    healthy = store.mutate(
        _draft(), lambda tx: tx.set_instance_status("i1", "healthy", {"checks": 2})
    )
    assert healthy.data == {"pid": 7, "checks": 2}
    assert store.list_instances("staging") == [healthy]
    store.mutate(_draft(), lambda tx: tx.remove_instance("i1"))
    assert store.list_instances() == []

    e1 = store.mutate(_draft(), lambda tx: tx.add_event(EventRow(clock.now(), "staging", "k", "m")))
    clock.advance(60)
    e2 = store.mutate(_draft(), lambda tx: tx.add_event(EventRow(clock.now(), "staging", "k", "n")))
    assert e1.id is not None and e2.id == e1.id + 1
    assert store.events("staging") == [e1, e2]
    assert store.events(since=clock.now() - timedelta(seconds=1)) == [e2]


# -- one writer ---------------------------------------------------------------------------------

READS = {
    "actor",
    "clock",
    "path",
    "key_path",
    "head_path",
    "pragma",
    "schema_migrations",
    "get_image",
    "list_images",
    "get_tag",
    "list_tags",
    "get_environment",
    "list_environments",
    "get_release",
    "list_releases",
    "get_deployment",
    "list_deployments",
    "steps",
    "list_instances",
    "events",
    "get_lease",
    "list_leases",
    "approvals",
    "redactor",
    "gate_results",
    "audit_entries",
    "get_token",
    "token_by_hash",
    "list_tokens",
    "audit_rows",
    "audit_links",
    "audit_head",
    "verify_audit",
    "dump",
    "location",
}


@pytest.mark.parametrize("cls", [SqliteStateStore, PostgresStateStore])
def test_the_public_surface_has_one_writer(cls: type) -> None:
    # A new public method must be classified here: a read, or a reason to be a writer.
    public = {name for name, _ in inspect.getmembers(cls) if not name.startswith("_")}
    assert public - READS == {"mutate", "renew_lease", "close"}


def test_mutate_needs_an_audit_draft(store: StateStore) -> None:
    with pytest.raises(TypeError, match="AuditDraft"):
        store.mutate(None, lambda tx: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action"):
        AuditDraft("")


def test_every_mutation_writes_exactly_one_entry(store: StateStore) -> None:
    append(store, 3)
    assert [e.seq for e in store.audit_entries()] == [1, 2, 3]
    assert len(store.events("staging")) == 3


def test_a_failed_mutation_writes_neither_state_nor_entry(
    store: StateStore, clock: ManualClock
) -> None:
    def apply(tx: StateTx) -> None:
        tx.add_event(EventRow(clock.now(), "staging", "k", "m"))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.mutate(_draft(), apply)
    assert store.events() == []
    assert store.audit_entries() == []


def test_a_transaction_handle_is_dead_after_mutate(store: StateStore, clock: ManualClock) -> None:
    kept: list[StateTx] = []
    store.mutate(_draft(), kept.append)
    with pytest.raises(Exception, match="transaction has ended"):
        kept[0].add_event(EventRow(clock.now(), "staging", "k", "sneaky"))
    assert store.events() == []


def test_notes_from_inside_the_transaction_land_in_the_entry(store: StateStore) -> None:
    store.mutate(AuditDraft("x.y", details={"a": 1}), lambda tx: tx.note(b=2))
    assert store.audit_entries()[0].details == {"a": 1, "b": 2}
