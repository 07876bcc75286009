"""The PostgreSQL state store: team state behind :class:`castiron.state.base.StateStore`.

Owns the connection (psycopg 3, imported only here), its errors (each connection problem is one
clear :class:`~castiron.errors.StateError` line, with the password never in it), retrying what
is transient, the PostgreSQL form of the named migrations (``migrations/postgres/*.sql``, the
same names as SQLite's, each applied once in its own transaction and recorded in
``schema_migrations``) and how writers are serialized across machines: every
:meth:`~castiron.state.sqlite.SqlStateStore.mutate` holds one transaction-scoped advisory lock,
so audit entries are appended one at a time by any number of writers, without forks or gaps,
exactly as SQLite's single writer does.

Everything else (the SQL of every read and write, row mapping, the audit chain and its signed
head) is shared with SQLite in :class:`~castiron.state.sqlite.SqlStateStore`; the connection
here accepts its ``?`` placeholders.

It knows nothing of the spec, runtimes or the CLI, and never reads the environment: the caller
passes the URL, the password (when it is not in the URL), the actor, the key path and the clock.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from castiron.errors import SchemaTooNewError, StateCorruptError, StateError
from castiron.redact import Redactor
from castiron.state import audit
from castiron.state.base import (
    AuditDraft,
    AuditReport,
    Clock,
    SignedHead,
    StateStore,
    StateTx,
    SystemClock,
    format_time,
)
from castiron.state.sqlite import TABLES, Migration, SqlStateStore, SqlTx, migration_names
from castiron.values import value

T = TypeVar("T")

WRITER_LOCK = 0x63617374
"""The advisory lock every write transaction holds (``cast`` in ASCII, as SQLite's
``application_id``): one writer at a time, on every machine."""

MIGRATION_LOCK = WRITER_LOCK + 1
"""The advisory lock a migration holds, so two first runs do not migrate twice."""

CONNECT_ATTEMPTS = 4
"""Tries to connect (or to run a transaction) before a transient failure is reported."""

_RETRY_PAUSE = 0.25
"""Seconds before the first retry; doubled on each one."""

_TRANSIENT_STATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "57P01",  # admin_shutdown (the server restarts, or the backend was terminated)
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up, shutting down)
        "53300",  # too_many_connections
        "08000",  # connection_exception
        "08003",  # connection_does_not_exist
        "08006",  # connection_failure
    }
)


PARALLEL_VERIFY_MIN = 20_000
"""From this many entries on, ``audit verify`` reads the chain in two halves at once."""

_IN_SEQ_ORDER = (
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off; "
    "SET LOCAL max_parallel_workers_per_gather = 0"
)
"""Read the chain by walking its primary key, whatever the planner's statistics say: on a
table not analysed yet (right after a migration) it would otherwise sort the whole chain,
canonical texts and all, with parallel workers competing with the other half's backend."""

_SNAPSHOT_ID = re.compile(r"[0-9A-Fa-f]+-[0-9A-Fa-f]+(-[0-9A-Fa-f]+)?")


def _in_threads(walks: Sequence[Callable[[], T]]) -> list[T]:
    """Run each call in a thread of its own (the first in this one); their results in order,
    or the first exception raised, once every call has ended."""
    results: list[T | None] = [None] * len(walks)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = walks[i]()
        except BaseException as exc:  # re-raised below, once every walk ended
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, len(walks))]
    for thread in threads:
        thread.start()
    run(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


def _q(column: str) -> str:
    return f"COALESCE(to_json({column})::text, 'null')"


CANONICAL_SQL = (
    "convert_to('{\"action\":' || " + _q("action") + " || ',\"actor\":' || " + _q("actor")
    + " || ',\"details\":' || details || ',\"environment\":' || " + _q("environment")
    + " || ',\"from\":' || " + _q("from_value") + " || ',\"prev\":' || " + _q("prev")
    + " || ',\"result\":' || " + _q("result") + " || ',\"seq\":' || seq::text"
    + " || ',\"subject\":' || " + _q("subject") + " || ',\"time\":' || " + _q("time")
    + " || ',\"to\":' || " + _q("to_value") + " || '}', 'UTF8')"
)  # fmt: skip
"""An audit row's canonical JSON as UTF-8, assembled by PostgreSQL: ``to_json(text)`` escapes
exactly as Python's ``json.dumps(ensure_ascii=False)`` (a test pins the equality)."""

_CANONICAL_TEXT_SQL = CANONICAL_SQL.removeprefix("convert_to(").removesuffix(", 'UTF8')")
"""The same canonical JSON as ``text`` (read as raw bytes on a UTF-8 connection)."""


# --------------------------------------------------------------------------------------------
# locations


def is_postgres_url(text: str) -> bool:
    """True when ``text`` names a PostgreSQL database (``postgresql://`` or ``postgres://``)."""
    return text.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages, logs and audit details).

    A URL that cannot be parsed is reduced to its scheme.
    """
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))
    except ValueError:
        return url.split(":", 1)[0] + "://***"


def url_secrets(url: str, password: str | None = None) -> set[str]:
    """The URL's password (as written and decoded) and the given one: what is never shown."""
    secrets = {password} if password else set()
    with contextlib.suppress(ValueError):
        raw = urlsplit(url).netloc.rpartition("@")[0].partition(":")[2]
        secrets |= {raw, unquote(raw)} if raw else set()
    return secrets


def _scrub(text: str, url: str, password: str | None) -> str:
    """``text`` with any form of the URL's (or the given) password replaced by ``***``: libpq
    quotes parts of a malformed URL back in its messages."""
    for secret in sorted(url_secrets(url, password), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _where(url: str) -> str:
    """``host:port/db`` of ``url`` for messages (no user, no password)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        db = parts.path.lstrip("/")
    except ValueError:
        return "the PostgreSQL server"
    return f"postgresql://{host}{port}/{db}"


# --------------------------------------------------------------------------------------------
# errors


def _first_line(exc: BaseException) -> str:
    """libpq's reason, without its "connection to server at ... failed:" preamble."""
    text = " ".join(str(exc).split())
    if "FATAL:" in text:
        return text.rsplit("FATAL:", 1)[1].strip()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first.rsplit(" failed: ", 1)[-1].strip()


def _refused(exc: BaseException) -> bool:
    """True when nothing listens where the URL points (the server is down or restarting)."""
    text = str(exc)
    return "Connection refused" in text or "No such file or directory" in text


def _connect_error(url: str, exc: psycopg.Error, tls: bool) -> StateError:
    """The one line for a connection that could not be made (the password never in it).

    libpq reports connection failures without a SQLSTATE: its message is all there is to go
    by, so this is the one place that reads it.
    """
    where = _where(url)
    reason = _first_line(exc)
    lowered = reason.lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return StateError(
            f"{where}: password authentication failed for the state database "
            "(check the password in its URL or the state password variable)"
        )
    if "does not exist" in lowered and "database" in lowered:
        return StateError(f"{where}: the database does not exist (create it first)")
    if "no encryption" in lowered and not tls:
        return StateError(
            f"{where}: the server requires TLS; add sslmode=require (or verify-full) to the URL"
        )
    if "does not support ssl" in lowered:
        return StateError(f"{where}: TLS was required (sslmode) but the server does not offer it")
    if _refused(exc):
        return StateError(
            f"{where}: no PostgreSQL server answers there (connection refused; is it running?)"
        )
    if "pg_hba.conf" in lowered:
        return StateError(f"{where}: the server refused the connection ({reason})")
    return StateError(f"{where}: cannot connect to the state database ({reason})")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        return state is None or state in _TRANSIENT_STATES
    return isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected)


@contextlib.contextmanager
def _pg_errors(url: str) -> Iterator[None]:
    """Turn psycopg errors into castiron's; constraint violations stay (they are bugs)."""
    try:
        yield
    except pg_errors.LockNotAvailable as exc:
        raise StateError(
            f"{_where(url)}: the state database is busy (another castiron held the write "
            "lock too long); try again"
        ) from exc
    except psycopg.OperationalError as exc:
        raise StateError(f"{_where(url)}: {_first_line(exc)}") from exc
    except psycopg.DatabaseError as exc:
        if isinstance(exc, psycopg.IntegrityError):
            raise
        raise StateError(f"{_where(url)}: {_first_line(exc)}") from exc
    except psycopg.InterfaceError as exc:
        raise StateError(f"{_where(url)}: the connection is unusable ({exc})") from exc


# --------------------------------------------------------------------------------------------
# the connection


@functools.lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Cursor:
    """A psycopg cursor as the shared SQL reads it."""

    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def description(self) -> Any:
        return self._cursor.description

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def fetchmany(self, size: int = 0, /) -> list[Any]:
        return self._cursor.fetchmany(size)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)


class PostgresConnection:
    """A psycopg connection (autocommit; transactions are explicit ``BEGIN``/``COMMIT``)
    that runs the shared SQL, and remembers whether the last statement was a ``COMMIT``
    (a connection lost then leaves the outcome unknown: that is never retried)."""

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self.committing = False

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        self.committing = sql == "COMMIT"
        return _Cursor(self.raw.execute(_placeholders(sql), tuple(parameters)))

    def executemany(self, sql: str, parameters: Any, /) -> _Cursor:
        self.committing = False
        cursor = self.raw.cursor()
        cursor.executemany(_placeholders(sql), list(parameters))
        return _Cursor(cursor)

    def close(self) -> None:
        self.raw.close()

    @property
    def in_transaction(self) -> bool:
        return self.raw.info.transaction_status in (
            TransactionStatus.INTRANS,
            TransactionStatus.INERROR,
            TransactionStatus.ACTIVE,
        )

    @property
    def broken(self) -> bool:
        return self.raw.broken or self.raw.closed


def _connect(
    url: str, password: str | None, connect_timeout: float, lock_timeout: float
) -> PostgresConnection:
    """Connect, retrying what is transient (the server starting, too many connections).

    Raises:
        StateError: naming the problem in one line.
    """
    extra: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(1, int(connect_timeout)),
        "application_name": "castiron",
    }
    if password is not None:
        extra["password"] = password
    tls = "sslmode=require" in url or "sslmode=verify" in url
    pause = _RETRY_PAUSE
    for attempt in range(CONNECT_ATTEMPTS):
        try:
            raw = psycopg.connect(url, **extra)
            break
        except psycopg.ProgrammingError as exc:  # a malformed URL or option
            reason = _scrub(_first_line(exc), url, password)
            raise StateError(f"the state URL {redact_url(url)} is not valid ({reason})") from None
        except psycopg.Error as exc:
            state = getattr(exc, "sqlstate", None)
            busy = state in ("57P03", "53300") or _refused(exc)
            if attempt + 1 < CONNECT_ATTEMPTS and busy:
                time.sleep(pause)
                pause *= 2
                continue
            error = _connect_error(url, exc, tls)
            raise StateError(_scrub(error.message, url, password)) from None
    else:  # pragma: no cover - the loop breaks or raises
        raise AssertionError("unreachable")
    try:
        with _pg_errors(url):
            # Times are text in UTC; the session's zone never matters, its waits do.
            raw.execute(f"SET lock_timeout = '{int(lock_timeout * 1000)}ms'")
    except BaseException:
        raw.close()
        raise
    return PostgresConnection(raw)


# --------------------------------------------------------------------------------------------
# migrations


def migrations() -> list[Migration]:
    """The PostgreSQL migrations, in order (the same names as SQLite's)."""
    folder = resources.files("castiron.state.migrations").joinpath("postgres")
    found = [
        Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.name)


def _applied(conn: PostgresConnection) -> list[str] | None:
    """Applied migration names, or None when the database holds no castiron schema."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return None
    return [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")]


def _check_version(conn: PostgresConnection, url: str, known: list[str]) -> list[str]:
    where = _where(url)
    applied = _applied(conn)
    if applied is None:
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchone()[0]
        if tables:
            raise StateCorruptError(
                f"{where} holds {tables} table(s) but no castiron schema; refusing to use it "
                "(give castiron its own database)"
            )
        return []
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise SchemaTooNewError(
            f"{where} was migrated by a newer castiron ({', '.join(unknown)}); this one knows "
            f"{len(known)} migration(s): upgrade castiron, the database was left untouched"
        )
    if applied != known[: len(applied)]:
        raise StateCorruptError(
            f"{where}: schema_migrations lists {applied}, which is not a prefix of {known}"
        )
    return applied


def _migrate(conn: PostgresConnection, url: str) -> None:
    known = migration_names()
    if _check_version(conn, url, known) == known:
        return
    plan = migrations()
    if [m.name for m in plan] != known:  # pragma: no cover - a packaging mistake
        raise StateError(f"PostgreSQL migrations {[m.name for m in plan]} differ from {known}")
    for migration in plan:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            # Another process may have migrated while we waited for the lock.
            applied = _check_version(conn, url, known)
            if migration.name in applied:
                conn.execute("ROLLBACK")
                continue
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY,"
                " applied_at TEXT NOT NULL, rowid BIGINT GENERATED ALWAYS AS IDENTITY)"
            )
            conn.raw.execute(migration.sql)  # several statements, no parameters
            conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                (migration.name, format_time(SystemClock().now())),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# --------------------------------------------------------------------------------------------
# the store


class PostgresTx(SqlTx):
    """:class:`~castiron.state.sqlite.SqlTx` on PostgreSQL."""

    integrity_errors = (psycopg.IntegrityError,)

    def copy_rows(self, table: str, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` into ``table`` verbatim (``state migrate``'s bulk copy).

        Raises:
            ValueError: when ``table`` is not a state table or a column name is odd.
        """
        if table not in TABLES or not all(c.isidentifier() for c in columns):
            raise ValueError(f"cannot copy into {table!r} ({columns})")
        if rows:
            marks = ", ".join("?" for _ in columns)
            self._db().executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
            )

    def count_rows(self) -> dict[str, int]:
        """How many rows each state table holds, as of this transaction."""
        db = self._db()
        return {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}

    def restart_identities(self) -> None:
        """Move each identity column past the largest copied value."""
        db = self._db()
        for table, column in (("events", "id"), ("gate_results", "id"), ("deployments", "rowid")):
            db.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                f" COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
            )


@value
class Migrated:
    """What ``state migrate`` moved."""

    rows: dict[str, int]
    """Rows copied per table."""
    entries: int
    """Audit entries copied (the chain then gains one: ``state.migrate``)."""


def import_state(source: SqlStateStore, source_name: str, target: PostgresStateStore) -> Migrated:
    """Copy every row of ``source`` into the empty ``target`` and append a ``state.migrate``
    audit entry, all in one transaction: the copied chain continues, signed with the same key.

    Raises:
        StateError: when the target already holds state, or the source chain does not verify.
        AuditError: when the target's key is not the one that signed the source chain.
    """
    report = source.verify_audit()
    if not report.ok:
        raise StateError(
            f"{source_name}: the audit chain does not verify ({report.reason}); refusing to "
            "migrate it"
        )
    tables = {table: source.dump(table) for table in TABLES}
    counts = {table: len(rows) for table, (_, rows) in tables.items()}

    def apply(tx: StateTx) -> None:
        if not isinstance(tx, PostgresTx):  # pragma: no cover - mutate made it
            raise TypeError("state migrate needs the PostgreSQL transaction")
        held = {t: n for t, n in tx.count_rows().items() if n}
        if held:
            summary = ", ".join(f"{n} {t}" for t, n in sorted(held.items()))
            raise StateError(
                f"{target.location} already holds castiron state ({summary}); refusing to "
                "migrate into it (use an empty database)"
            )
        for table, (columns, rows) in tables.items():
            tx.copy_rows(table, columns, rows)
        tx.restart_identities()

    draft = AuditDraft(
        "state.migrate",
        from_=source_name,
        to=target.location,
        details={"entries": report.entries, "rows": counts},
    )
    target.mutate(draft, apply)
    return Migrated(counts, report.entries)


class PostgresStateStore(SqlStateStore):
    """State in a PostgreSQL database, shared by every machine that deploys."""

    _CANONICAL = CANONICAL_SQL
    _BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"

    def __init__(
        self,
        conn: PostgresConnection,
        url: str,
        reconnect: Callable[[], PostgresConnection],
        actor: str,
        key_path: Path,
        clock: Clock,
        redactor: Redactor | None = None,
    ) -> None:
        self._url = url
        self._reconnect = reconnect
        self._pg = conn
        super().__init__(conn, actor, key_path, clock, redactor)
        # The DSN's password is a secret like any other: masked in every text written.
        self._redactor.add(url_secrets(url))

    @property
    def location(self) -> str:
        """The database's URL without its password."""
        return redact_url(self._url)

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _pg_errors(self._url)

    def _begin_write(self) -> None:
        # One round trip: without parameters, psycopg sends both in one simple query.
        self._pg.committing = False
        self._pg.raw.execute(f"BEGIN; SELECT pg_advisory_xact_lock({int(WRITER_LOCK)})")

    def _new_tx(self) -> PostgresTx:
        return PostgresTx(self._conn, Path(), self._clock, self._redactor)

    def _renew(self) -> None:
        """Replace a broken connection with a new one."""
        with contextlib.suppress(psycopg.Error):
            self._pg.close()
        self._pg = self._reconnect()
        self._conn = self._pg

    def _retrying(self, run: Callable[[], T], *, writes: bool) -> T:
        """Run ``run``; on a transient failure reconnect (when the connection broke) and run
        it again, unless it failed while committing (its outcome is then unknown)."""
        pause = _RETRY_PAUSE
        for attempt in range(CONNECT_ATTEMPTS):
            try:
                return run()
            except StateError as exc:
                cause = exc.__cause__
                last = attempt + 1 == CONNECT_ATTEMPTS
                if last or cause is None or not (_transient(cause) or self._pg.broken):
                    raise
                if writes and self._pg.committing and self._pg.broken:
                    raise StateError(
                        f"{self.location}: the connection was lost while committing; the "
                        "change may or may not be recorded (check `castiron status`)"
                    ) from cause
                time.sleep(pause)
                pause *= 2
                if self._pg.broken:
                    self._renew()
        raise AssertionError("unreachable")  # pragma: no cover

    def mutate(self, draft: AuditDraft, apply: Callable[[StateTx], T]) -> T:
        """Run ``apply`` and append ``draft``'s audit entry in one transaction, holding the
        writers' advisory lock; retried on a lost connection, a deadlock or a serialization
        failure (``apply`` then runs again, in the new transaction).

        Raises:
            StateError: when the database cannot be written.
            AuditError: when the chain's tail does not match its signed head, or the key is
                missing or is not the one that signed the chain.
        """
        with self._lock:
            return self._retrying(lambda: super(PostgresStateStore, self).mutate(draft, apply),
                                  writes=True)  # fmt: skip

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._retrying(lambda: super(PostgresStateStore, self)._all(sql, params),
                                  writes=False)  # fmt: skip

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._retrying(lambda: super(PostgresStateStore, self)._one(sql, params),
                                  writes=False)  # fmt: skip

    def audit_links(self) -> Iterator[audit.ChainLink]:
        """(seq, prev, hash, canonical JSON bytes) of every entry in seq order.

        Streamed with ``COPY ... TO STDOUT (FORMAT BINARY)``: each row is handed to the caller
        (who hashes it) as it arrives, so the client's hashing overlaps the server assembling
        the next rows, instead of waiting for the whole result first. On a UTF-8 connection
        (psycopg's default) the canonical text is read as its raw bytes, which are its UTF-8
        encoding, sparing the server a ``convert_to`` per row.
        """
        with self._lock, self._errors():
            yield from self._links(self._pg, "TRUE")

    def verify_audit(self) -> AuditReport:
        """Verify the chain, the database head and the head file against the key.

        A long chain is read in two halves at once, over two connections sharing one exported
        snapshot: the server assembles each entry's canonical text, the slow part, on two
        backends, while this process hashes whichever half has rows waiting. The verdict is
        the one a single pass gives (see :func:`castiron.state.audit.verify_chain_parts`).

        Raises:
            AuditError: when the key file exists but is not a readable ed25519 key.
            StateError: when the database cannot be read.
        """
        self._flush_head()
        with self._lock, self._errors():
            self._pg.execute(self._BEGIN_SNAPSHOT)  # one snapshot of rows and head
            try:
                self._pg.execute(_IN_SEQ_ORDER)
                head = self._read_head()
                low, high, count = self._pg.execute(
                    "SELECT min(seq), max(seq), count(*) FROM audit"
                ).fetchone()
                if count < PARALLEL_VERIFY_MIN or low != 1 or high != count:
                    links = self._links(self._pg, "TRUE")  # short, or damaged: one pass
                    return audit.verify_chain(links, head, self._key_path, self._head_path)
                return self._verify_halves(head, count // 2 + 1)
            finally:
                self._pg.execute("COMMIT")

    def _verify_halves(self, head: SignedHead | None, middle: int) -> AuditReport:
        (snapshot,) = self._pg.execute("SELECT pg_export_snapshot()").fetchone()
        if not _SNAPSHOT_ID.fullmatch(str(snapshot)):
            raise StateError(f"{self.location}: unexpected snapshot id {snapshot!r}")
        other = self._reconnect()
        try:
            other.execute(self._BEGIN_SNAPSHOT)
            other.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
            other.execute(_IN_SEQ_ORDER)
            parts = [
                (1, self._links(self._pg, f"seq < {int(middle)}")),
                (middle, self._links(other, f"seq >= {int(middle)}")),
            ]
            return audit.verify_chain_parts(
                parts, head, self._key_path, self._head_path, run=_in_threads
            )
        finally:
            with contextlib.suppress(psycopg.Error):
                other.close()

    @staticmethod
    def _links(conn: PostgresConnection, where: str) -> Iterator[audit.ChainLink]:
        raw = conn.raw
        canonical = _CANONICAL_TEXT_SQL if raw.info.encoding == "utf-8" else CANONICAL_SQL
        query = (
            f"COPY (SELECT seq, prev, hash, {canonical} FROM audit WHERE {where} ORDER BY seq) "
            "TO STDOUT (FORMAT BINARY)"
        )
        with raw.cursor().copy(query) as copy:
            copy.set_types(["int8", "text", "text", "bytea"])
            yield from copy.rows()

    def renew_lease(self, environment: str, token: str, expires: datetime) -> bool:
        """The heartbeat (see :meth:`SqlStateStore.renew_lease`), retried like a read: it is
        one idempotent ``UPDATE`` in its own transaction."""
        with self._lock:
            return self._retrying(
                lambda: super(PostgresStateStore, self).renew_lease(environment, token, expires),
                writes=False,
            )

    def close(self) -> None:
        """Record the newest signed head in the head file, then close the connection."""
        with self._lock:
            try:
                self._flush_head()
            finally:
                with contextlib.suppress(psycopg.Error):
                    self._pg.close()


def open_postgres(
    url: str,
    *,
    actor: str,
    key_path: Path,
    clock: Clock | None = None,
    password: str | None = None,
    connect_timeout: float = 10.0,
    lock_timeout: float = 30.0,
    redactor: Redactor | None = None,
) -> PostgresStateStore:
    """Open the state store in the PostgreSQL database ``url``, migrating it when needed.

    ``password`` is used when the URL has none (it is never stored or shown). The audit key
    at ``key_path`` must be the team's one key: every machine signs the same chain. The store
    masks the values of ``redactor`` and the password (URL's or given) in every text it
    writes (the password is added to ``redactor``).

    Raises:
        StateError: when the server cannot be reached or refuses (one line naming why).
        StateCorruptError: when the database holds other tables but no castiron schema.
        SchemaTooNewError: when it was migrated by a newer castiron.
    """
    if not is_postgres_url(url):
        raise StateError(f"not a PostgreSQL URL: {redact_url(url)}")

    def connect() -> PostgresConnection:
        return _connect(url, password, connect_timeout, lock_timeout)

    conn = connect()
    try:
        with _pg_errors(url):
            _migrate(conn, url)
    except BaseException:
        conn.close()
        raise
    mask = redactor if redactor is not None else Redactor()
    mask.add(url_secrets(url, password))
    return PostgresStateStore(
        conn, url, connect, actor, key_path, clock if clock is not None else SystemClock(), mask
    )


__all__ = [
    "CANONICAL_SQL",
    "Migrated",
    "PostgresStateStore",
    "PostgresTx",
    "import_state",
    "is_postgres_url",
    "migrations",
    "open_postgres",
    "redact_url",
    "url_secrets",
]


def _conforms(store: PostgresStateStore) -> StateStore:
    return store  # mypy checks here that PostgresStateStore satisfies the StateStore protocol
