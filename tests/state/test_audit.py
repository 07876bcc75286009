"""The audit chain: its exact format, and every kind of tampering caught by `audit verify`."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from castiron.errors import AuditError
from castiron.state import audit
from castiron.state.base import AuditDraft
from castiron.state.postgres import open_postgres
from castiron.state.sqlite import CANONICAL_SQL, SqlStateStore, open_state

from .conftest import append

N = 6


@dataclass
class Chain:
    """A CASTIRON_HOME (on either backend) whose chain has N entries, and raw SQL on it."""

    home: Path
    backend: str
    url: str | None

    @property
    def key(self) -> Path:
        return self.home / "audit.key"

    def open(self, actor: str = "alice@host") -> SqlStateStore:
        if self.url is None:
            return open_state(self.home / "state.db", actor=actor)
        return open_postgres(self.url, actor=actor, key_path=self.key)

    def rows(self, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Run ``statement`` (``?`` placeholders) outside castiron; returns its rows."""
        if self.url is None:
            conn = sqlite3.connect(self.home / "state.db")
            try:
                with conn:
                    return conn.execute(statement, params).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as pg:
            cur = pg.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def sql(self, *statements: str, params: tuple[Any, ...] = ()) -> None:
        """Run ``statements`` in one transaction outside castiron (tampering)."""
        if self.url is None:
            conn = sqlite3.connect(self.home / "state.db")
            try:
                with conn:
                    for statement in statements:
                        conn.execute(statement, params)
            finally:
                conn.close()
            return
        import psycopg

        with psycopg.connect(self.url) as pg, pg.transaction():
            for statement in statements:
                pg.execute(statement.replace("?", "%s"), params)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("postgres-halves", marks=pytest.mark.postgres),
    ]
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The state backend under test; ``postgres-halves`` verifies every chain in two halves
    read at once (as PostgreSQL does from PARALLEL_VERIFY_MIN entries on)."""
    if request.param == "postgres-halves":
        monkeypatch.setattr("castiron.state.postgres.PARALLEL_VERIFY_MIN", 2)
        return "postgres"
    return str(request.param)


@pytest.fixture
def chain(
    home: Path, backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Chain:
    """A CASTIRON_HOME whose chain has N entries (the CLI pointed at it)."""
    url = None
    if backend == "postgres":
        url = str(request.getfixturevalue("postgres_url"))
        monkeypatch.setenv("CASTIRON_STATE", url)
    made = Chain(home, backend, url)
    with made.open() as store:
        append(store, N)
    return made


def _sql(chain: Chain, *statements: str, params: tuple[Any, ...] = ()) -> None:
    chain.sql(*statements, params=params)


def _verify(run_cli: Callable[..., Any]) -> tuple[int, int | None, str]:
    result = run_cli("audit", "verify", "--json")
    report = json.loads(result.stdout)
    return result.exit_code, report["bad_seq"], result.stderr


def test_an_untouched_chain_verifies(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("audit", "verify")
    assert (result.exit_code, result.stdout) == (0, f"ok: {N} entries\n")
    as_json = json.loads(run_cli("audit", "verify", "--json").stdout)
    assert as_json["ok"] is True and as_json["entries"] == N and as_json["head"]["seq"] == N


def test_an_empty_store_verifies(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("audit", "verify")
    assert (result.exit_code, result.stdout) == (0, "ok: 0 entries\n")


EDITS = {
    "time": "'2020-01-01T00:00:00.000000Z'",
    "actor": "'mallory@host'",
    "action": "'test.other'",
    "environment": "'production'",
    "subject": "'something-else'",
    "from_value": "'rX'",
    "to_value": "NULL",
    "result": "'failed'",
    "details": """'{"i":2,"text":"changed"}'""",
    "prev": "'" + "a" * 64 + "'",
    "hash": "'" + "b" * 64 + "'",
    "seq": "100",
}


@pytest.mark.parametrize("column", sorted(EDITS))
def test_editing_any_field_is_caught_at_its_seq(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain, column: str
) -> None:
    _sql(chain, f"UPDATE audit SET {column} = {EDITS[column]} WHERE seq = 3")
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, 3)
    assert "error: audit chain does not verify at seq 3" in stderr


def test_deleting_the_last_rows_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    _sql(chain, f"DELETE FROM audit WHERE seq > {N - 2}")
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N - 1)
    assert f"entries {N - 1}..{N} are missing" in stderr


def test_deleting_every_row_and_the_head_is_caught(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain
) -> None:
    _sql(chain, "DELETE FROM audit", "DELETE FROM audit_head")
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, 1)
    assert "audit.head" in stderr


def test_deleting_a_middle_row_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    _sql(chain, "DELETE FROM audit WHERE seq = 3")
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, 3)
    assert "entry 3 is missing" in stderr


def test_reordering_rows_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    _sql(
        chain,
        "UPDATE audit SET seq = -1 WHERE seq = 3",
        "UPDATE audit SET seq = 3 WHERE seq = 4",
        "UPDATE audit SET seq = 4 WHERE seq = -1",
    )
    assert _verify(run_cli)[:2] == (1, 3)


def _rewrite(chain: Chain, change: Callable[[list[Any]], None]) -> None:
    """Rewrite every entry after ``change``, with valid hashes (what a careful forger does)."""
    rows = [
        list(r)
        for r in chain.rows(
            "SELECT seq, time, actor, action, environment, subject, from_value, to_value, result,"
            " details, prev, hash FROM audit ORDER BY seq"
        )
    ]
    change(rows)
    prev = audit.GENESIS
    inserts = []
    for row in rows:
        row[10] = prev
        row[11] = prev = audit.entry_hash(prev, audit.canonical_bytes(tuple(row)))
        inserts.append(row)
    chain.sql("DELETE FROM audit")
    for row in inserts:
        chain.sql(
            "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", params=tuple(row)
        )


def test_a_tail_rewritten_from_a_forged_prev_is_caught_where_it_starts(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain
) -> None:
    """Entries 4..N re-hashed from a prev that is not entry 3's hash: each is consistent with
    its own prev, so only the link from 3 to 4 (the middle, when read in halves) is wrong."""
    rows = [
        list(r)
        for r in chain.rows(
            "SELECT seq, time, actor, action, environment, subject, from_value, to_value, result,"
            " details, prev, hash FROM audit WHERE seq >= 4 ORDER BY seq"
        )
    ]
    prev = "c" * 64
    statements, params = [], []
    for row in rows:
        row[10] = prev
        row[11] = prev = audit.entry_hash(prev, audit.canonical_bytes(tuple(row)))
        statements.append("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?")
        params.append((row[10], row[11], row[0]))
    for statement, values in zip(statements, params, strict=True):
        chain.sql(statement, params=values)
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, 4)
    assert "error: audit chain does not verify at seq 4" in stderr


def _set_actor(rows: list[Any]) -> None:
    rows[1][2] = "mallory@host"


def test_rewriting_the_whole_chain_is_caught_by_the_head(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain
) -> None:
    _rewrite(chain, _set_actor)
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N)
    assert "rewritten" in stderr


def test_rewriting_and_re_signing_with_another_key_is_caught(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain
) -> None:
    _rewrite(chain, _set_actor)
    last_hash = chain.rows("SELECT hash FROM audit WHERE seq = ?", (N,))[0][0]
    forged = audit.AuditKey(chain.home / "x", Ed25519PrivateKey.generate()).sign_head(N, last_hash)
    _sql(
        chain,
        "UPDATE audit_head SET hash = ?, public_key = ?, signature = ?",
        params=(forged.hash, forged.public_key, forged.signature),
    )
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N)
    assert "signed by another key" in stderr


def test_a_forged_signature_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    _sql(chain, "UPDATE audit_head SET signature = ?", params=("00" * 64,))
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N)
    assert "does not verify" in stderr


def test_restoring_an_older_database_is_caught_by_the_head_file(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain
) -> None:
    # The database as it was at seq N: validly signed, but older than the head file.
    (old_head,) = chain.rows("SELECT id, seq, hash, public_key, signature FROM audit_head")
    with chain.open() as store:
        append(store, 2)
    chain.sql(f"DELETE FROM audit WHERE seq > {N}")
    chain.sql(
        "UPDATE audit_head SET seq = ?, hash = ?, public_key = ?, signature = ?",
        params=tuple(old_head[1:]),
    )
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N + 1)
    assert "audit.head" in stderr


def _replace_key(key_path: Path) -> None:
    key_path.unlink()
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.write_bytes(pem)


def test_a_wrong_key_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    _replace_key(chain.key)
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N)
    assert "another key" in stderr


def test_a_missing_key_is_caught(run_cli, chain: Chain) -> None:  # type: ignore[no-untyped-def]
    chain.key.unlink()
    code, seq, stderr = _verify(run_cli)
    assert (code, seq) == (1, N)
    assert "audit.key is missing" in stderr


def test_a_missing_key_is_never_silently_replaced(chain: Chain) -> None:
    chain.key.unlink()
    with chain.open("a@b") as store, pytest.raises(AuditError, match="restore"):
        append(store, 1)
    assert not chain.key.exists()


def test_a_tampered_tail_is_never_signed_over(chain: Chain) -> None:
    _sql(chain, f"UPDATE audit SET actor = 'mallory@host' WHERE seq = {N}")
    with chain.open("a@b") as store:
        with pytest.raises(AuditError, match="refusing to extend"):
            append(store, 1)
        assert len(store.audit_entries()) == N


def test_the_key_is_private(chain: Chain) -> None:
    assert (chain.key.stat().st_mode & 0o777) == 0o600


# -- the format, as an outsider checks it -----------------------------------------------------


def test_an_export_verifies_with_the_documented_formula(  # type: ignore[no-untyped-def]
    run_cli, chain: Chain, tmp_path: Path
) -> None:
    out = tmp_path / "audit.jsonl"
    result = run_cli("audit", "export", "--format", "jsonl", "-o", str(out))
    assert result.exit_code == 0
    prev = "0" * 64
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == N
    for number, line in enumerate(lines, start=1):
        entry = json.loads(line)
        claimed = entry.pop("hash")
        canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert entry["seq"] == number and entry["prev"] == prev
        assert hashlib.sha256(prev.encode("ascii") + canonical.encode("utf-8")).hexdigest() == (
            claimed
        )
        prev = claimed
    head = json.loads((chain.home / "audit.head").read_text(encoding="utf-8"))
    assert (head["seq"], head["hash"]) == (N, prev)


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(
    fields=st.tuples(
        _text,
        _text,
        _text,
        st.none() | _text,
        st.none() | _text,
        st.none() | _text,
        st.none() | _text,
        _text,
    ),
    details=st.dictionaries(_text, st.none() | st.integers() | _text | st.booleans(), max_size=4),
    seq=st.integers(min_value=1, max_value=10**12),
)
def test_hand_assembled_bytes_equal_canonical_json(
    fields: tuple[Any, ...], details: dict[str, Any], seq: int
) -> None:
    time, actor, action, environment, subject, from_, to, result = fields
    row = (
        seq,
        time,
        actor,
        action,
        environment,
        subject,
        from_,
        to,
        result,
        audit.canonical_json(details),
        "0" * 64,
    )
    obj = {
        "seq": seq,
        "time": time,
        "actor": actor,
        "action": action,
        "environment": environment,
        "subject": subject,
        "from": from_,
        "to": to,
        "result": result,
        "details": details,
        "prev": "0" * 64,
    }
    expected = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert audit.canonical_bytes(row) == expected.encode("utf-8")
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(
            "CREATE TABLE audit (seq INTEGER PRIMARY KEY, time TEXT, actor TEXT, action TEXT,"
            " environment TEXT, subject TEXT, from_value TEXT, to_value TEXT, result TEXT,"
            " details TEXT, prev TEXT, hash TEXT) STRICT"
        )
        conn.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '')", row)
        (from_sql,) = conn.execute(f"SELECT {CANONICAL_SQL} FROM audit").fetchone()
    finally:
        conn.close()
    assert from_sql == expected


# -- listing ------------------------------------------------------------------------------------


def test_audit_lists_filters_and_prints_json(  # type: ignore[no-untyped-def]
    run_cli, home: Path
) -> None:
    with open_state(home / "state.db", actor="alice@host") as store:
        append(store, 2, "staging")
        append(store, 1, "production")
        store.mutate(AuditDraft("x.y", environment="production"), lambda tx: None)
    listed = run_cli("audit")
    assert listed.exit_code == 0 and len(listed.stdout.splitlines()) == 4
    assert "alice@host  test.event [staging] event-0 r0 -> r1" in listed.stdout
    only = json.loads(run_cli("audit", "--env", "production", "--json").stdout)
    assert only["count"] == 2 and {e["environment"] for e in only["entries"]} == {"production"}
    assert json.loads(run_cli("audit", "--since", "1h", "--json").stdout)["count"] == 4
    assert json.loads(run_cli("audit", "--since", "2999-01-01", "--json").stdout)["count"] == 0
    bad = run_cli("audit", "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "--since" in bad.stderr
