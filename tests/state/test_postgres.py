"""PostgreSQL specifics: choosing it, its schema checks, its connection errors (one line, no
password), the audit chain under 20 concurrent writers, and `state migrate` from SQLite.

The shared behaviour (every read and write, locks, audit tampering) is the parametrized
conformance suite in the other files of this package; these tests need the session's server.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from castiron.errors import SchemaTooNewError, StateCorruptError, UsageError
from castiron.ports import free_port
from castiron.settings import load_settings
from castiron.state import audit
from castiron.state.base import AuditDraft, EventRow
from castiron.state.postgres import open_postgres, redact_url
from castiron.state.sqlite import migrations, open_state

from .conftest import append

pytestmark = pytest.mark.postgres


def _exec(url: str, *statements: str) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows: list[Any] = []
        for statement in statements:
            cur = conn.execute(statement)
            rows = cur.fetchall() if cur.description else []
        return rows


def _dump(url: str) -> list[Any]:
    return _exec(
        url,
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' ORDER BY 1, 2",
    ) + _exec(url, "SELECT name FROM schema_migrations ORDER BY rowid")


# -- schema --------------------------------------------------------------------------------------


def test_the_same_named_migrations_are_applied_and_recorded(
    postgres_url: str, tmp_path: Path
) -> None:
    with open_postgres(postgres_url, actor="a@b", key_path=tmp_path / "audit.key") as store:
        assert [n for n, _ in store.schema_migrations()] == [m.name for m in migrations()]
    tables = {
        t
        for (t,) in _exec(
            postgres_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
    }
    sqlite = open_state(tmp_path / "state.db", actor="a@b")
    try:
        names = {r[0] for r in sqlite._all("SELECT name FROM sqlite_master WHERE type = 'table'")}
        sqlite_columns = {(t, r[1]) for t in names for r in sqlite._all(f"PRAGMA table_info({t})")}
    finally:
        sqlite.close()
    assert tables == names - {"sqlite_sequence"}
    pg_columns = {
        (t, c)
        for t, c in _exec(
            postgres_url,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'",
        )
    }
    # PostgreSQL has no implicit rowid: insertion order is an identity column there.
    implicit = {("deployments", "rowid"), ("schema_migrations", "rowid")}
    assert pg_columns - implicit == {(t, c) for t, c in sqlite_columns if t != "sqlite_sequence"}


def test_a_newer_schema_is_refused_and_left_untouched(postgres_url: str, tmp_path: Path) -> None:
    open_postgres(postgres_url, actor="a@b", key_path=tmp_path / "audit.key").close()
    _exec(
        postgres_url, "INSERT INTO schema_migrations (name, applied_at) VALUES ('9999_future', 'x')"
    )
    before = _dump(postgres_url)
    with pytest.raises(SchemaTooNewError, match=r"newer castiron \(9999_future\)"):
        open_postgres(postgres_url, actor="a@b", key_path=tmp_path / "audit.key")
    assert _dump(postgres_url) == before


def test_a_database_of_someone_else_is_refused_and_left_untouched(
    postgres_url: str, tmp_path: Path
) -> None:
    _exec(postgres_url, "CREATE TABLE notes (body TEXT)")
    with pytest.raises(StateCorruptError, match=r"holds 1 table\(s\) but no castiron schema"):
        open_postgres(postgres_url, actor="a@b", key_path=tmp_path / "audit.key")
    assert _exec(postgres_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [
        (1,)
    ]


TRICKY = [
    "",
    "plain",
    'quote " backslash \\ slash /',
    "controls \x01\x08\x09\x0a\x0c\x0d\x1f and DEL \x7f",
    "unicode é ü 漢字 \u2028\u2029 🚀",
]


@pytest.mark.parametrize("text", TRICKY)
def test_the_database_assembles_the_canonical_bytes(
    postgres_url: str, tmp_path: Path, text: str
) -> None:
    with open_postgres(postgres_url, actor=text or "a@b", key_path=tmp_path / "audit.key") as store:
        from castiron.state.base import AuditDraft

        store.mutate(
            AuditDraft("x.y", environment=text or None, subject=text, details={text: [text, 1]}),
            lambda tx: None,
        )
        rows = list(store.audit_rows())
        links = list(store.audit_links())
    assert links[0][3] == audit.canonical_bytes(rows[0])


# -- choosing the backend ------------------------------------------------------------------------


def test_the_state_location_comes_from_flag_env_or_settings_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    url = "postgresql://ci:s3cret@db.example:5432/castiron"
    assert load_settings({}, home=home).state is None
    assert load_settings({"CASTIRON_STATE": url}, home=home).shared_state
    assert load_settings({"CASTIRON_STATE": url}, home=home, state="sqlite:x.db").state == (
        f"sqlite:{Path.cwd() / 'x.db'}"
    )
    (home / "settings.yaml").write_text(
        "state:\n  url: postgresql://ci@db.example/castiron\n  password_env: PGPW\n"
    )
    settings = load_settings({}, home=home)
    assert (settings.state, settings.state_password_env) == (
        "postgresql://ci@db.example/castiron",
        "PGPW",
    )
    (home / "settings.yaml").write_text("state:\n  uri: x\n")
    with pytest.raises(UsageError, match=r"settings.yaml: state.uri: unknown key"):
        load_settings({}, home=home)
    with pytest.raises(
        UsageError, match=re.escape("CASTIRON_STATE: 'mysql://...' is not a state location")
    ):
        load_settings({"CASTIRON_STATE": "mysql://root:pw@x/db"}, home=home)


def test_a_password_is_redacted() -> None:
    assert redact_url("postgresql://ci:s3cret@db:5432/c?sslmode=require") == (
        "postgresql://ci:***@db:5432/c?sslmode=require"
    )
    assert redact_url("postgresql://ci@db/c") == "postgresql://ci@db/c"


def test_the_password_can_come_from_a_variable(  # type: ignore[no-untyped-def]
    run_cli, postgres_server: Any, postgres_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir()
    bare = postgres_url.replace(f":{postgres_server.password}@", "@")
    (home / "settings.yaml").write_text(f"state:\n  url: {bare}\n  password_env: PGPW\n")
    monkeypatch.setenv("PGPW", postgres_server.password)
    assert run_cli("lock", "acquire", "staging", "-m", "maintenance").exit_code == 0
    shown = json.loads(run_cli("state", "show", "--json").stdout)
    assert shown["backend"] == "postgresql" and shown["location"] == bare
    assert [m["name"] for m in shown["migrations"]] == [m.name for m in migrations()]


# -- connection problems: one line, exit 1, no traceback, no password ------------------------------


def _cases(server: Any) -> list[tuple[str, str]]:
    port = server.port
    free = free_port()
    return [
        (
            f"postgresql://castiron:wrong-pw-123@127.0.0.1:{port}/postgres",
            f"error: postgresql://127.0.0.1:{port}/postgres: password authentication failed for "
            "the state database (check the password in its URL or the state password variable)",
        ),
        (
            f"postgresql://castiron:wrong-pw-123@127.0.0.1:{free}/postgres",
            f"error: postgresql://127.0.0.1:{free}/postgres: no PostgreSQL server answers there "
            "(connection refused; is it running?)",
        ),
        (
            server.url("tls_only"),
            f"error: postgresql://127.0.0.1:{port}/tls_only: the server requires TLS; add "
            "sslmode=require (or verify-full) to the URL",
        ),
        (
            server.url("postgres", sslmode="require"),
            f"error: postgresql://127.0.0.1:{port}/postgres: TLS was required (sslmode) but the "
            "server does not offer it",
        ),
        (
            server.url("no_such_db"),
            f"error: postgresql://127.0.0.1:{port}/no_such_db: the database does not exist "
            "(create it first)",
        ),
    ]


def test_connection_problems_are_one_line_each(  # type: ignore[no-untyped-def]
    run_cli, postgres_server: Any
) -> None:
    for url, message in _cases(postgres_server):
        result = run_cli("--state", url, "lock", "status")
        assert (result.exit_code, result.stderr, result.stdout) == (1, message + "\n", ""), url
        assert postgres_server.password not in result.stderr and "wrong-pw-123" not in result.stderr


def test_a_newer_schema_is_one_line_through_the_cli(  # type: ignore[no-untyped-def]
    run_cli, postgres_url: str
) -> None:
    assert run_cli("--state", postgres_url, "lock", "status").exit_code == 0
    _exec(postgres_url, "INSERT INTO schema_migrations (name, applied_at) VALUES ('9999_x', 'x')")
    result = run_cli("--state", postgres_url, "audit", "verify")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: postgresql://127.0.0.1:")
    assert "was migrated by a newer castiron (9999_x)" in result.stderr
    assert len(result.stderr.splitlines()) == 1


# -- many writers --------------------------------------------------------------------------------


def test_twenty_concurrent_writers_make_one_chain(  # type: ignore[no-untyped-def]
    run_cli, postgres_url: str, home: Path
) -> None:
    # Twenty connections (one store each, as twenty machines would have) append at once;
    # bench/state_postgres.py does the same with twenty processes.
    key = home / "audit.key"
    with open_postgres(postgres_url, actor="first@host", key_path=key) as store:
        append(store, 1)  # the key exists before the writers start
    stores = [open_postgres(postgres_url, actor=f"w{n}@host", key_path=key) for n in range(20)]
    start = threading.Barrier(len(stores))

    def write(store: Any) -> None:
        start.wait()
        for i in range(10):
            store.mutate(
                AuditDraft("test.write", environment="staging", subject=f"{store.actor}-{i}"),
                lambda tx, i=i: tx.add_event(
                    EventRow(store.clock.now(), "staging", "test", f"{store.actor} {i}")
                ),
            )

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            for future in [pool.submit(write, s) for s in stores]:
                future.result(timeout=120)
    finally:
        for store in stores:
            store.close()
    result = run_cli("--state", postgres_url, "audit", "verify")
    assert (result.exit_code, result.stdout) == (0, "ok: 201 entries\n"), result.stderr
    seqs = _exec(postgres_url, "SELECT seq FROM audit ORDER BY seq")
    assert [s for (s,) in seqs] == list(range(1, 202))
    actors = _exec(postgres_url, "SELECT actor, count(*) FROM audit GROUP BY actor ORDER BY 1")
    assert actors == [("first@host", 1), *sorted((f"w{n}@host", 10) for n in range(20))]


# -- state migrate ---------------------------------------------------------------------------------


def test_state_migrate_moves_history_and_the_chain_verifies(  # type: ignore[no-untyped-def]
    run_cli, postgres_url: str, postgres_server: Any, home: Path
) -> None:
    with open_state(home / "state.db", actor="alice@host") as store:
        append(store, 5)
        append(store, 2, "production")
    assert run_cli("lock", "acquire", "staging", "-m", "maintenance").exit_code == 0
    before = json.loads(run_cli("audit", "--json").stdout)["entries"]
    result = run_cli(
        "state", "migrate", "--from", f"sqlite:{home / 'state.db'}", "--to", postgres_url
    )
    assert result.exit_code == 0, result.stderr
    shown = redact_url(postgres_url)
    assert result.stdout == (
        f"migrated 17 rows (8 audit entries) from sqlite:{home / 'state.db'} to {shown}; "
        "the chain verifies with 9 entries\n"
    )
    assert postgres_server.password not in result.stdout + result.stderr
    after = json.loads(run_cli("--state", postgres_url, "audit", "--json").stdout)["entries"]
    assert after[:-1] == before
    assert after[-1]["action"] == "state.migrate" and after[-1]["to"] == shown
    assert postgres_server.password not in json.dumps(after)
    assert run_cli("--state", postgres_url, "audit", "verify").stdout == "ok: 9 entries\n"
    locks = json.loads(run_cli("--state", postgres_url, "lock", "status", "--json").stdout)
    assert [x["purpose"] for x in locks["locks"]] == ["maintenance"]
    # New events keep counting after the copied ones.
    with open_postgres(postgres_url, actor="bob@host", key_path=home / "audit.key") as store:
        append(store, 1)
        assert [e.id for e in store.events()] == list(range(1, 9))


def test_state_migrate_refuses_a_non_empty_target(  # type: ignore[no-untyped-def]
    run_cli, postgres_url: str, home: Path, tmp_path: Path
) -> None:
    with open_postgres(postgres_url, actor="x@y", key_path=tmp_path / "other.key") as store:
        append(store, 1)
    with open_state(home / "state.db", actor="alice@host") as store:
        append(store, 3)
    result = run_cli(
        "state", "migrate", "--from", f"sqlite:{home / 'state.db'}", "--to", postgres_url
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {redact_url(postgres_url)} already holds castiron state (1 audit, 1 audit_head, "
        "1 events); refusing to migrate into it (use an empty database)\n"
    )
    assert _exec(postgres_url, "SELECT count(*) FROM audit") == [(1,)]
    missing = run_cli("state", "migrate", "--from", "sqlite:nope.db", "--to", postgres_url)
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


# -- transient failures and secrets ----------------------------------------------------------------


def test_a_lost_connection_is_retried_on_a_new_one(postgres_url: str, tmp_path: Path) -> None:
    with open_postgres(postgres_url, actor="a@b", key_path=tmp_path / "audit.key") as store:
        append(store, 1)
        killed = _exec(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'castiron' AND pid <> pg_backend_pid()",
        )
        assert killed == [(True,)]
        append(store, 1)  # the write notices the dead connection, reconnects and runs again
        _exec(
            postgres_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'castiron' AND pid <> pg_backend_pid()",
        )
        assert [e.seq for e in store.audit_entries()] == [1, 2]
        assert store.verify_audit().ok


def test_the_password_is_written_nowhere(  # type: ignore[no-untyped-def]
    run_cli, postgres_server: Any, postgres_url: str, home: Path, tmp_path: Path
) -> None:
    password = postgres_server.password
    assert run_cli("--state", postgres_url, "lock", "acquire", "staging", "-m", "m").exit_code == 0
    outputs = [
        run_cli("--state", postgres_url, *args)
        for args in (("state", "show"), ("lock", "status", "--json"), ("audit", "--json"))
    ]
    assert all(r.exit_code == 0 for r in outputs)
    assert not any(password in r.stdout + r.stderr for r in outputs)
    export = tmp_path / "audit.jsonl"
    assert run_cli("--state", postgres_url, "audit", "export", "-o", str(export)).exit_code == 0
    for path in [*home.rglob("*"), export]:
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    dump = _exec(postgres_url, "SELECT string_agg(t::text, ' ') FROM audit t")[0][0]
    dump += _exec(postgres_url, "SELECT string_agg(t::text, ' ') FROM locks t")[0][0]
    assert password not in dump


def test_the_store_masks_the_password_and_secrets_in_what_it_writes(
    postgres_server: Any, postgres_url: str, tmp_path: Path
) -> None:
    from castiron.redact import Redactor

    password = postgres_server.password
    redactor = Redactor(["s3cret-token-value"])
    bare = postgres_url.replace(f":{password}@", "@")
    for url, given in ((postgres_url, None), (bare, password)):
        with open_postgres(
            url, actor="a@b", key_path=tmp_path / "audit.key", password=given, redactor=redactor
        ) as store:
            assert store.redactor is redactor and password in redactor.values
            said = f"dsn {url} pw {password} token s3cret-token-value"
            store.mutate(
                AuditDraft("test.event", environment="staging", details={"said": said}),
                lambda tx, said=said: tx.add_event(
                    EventRow(store.clock.now(), "staging", "test", said, {"said": said})
                ),
            )
            event = store.events()[-1]
            assert password not in event.message and "s3cret-token-value" not in event.message
            assert "pw *** token ***" in event.message
    dump = _exec(postgres_url, "SELECT string_agg(t::text, ' ') FROM audit t")[0][0]
    dump += _exec(postgres_url, "SELECT string_agg(t::text, ' ') FROM events t")[0][0]
    assert password not in dump and "s3cret-token-value" not in dump


def test_a_malformed_url_never_shows_its_password(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("--state", "postgresql://u:se%ZZcret@127.0.0.1:5/db", "lock", "status")
    assert (result.exit_code, result.stderr) == (
        1,
        "error: the state URL postgresql://u:***@127.0.0.1:5/db is not valid (invalid "
        'percent-encoded token: "***")\n',
    )


def test_api_tokens_live_in_the_team_database(  # type: ignore[no-untyped-def]
    run_cli, postgres_url: str, home: Path, tmp_path: Path
) -> None:
    made = run_cli("--state", postgres_url, "token", "create", "ci", "--role", "deployer")
    assert made.exit_code == 0, made.stderr
    secret = made.stdout.strip()
    # Another machine (another home with the team's audit key, the same database) sees and
    # revokes it.
    (tmp_path / "other").mkdir(mode=0o700)
    key = tmp_path / "other" / "audit.key"
    key.write_bytes((home / "audit.key").read_bytes())
    key.chmod(0o600)
    other = ("--home", str(tmp_path / "other"), "--state", postgres_url)
    listed = json.loads(run_cli(*other, "token", "list", "--json").stdout)
    assert [(t["name"], t["role"], t["revoked"]) for t in listed["tokens"]] == [
        ("ci", "deployer", None)
    ]
    revoked = run_cli(*other, "token", "revoke", "ci")
    assert (revoked.exit_code, revoked.stdout) == (0, "revoked API token ci\n")
    assert json.loads(run_cli("--state", postgres_url, "token", "list", "--json").stdout)["tokens"][
        0
    ]["revoked"]
    stored = _exec(postgres_url, "SELECT name, role, hash FROM api_tokens")
    assert len(stored) == 1 and secret not in repr(stored)
