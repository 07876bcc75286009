"""The SQLite state store: the embedded default behind :class:`castiron.state.base.StateStore`.

Owns the database file (WAL, foreign keys, busy timeout), opening it safely (a missing file is
created atomically; a corrupt, foreign or newer file is refused and never touched), the named
migrations in ``migrations/*.sql`` recorded in ``schema_migrations``, and the SQL behind every
typed read and write. Every write happens inside :meth:`SqliteStateStore.mutate`, in the same
transaction as its audit entry and the newly signed head.

The SQL of every read and write, the row mapping and the audit chain's append are written once,
in :class:`SqlTx` and :class:`SqlStateStore`, and shared with the PostgreSQL store
(:mod:`castiron.state.postgres`); :class:`SqliteTx` and :class:`SqliteStateStore` add only what
is SQLite's (its errors, ``BEGIN IMMEDIATE``, ``json_quote`` for verification, pragmas).

It knows nothing of the spec, runtimes, or the CLI, and never reads the environment: the
caller passes the path, the actor, the key path and the clock.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from castiron.errors import (
    AuditError,
    NotFoundError,
    SchemaTooNewError,
    StateCorruptError,
    StateError,
    TagConflictError,
    UsageError,
)
from castiron.filemodes import make_private_dir, open_private, restrict
from castiron.model import Digest, Identity, IdentityKind, ReleaseId
from castiron.redact import Redactor
from castiron.settings import Settings
from castiron.state import audit
from castiron.state.base import (
    ApprovalRow,
    AuditDraft,
    AuditEntry,
    AuditReport,
    Clock,
    DeploymentOutcome,
    DeploymentRow,
    EnvironmentRow,
    EventRow,
    GateResultRow,
    ImageRow,
    InstanceRow,
    JsonObject,
    Lease,
    ReleaseRow,
    SignedHead,
    StateStore,
    StateTx,
    StepRow,
    SystemClock,
    TagRow,
    TokenRow,
    format_time,
    parse_time,
)
from castiron.values import value

T = TypeVar("T")

APPLICATION_ID = 0x63617374
"""``PRAGMA application_id`` of a castiron database (``cast`` in ASCII)."""

_SQLITE_MAGIC = b"SQLite format 3\x00"
_AUDIT_COLUMNS = (
    "seq, time, actor, action, environment, subject, from_value, to_value, result, details, "
    "prev, hash"
)


CANONICAL_SQL = (
    "'{\"action\":' || json_quote(action) || ',\"actor\":' || json_quote(actor)"
    " || ',\"details\":' || details || ',\"environment\":' || json_quote(environment)"
    " || ',\"from\":' || json_quote(from_value) || ',\"prev\":' || json_quote(prev)"
    " || ',\"result\":' || json_quote(result) || ',\"seq\":' || seq"
    " || ',\"subject\":' || json_quote(subject) || ',\"time\":' || json_quote(time)"
    " || ',\"to\":' || json_quote(to_value) || '}'"
)
"""An audit row's canonical JSON, assembled by SQLite (its ``json_quote`` escapes exactly as
Python's ``json.dumps(ensure_ascii=False)``; a test pins the equality)."""


@value
class Migration:
    """One named schema change, applied once, in one transaction."""

    name: str
    sql: str


_MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def migrations() -> list[Migration]:
    """Every migration shipped with this castiron, in the order they apply (by file name)."""
    if _MIGRATIONS_DIR.is_dir():
        found = [
            Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
            for entry in _MIGRATIONS_DIR.iterdir()
            if entry.name.endswith(".sql")
        ]
    else:  # installed in a form without plain files (a zip): ask importlib
        from importlib import resources

        folder = resources.files("castiron.state.migrations")
        found = [
            Migration(entry.name.removesuffix(".sql"), entry.read_text(encoding="utf-8"))
            for entry in folder.iterdir()
            if entry.name.endswith(".sql")
        ]
    return sorted(found, key=lambda m: m.name)


def migration_names() -> list[str]:
    """The names of :func:`migrations`, in order, without reading their SQL (opening a
    store only compares names; the SQL is read when one must be applied)."""
    if _MIGRATIONS_DIR.is_dir():
        return sorted(
            name.removesuffix(".sql")
            for name in os.listdir(_MIGRATIONS_DIR)
            if name.endswith(".sql")
        )
    return [m.name for m in migrations()]


def _statements(sql: str) -> Iterator[str]:
    """Split a migration into statements (comments travel with the statement they precede)."""
    buffer = ""
    for line in sql.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    leftover = [ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise StateError(f"a migration ends with an incomplete statement: {leftover[0][:60]}")


def _json(value: JsonObject | None) -> str:
    return audit.canonical_json(dict(value or {}))


_IDENTITY_KINDS: dict[str, IdentityKind] = {"key": "key", "os_user": "os_user", "token": "token"}


def _identity(kind: str, ident: str) -> Identity | None:
    known = _IDENTITY_KINDS.get(kind)
    return None if known is None else Identity(known, ident)


def _time(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def _ptime(value: str | None) -> datetime | None:
    return None if value is None else parse_time(value)


_BUSY_CODES = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_SNAPSHOT"})
"""SQLite result codes meaning another connection holds a lock (past the busy timeout)."""


def _disk_full(path: Path) -> bool:
    """True when the filesystem holding ``path`` has (almost) no space left for us."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


@contextlib.contextmanager
def _db_errors(path: Path) -> Iterator[None]:
    """Turn sqlite3 errors into castiron's: busy/locked/IO are StateError, damage is corrupt."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "malformed" in text or "not a database" in text:
            raise StateCorruptError(f"{path}: the database is damaged ({text})") from exc
        name = str(getattr(exc, "sqlite_errorname", ""))
        if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and _disk_full(path)):
            raise StateError(
                f"{path}: the disk holding it is full ({text}); free some space on it (`df -h "
                f"{path.parent}`) and run the command again. An interrupted deployment is "
                "recovered by the next command"
            ) from exc
        if name in _BUSY_CODES:
            raise StateError(
                f"{path}: another process holds the state store's write lock ({text} after "
                "waiting for it); run the command again once that process has finished (`fuser "
                f"{path}` names it). An interrupted deployment is recovered by the next command"
            ) from exc
        raise StateError(f"{path}: {text}") from exc
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.IntegrityError):
            raise
        raise StateCorruptError(f"{path}: the database is damaged ({exc})") from exc


# --------------------------------------------------------------------------------------------
# opening


def open_state(
    target: Settings | Path,
    *,
    actor: str | None = None,
    key_path: Path | None = None,
    clock: Clock | None = None,
    busy_timeout: float = 10.0,
    redactor: Redactor | None = None,
) -> SqliteStateStore:
    """Open (creating when missing) the state store of ``target``.

    ``target`` is the settings (their ``state_path``, ``audit_key_path`` and ``actor`` are used)
    or a database path (then the key lives beside it as ``audit.key``). Explicit keyword
    arguments win over the settings. The store masks the values of ``redactor`` (default:
    the settings' one) in every text it writes.

    Raises:
        StateCorruptError: when the file is not SQLite, is truncated or is not castiron's.
        SchemaTooNewError: when it was migrated by a newer castiron.
        StateError: when it cannot be created or opened.
    """
    if isinstance(target, Settings):
        path = target.state_path
        key = key_path if key_path is not None else target.audit_key_path
        who = actor if actor is not None else target.actor
        redactor = redactor if redactor is not None else target.redactor
    else:
        path = target
        key = key_path if key_path is not None else path.with_name("audit.key")
        who = actor if actor is not None else "unknown@unknown"
    conn = _connect(path, busy_timeout)
    return SqliteStateStore(
        conn,
        path,
        who,
        key,
        clock if clock is not None else SystemClock(),
        redactor if redactor is not None else Redactor(),
    )


_LIVE_LOCK = threading.Lock()
_LIVE: dict[tuple[int, int], int] = {}
"""Open connections of this process per database file (device, inode). POSIX record locks
belong to the process, and closing *any* descriptor of a file drops all of them: reading the
header of a file this process already has a connection to would silently unlock that
connection, and another process could then checkpoint and delete the WAL under it. A file
with a live connection here was checked when that connection opened, so it is not read again.
A long-running process (``castiron serve``) holds several connections at once."""


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _forget_connection(key: tuple[int, int] | None) -> None:
    if key is None:
        return
    with _LIVE_LOCK:
        left = _LIVE.get(key, 0) - 1
        if left > 0:
            _LIVE[key] = left
        else:
            _LIVE.pop(key, None)


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    try:
        if not path.exists():
            _create(path)
        _make_private(path)
    except PermissionError as exc:
        raise StateError(
            f"permission denied: {exc.filename or path} (a castiron home is private to the "
            "user who created it)"
        ) from exc
    with _LIVE_LOCK:
        key = _file_key(path)
        if key is None or key not in _LIVE:
            _check_header(path)
            key = _file_key(path)
        if key is not None:
            _LIVE[key] = _LIVE.get(key, 0) + 1
    try:
        return _open_connection(path, busy_timeout)
    except BaseException:
        _forget_connection(key)
        raise


def _open_connection(path: Path, busy_timeout: float) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(
            f"file:{path}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout,
        )
    except sqlite3.Error as exc:
        raise StateError(f"cannot open the state database {path}: {exc}") from exc
    try:
        with _db_errors(path):
            # Read-only checks first: a refused file must be left exactly as it was.
            _check_identity(conn, path)
            known = migration_names()
            applied = _check_version(conn, path, known)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # WAL + NORMAL: a commit is durable against the process dying (kill -9) at any
            # point; only an OS crash or power loss may lose the last commits (never corrupt
            # the file). FULL would fsync the WAL on every commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            if applied != known:
                _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _make_private(path: Path) -> None:
    """The home 0700; the database, its WAL and shared memory 0600 (SQLite gives the WAL and
    shm files the database file's mode when it creates them)."""
    try:
        restrict(path.parent, 0o700)
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            restrict(path.with_name(name))
    except PermissionError:
        raise
    except OSError as exc:
        raise StateError(f"cannot set the mode of the state files in {path.parent}: {exc}") from exc


def _create(path: Path) -> None:
    home = path.parent
    try:
        make_private_dir(home)
        tmp = home / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # Created 0600 before SQLite opens it: SQLite would make it 0666 minus the umask.
        os.close(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            _migrate(conn, path)
        finally:
            conn.close()
        try:
            os.link(tmp, path)  # never replaces a file another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    except PermissionError:
        raise
    except OSError as exc:
        raise StateError(f"cannot create the state database {path}: {exc.strerror}") from exc
    except sqlite3.Error as exc:
        raise StateError(f"cannot create the state database {path}: {exc}") from exc


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
            size = os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise StateError(f"cannot read the state database {path}: {exc.strerror}") from exc
    if not header:
        raise StateCorruptError(f"{path} is empty, not a castiron database")
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise StateCorruptError(f"{path} is not a SQLite database")
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    change_counter, pages = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if valid_for == change_counter and size < pages * page_size:
        raise StateCorruptError(
            f"{path} is truncated: {size} bytes, its header says {pages * page_size}"
        )
    if size % page_size:
        raise StateCorruptError(f"{path} is truncated: {size} bytes is not whole pages")


def _check_identity(conn: sqlite3.Connection, path: Path) -> None:
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != APPLICATION_ID:
        raise StateCorruptError(
            f"{path} is a SQLite database but not castiron's (application_id {app_id})"
        )


def _applied(conn: sqlite3.Connection, path: Path) -> list[str]:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if not exists:
        return []
    return [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY rowid")]


def _check_version(conn: sqlite3.Connection, path: Path, known: list[str]) -> list[str]:
    applied = _applied(conn, path)
    unknown = [name for name in applied if name not in known]
    (user_version,) = conn.execute("PRAGMA user_version").fetchone()
    if unknown or user_version > len(known):
        names = ", ".join(unknown) if unknown else f"schema version {user_version}"
        raise SchemaTooNewError(
            f"{path} was migrated by a newer castiron ({names}); this one knows "
            f"{len(known)} migration(s): upgrade castiron, the file was left untouched"
        )
    if applied != known[: len(applied)]:
        raise StateCorruptError(
            f"{path}: schema_migrations lists {applied}, which is not a prefix of {known}"
        )
    audit_table = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'"
    if applied and not conn.execute(audit_table).fetchone():
        raise StateCorruptError(f"{path}: the audit table is missing")
    return applied


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    plan = migrations()
    known = [m.name for m in plan]
    applied = _check_version(conn, path, known)
    for index, migration in enumerate(plan):
        if migration.name in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the write lock.
            applied = _check_version(conn, path, known)
            if migration.name in applied:
                conn.execute("ROLLBACK")
                continue
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL) STRICT"
            )
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                (migration.name, format_time(SystemClock().now())),
            )
            conn.execute(f"PRAGMA user_version={index + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _narrowed(sql: str, *conditions: tuple[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """``sql`` (ending in ``WHERE 1 = 1``) with ``AND condition`` for each (condition, value)
    whose value is not None, and the parameters that go with them, in order."""
    params: list[Any] = []
    for condition, param in conditions:
        if param is not None:
            sql += f" AND {condition}"
            params.append(param)
    return sql, tuple(params)


# --------------------------------------------------------------------------------------------
# rows


def _image(r: Any) -> ImageRow:
    return ImageRow(Digest(r[0]), r[1], parse_time(r[2]), r[3], json.loads(r[4]))


def _environment(r: Any) -> EnvironmentRow:
    return EnvironmentRow(
        r[0],
        r[1],
        r[2],
        json.loads(r[3]),
        None if r[4] is None else ReleaseId(r[4]),
        None if r[5] is None else ReleaseId(r[5]),
        _ptime(r[6]),
    )


def _release(r: Any) -> ReleaseRow:
    return ReleaseRow(ReleaseId(r[0]), r[1], Digest(r[2]), json.loads(r[3]), parse_time(r[4]))


def _deployment(r: Any) -> DeploymentRow:
    return DeploymentRow(
        id=r[0],
        environment=r[1],
        from_release=None if r[2] is None else ReleaseId(r[2]),
        to_release=ReleaseId(r[3]),
        strategy=r[4],
        actor=r[5],
        started=parse_time(r[6]),
        finished=_ptime(r[7]),
        outcome=r[8],
        details=json.loads(r[9]),
        git_commit=r[10],
    )


def _instance(r: Any) -> InstanceRow:
    return InstanceRow(r[0], r[1], ReleaseId(r[2]), r[3], r[4], r[5], json.loads(r[6]))


def _lease(r: Any) -> Lease:
    return Lease(r[0], r[1], r[2], r[3], r[4], r[5], r[6], parse_time(r[7]), parse_time(r[8]))


def _token(r: Any) -> TokenRow:
    return TokenRow(r[0], r[1], r[2], parse_time(r[3]), r[4], _ptime(r[5]))


_TOKEN_COLUMNS = "name, role, hash, created, created_by, revoked"
_LEASE_COLUMNS = "environment, token, holder, pid, host, purpose, kind, acquired, expires"
_DEPLOYMENT_COLUMNS = (
    "id, environment, from_release, to_release, strategy, actor, started, finished, outcome, "
    "details, git_commit"
)


TABLES = {
    "images": "created, digest",
    "tags": "tag",
    "releases": "created, id",
    "environments": "name",
    "deployments": "rowid",
    "deployment_steps": "deployment_id, seq",
    "instances": "id",
    "events": "id",
    "locks": "environment",
    "approvals": "environment, release, actor, identity_kind, identity",
    "gate_results": "id",
    "api_tokens": "name",
    "audit": "seq",
    "audit_head": "id",
}
"""Every table of castiron's state (not ``schema_migrations``), in an order that satisfies its
foreign keys, with the order its rows were written in."""


# --------------------------------------------------------------------------------------------
# the transaction


class SqlCursor(Protocol):
    """What the shared SQL needs of a cursor (sqlite3's, or the PostgreSQL store's)."""

    @property
    def rowcount(self) -> int: ...
    @property
    def description(self) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int = ..., /) -> list[Any]: ...


class SqlConnection(Protocol):
    """What the shared SQL needs of a connection: ``?`` placeholders, DB-API cursors."""

    def execute(self, sql: str, parameters: Any = ..., /) -> SqlCursor: ...
    def executemany(self, sql: str, parameters: Any, /) -> SqlCursor: ...
    def close(self) -> None: ...

    @property
    def in_transaction(self) -> bool: ...


class SqlTx:
    """Writes inside one :meth:`SqlStateStore.mutate`; dead once it returns.

    Its SQL runs unchanged on SQLite and PostgreSQL (``?`` placeholders; the PostgreSQL store's
    connection translates them): the backends differ only in :attr:`integrity_errors`.
    """

    integrity_errors: tuple[type[Exception], ...] = ()
    """The driver's constraint-violation errors (a missing referenced row)."""

    def __init__(self, conn: SqlConnection, path: Path, clock: Clock, redactor: Redactor) -> None:
        self._conn = conn
        self._path = path
        self._clock = clock
        self._mask = redactor
        self._open = True
        self.notes: dict[str, Any] = {}

    def _db(self) -> SqlConnection:
        if not self._open:
            raise StateError("this transaction has ended; write through store.mutate(...)")
        return self._conn

    def close(self) -> None:
        """End the handle (the store calls this when the transaction ends)."""
        self._open = False

    def note(self, **details: Any) -> None:
        self._db()
        json.dumps(details, allow_nan=False)
        self.notes.update(details)

    def record_image(self, image: ImageRow) -> None:
        self._db().execute(
            "INSERT INTO images (digest, size, created, source, data) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (digest) DO NOTHING",
            (image.digest, image.size, format_time(image.created), image.source, _json(image.data)),
        )

    def bind_tag(self, tag: str, digest: Digest) -> TagRow:
        db = self._db()
        row = db.execute("SELECT tag, digest, created FROM tags WHERE tag = ?", (tag,)).fetchone()
        if row is not None:
            if row[1] != digest:
                raise TagConflictError(
                    f"tag {tag!r} is already bound to {row[1]}; tags never move "
                    f"(refusing to bind it to {digest})"
                )
            return TagRow(row[0], Digest(row[1]), parse_time(row[2]))
        if db.execute("SELECT 1 FROM images WHERE digest = ?", (digest,)).fetchone() is None:
            raise NotFoundError(f"no image {digest} in the state store; cannot tag it {tag!r}")
        created = parse_time(format_time(self._clock.now()))
        db.execute(
            "INSERT INTO tags (tag, digest, created) VALUES (?, ?, ?)",
            (tag, digest, format_time(created)),
        )
        return TagRow(tag, digest, created)

    def upsert_environment(self, environment: EnvironmentRow) -> None:
        e = environment
        self._write(
            "INSERT INTO environments (name, runtime, listen, config, current_release,"
            " known_good_release, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET runtime = excluded.runtime,"
            " listen = excluded.listen, config = excluded.config,"
            " current_release = excluded.current_release,"
            " known_good_release = excluded.known_good_release, updated = excluded.updated",
            (
                e.name,
                e.runtime,
                e.listen,
                _json(e.config),
                e.current_release,
                e.known_good_release,
                _time(e.updated),
            ),
            f"environment {e.name!r} names a release that is not recorded",
        )

    def create_release(self, release: ReleaseRow) -> None:
        db = self._db()
        r = release
        row = db.execute(
            "SELECT id, environment, digest, config, created FROM releases WHERE id = ?", (r.id,)
        ).fetchone()
        if row is not None:
            existing = _release(row)
            if (existing.environment, existing.digest, _json(existing.config)) != (
                r.environment,
                r.digest,
                _json(r.config),
            ):
                raise StateError(f"release {r.id} is already recorded with other content")
            return
        self._write(
            "INSERT INTO releases (id, environment, digest, config, created)"
            " VALUES (?, ?, ?, ?, ?)",
            (r.id, r.environment, r.digest, _json(r.config), format_time(r.created)),
            f"release {r.id}: image {r.digest} is not recorded",
        )

    def create_deployment(self, deployment: DeploymentRow) -> None:
        d = deployment
        self._write(
            f"INSERT INTO deployments ({_DEPLOYMENT_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                d.id,
                d.environment,
                d.from_release,
                d.to_release,
                d.strategy,
                d.actor,
                format_time(d.started),
                _time(d.finished),
                d.outcome,
                _json(self._mask.json(d.details)),
                d.git_commit,
            ),
            f"deployment {d.id}: a release it names is not recorded (or the id is taken)",
        )

    def finish_deployment(
        self,
        deployment_id: str,
        outcome: DeploymentOutcome,
        finished: datetime,
        details: JsonObject | None = None,
    ) -> DeploymentRow:
        db = self._db()
        row = db.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?", (deployment_id,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no deployment {deployment_id!r}")
        current = _deployment(row)
        merged = self._mask.json({**current.details, **(details or {})})
        db.execute(
            "UPDATE deployments SET outcome = ?, finished = ?, details = ? WHERE id = ?",
            (outcome, format_time(finished), _json(merged), deployment_id),
        )
        return replace(current, outcome=outcome, finished=finished, details=merged)

    def append_step(
        self, deployment_id: str, step: str, state: str, data: JsonObject, at: datetime
    ) -> StepRow:
        db = self._db()
        if (
            db.execute("SELECT 1 FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
            is None
        ):
            raise NotFoundError(f"no deployment {deployment_id!r}")
        (seq,) = db.execute(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM deployment_steps WHERE deployment_id = ?",
            (deployment_id,),
        ).fetchone()
        db.execute(
            "INSERT INTO deployment_steps (deployment_id, seq, step, state, data, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (deployment_id, seq, step, state, _json(self._mask.json(data)), format_time(at)),
        )
        return StepRow(deployment_id, seq, step, state, dict(data), at)

    def put_instance(self, instance: InstanceRow) -> None:
        i = instance
        self._write(
            "INSERT INTO instances (id, environment, release, address, runtime,"
            " status, data) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " environment = excluded.environment, release = excluded.release,"
            " address = excluded.address, runtime = excluded.runtime,"
            " status = excluded.status, data = excluded.data",
            (
                i.id,
                i.environment,
                i.release,
                i.address,
                i.runtime,
                i.status,
                _json(self._mask.json(i.data)),
            ),
            f"instance {i.id}: release {i.release} is not recorded",
        )

    def set_instance_status(
        self, instance_id: str, status: str, data: JsonObject | None = None
    ) -> InstanceRow:
        db = self._db()
        row = db.execute(
            "SELECT id, environment, release, address, runtime, status, data FROM instances"
            " WHERE id = ?",
            (instance_id,),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no instance {instance_id!r}")
        current = _instance(row)
        merged = self._mask.json({**current.data, **(data or {})})
        db.execute(
            "UPDATE instances SET status = ?, data = ? WHERE id = ?",
            (status, _json(merged), instance_id),
        )
        return replace(current, status=status, data=merged)

    def remove_instance(self, instance_id: str) -> None:
        self._db().execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def add_event(self, event: EventRow) -> EventRow:
        cur = self._db().execute(
            "INSERT INTO events (time, environment, kind, message, data) VALUES (?, ?, ?, ?, ?)"
            " RETURNING id",
            (
                format_time(event.time),
                event.environment,
                event.kind,
                self._mask.text(event.message),
                _json(self._mask.json(event.data)),
            ),
        )
        return replace(event, id=cur.fetchone()[0])

    def get_lease(self, environment: str) -> Lease | None:
        row = (
            self._db()
            .execute(f"SELECT {_LEASE_COLUMNS} FROM locks WHERE environment = ?", (environment,))
            .fetchone()
        )
        return None if row is None else _lease(row)

    def put_lease(self, lease: Lease) -> None:
        x = lease
        self._db().execute(
            f"INSERT INTO locks ({_LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (environment) DO UPDATE SET token = excluded.token,"
            " holder = excluded.holder, pid = excluded.pid, host = excluded.host,"
            " purpose = excluded.purpose, kind = excluded.kind,"
            " acquired = excluded.acquired, expires = excluded.expires",
            (
                x.environment,
                x.token,
                x.holder,
                x.pid,
                x.host,
                x.purpose,
                x.kind,
                format_time(x.acquired),
                format_time(x.expires),
            ),
        )

    def delete_lease(self, environment: str) -> None:
        self._db().execute("DELETE FROM locks WHERE environment = ?", (environment,))

    def add_approval(self, approval: ApprovalRow) -> bool:
        a = approval
        kind, ident = (a.identity.kind, a.identity.id) if a.identity is not None else ("", "")
        db = self._db()
        # One approval per identity (per label for those without one).
        exists = db.execute(
            "SELECT 1 FROM approvals WHERE environment = ? AND release = ? AND identity_kind = ?"
            " AND identity = ? AND (identity_kind != '' OR actor = ?)",
            (a.environment, a.release, kind, ident, a.actor),
        ).fetchone()
        if exists:
            return False
        cur = db.execute(
            "INSERT INTO approvals (environment, release, actor, created, comment, identity_kind,"
            " identity, os_user, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (
                a.environment,
                a.release,
                a.actor,
                format_time(a.created),
                self._mask.text(a.comment),
                kind,
                ident,
                a.os_user,
                a.signature,
            ),
        )
        return cur.rowcount == 1

    def add_gate_results(self, results: Sequence[GateResultRow]) -> None:
        self._db().executemany(
            "INSERT INTO gate_results (evaluation, environment, release, digest, gate, passed,"
            " reason, data, checked) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.evaluation,
                    r.environment,
                    r.release,
                    r.digest,
                    r.gate,
                    int(r.passed),
                    self._mask.text(r.reason),
                    _json(self._mask.json(r.data)),
                    format_time(r.checked),
                )
                for r in results
            ],
        )

    def add_token(self, token: TokenRow) -> None:
        db = self._db()
        if db.execute("SELECT 1 FROM api_tokens WHERE name = ?", (token.name,)).fetchone():
            raise UsageError(f"a token named {token.name!r} already exists")
        t = token
        db.execute(
            f"INSERT INTO api_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (t.name, t.role, t.hash, format_time(t.created), t.created_by, _time(t.revoked)),
        )

    def revoke_token(self, name: str, at: datetime) -> TokenRow:
        db = self._db()
        row = db.execute(
            f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no API token named {name!r}")
        current = _token(row)
        if current.revoked is not None:
            return current
        db.execute("UPDATE api_tokens SET revoked = ? WHERE name = ?", (format_time(at), name))
        return replace(current, revoked=parse_time(format_time(at)))

    def _write(self, sql: str, params: tuple[Any, ...], missing: str) -> None:
        try:
            self._db().execute(sql, params)
        except self.integrity_errors as exc:
            raise NotFoundError(f"{missing} ({exc})") from exc


class SqliteTx(SqlTx):
    """:class:`SqlTx` on SQLite."""

    integrity_errors = (sqlite3.IntegrityError,)


# --------------------------------------------------------------------------------------------
# the store


class SqlStateStore:
    """The typed reads, the audited writer and the audit chain, in SQL both backends run.

    One connection, shared by threads under a lock. A backend supplies its errors
    (:meth:`_errors`), how a write transaction begins (:meth:`_begin_write`), its transaction
    handle (:meth:`_new_tx`) and how the chain is read for verification (:meth:`audit_links`).
    """

    _CANONICAL: str
    """SQL selecting an audit row's canonical JSON as UTF-8 bytes (see :data:`CANONICAL_SQL`)."""

    _BEGIN_SNAPSHOT = "BEGIN"
    """Starts a read transaction that sees one consistent snapshot."""

    def __init__(
        self,
        conn: SqlConnection,
        actor: str,
        key_path: Path,
        clock: Clock,
        redactor: Redactor | None = None,
    ) -> None:
        self._redactor = redactor if redactor is not None else Redactor()
        self._conn = conn
        self._actor = actor
        self._key_path = key_path
        self._head_path = audit.head_file_for(key_path)
        self._clock = clock
        self._lock = threading.RLock()
        self._key: audit.AuditKey | None = None
        self._head_written = False
        self._pending_head: SignedHead | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """Turns the driver's errors into castiron's (around every statement)."""
        raise NotImplementedError

    def _begin_write(self) -> None:
        """Begin the write transaction of :meth:`mutate` (holding the one writer's lock)."""
        raise NotImplementedError

    def _new_tx(self) -> SqlTx:
        """The transaction handle :meth:`mutate` passes to its caller."""
        raise NotImplementedError

    @property
    def actor(self) -> str:
        return self._actor

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def redactor(self) -> Redactor:
        return self._redactor

    @property
    def key_path(self) -> Path:
        """The audit signing key."""
        return self._key_path

    @property
    def head_path(self) -> Path:
        """The head file beside the key."""
        return self._head_path

    def close(self) -> None:
        """Record the newest signed head in the head file, then close the database.

        Raises:
            AuditError: when the head file cannot be written (the database is closed anyway).
        """
        with self._lock:
            try:
                self._flush_head()
            finally:
                self._conn.close()

    def _flush_head(self) -> None:
        """Write the head signed by this store's last mutation into the head file, if it is
        not there yet (see :meth:`mutate`).

        Raises:
            AuditError: when the head file cannot be written.
        """
        with self._lock:
            head, self._pending_head = self._pending_head, None
            if head is not None:
                audit.advance_head_file(self._head_path, head)

    # -- the one writer ------------------------------------------------------------------

    def mutate(self, draft: AuditDraft, apply: Callable[[StateTx], T]) -> T:
        """Run ``apply`` and append ``draft``'s audit entry in one transaction.

        Raises:
            StateError: when the database cannot be written.
            AuditError: when the chain's tail does not match its signed head, the key is
                missing or is not the one that signed the chain, or the head file is damaged
                (checked before this store's first change: nothing is changed then).
        """
        if not isinstance(draft, AuditDraft):
            raise TypeError("mutate needs an AuditDraft: every change is audited")
        if not self._head_written:
            audit.check_head_file(self._head_path)
        with self._lock, self._errors():
            conn = self._conn
            tx = self._new_tx()
            self._begin_write()
            try:
                result = apply(tx)
                head = self._append(draft, tx.notes)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                tx.close()
            # The head file (beside the key) only ever moves forward and is checked by
            # `audit verify` against the chain; it may lag behind the database, never lead.
            # Writing it (temp file, fsync, rename) on every mutation cost more than the
            # transaction itself, so it is written when the store is closed (or verified),
            # and at once only when there is none yet: a process killed before closing
            # leaves it one command behind, which verification accepts.
            if self._head_written or self._head_path.exists():
                self._pending_head = head
            else:
                audit.advance_head_file(self._head_path, head)
            self._head_written = True
        return result

    def _signing_key(self, head: SignedHead | None) -> audit.AuditKey:
        key = self._key if self._key is not None else audit.load_key(self._key_path)
        if key is None:
            if head is not None:
                raise AuditError(
                    f"the audit key {self._key_path} is missing but the chain was signed with "
                    f"key {head.public_key[:16]}...; restore the key (refusing to sign with a "
                    "new one)",
                    head.seq,
                )
            key = audit.create_key(self._key_path)
        if head is not None and key.public_hex != head.public_key:
            raise AuditError(
                f"the audit key {self._key_path} is not the key that signed this chain "
                f"({head.public_key[:16]}...)",
                head.seq,
            )
        self._key = key
        return key

    def _append(self, draft: AuditDraft, notes: dict[str, Any]) -> SignedHead:
        conn = self._conn
        head = self._read_head()
        last = conn.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        key = self._signing_key(head)
        self._check_tail(last, head, key)
        seq = 1 if last is None else last[0] + 1
        prev = audit.GENESIS if last is None else last[11]
        details = audit.canonical_json(self._redactor.json({**draft.details, **notes}))
        row = (
            seq,
            format_time(self._clock.now()),
            self._actor,
            draft.action,
            draft.environment,
            draft.subject,
            draft.from_,
            draft.to,
            draft.result,
            details,
            prev,
        )
        digest = audit.entry_hash(prev, audit.canonical_bytes(row))
        conn.execute(
            f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, digest),
        )
        signed = key.sign_head(seq, digest)
        conn.execute(
            "INSERT INTO audit_head (id, seq, hash, public_key, signature)"
            " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET seq = excluded.seq,"
            " hash = excluded.hash, public_key = excluded.public_key,"
            " signature = excluded.signature",
            (signed.seq, signed.hash, signed.public_key, signed.signature),
        )
        return signed

    def _check_tail(self, last: Any, head: SignedHead | None, key: audit.AuditKey) -> None:
        # Signing over a tampered tail would launder it, so the tail must match the head first.
        refuse = "refusing to extend the audit chain; run `castiron audit verify`"
        if last is None and head is None:
            return
        if last is None or head is None:
            seq = head.seq if head is not None else last[0]
            raise AuditError(f"the audit chain and its signed head disagree ({refuse})", seq)
        try:
            audit.check_row(last, head.seq, last[10])
        except AuditError as exc:
            raise AuditError(f"{exc.message} ({refuse})", exc.seq) from None
        if last[11] != head.hash or not audit.signature_valid(head, key.public_hex):
            raise AuditError(f"entry {last[0]} does not match the signed head ({refuse})", last[0])

    def renew_lease(self, environment: str, token: str, expires: datetime) -> bool:
        """Move the expiry of the lease held with ``token`` forward (the heartbeat).

        The only write outside :meth:`mutate`: it cannot create, take over or drop a lease.

        Raises:
            StateError: when the database cannot be written.
        """
        with self._lock, self._errors():
            cur = self._conn.execute(
                "UPDATE locks SET expires = ? WHERE environment = ? AND token = ? AND expires < ?",
                (format_time(expires), environment, token, format_time(expires)),
            )
            if cur.rowcount == 1:
                return True
            row = self._conn.execute(
                "SELECT 1 FROM locks WHERE environment = ? AND token = ?", (environment, token)
            ).fetchone()
            return row is not None

    # -- reads -----------------------------------------------------------------------------

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock, self._errors():
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self._lock, self._errors():
            return self._conn.execute(sql, params).fetchone()

    def schema_migrations(self) -> list[tuple[str, str]]:
        return [
            (r[0], r[1])
            for r in self._all("SELECT name, applied_at FROM schema_migrations ORDER BY rowid")
        ]

    def get_image(self, digest: Digest) -> ImageRow | None:
        row = self._one(
            "SELECT digest, size, created, source, data FROM images WHERE digest = ?", (digest,)
        )
        return None if row is None else _image(row)

    def list_images(self) -> list[ImageRow]:
        return [
            _image(r)
            for r in self._all(
                "SELECT digest, size, created, source, data FROM images ORDER BY created, digest"
            )
        ]

    def get_tag(self, tag: str) -> TagRow | None:
        row = self._one("SELECT tag, digest, created FROM tags WHERE tag = ?", (tag,))
        return None if row is None else TagRow(row[0], Digest(row[1]), parse_time(row[2]))

    def list_tags(self, digest: Digest | None = None) -> list[TagRow]:
        sql = "SELECT tag, digest, created FROM tags"
        params: tuple[Any, ...] = ()
        if digest is not None:
            sql += " WHERE digest = ?"
            params = (digest,)
        return [
            TagRow(r[0], Digest(r[1]), parse_time(r[2]))
            for r in self._all(sql + " ORDER BY tag", params)
        ]

    _ENV = (
        "SELECT name, runtime, listen, config, current_release, known_good_release, updated"
        " FROM environments"
    )

    def get_environment(self, name: str) -> EnvironmentRow | None:
        row = self._one(self._ENV + " WHERE name = ?", (name,))
        return None if row is None else _environment(row)

    def list_environments(self) -> list[EnvironmentRow]:
        return [_environment(r) for r in self._all(self._ENV + " ORDER BY name")]

    _REL = "SELECT id, environment, digest, config, created FROM releases"

    def get_release(self, release_id: ReleaseId) -> ReleaseRow | None:
        row = self._one(self._REL + " WHERE id = ?", (release_id,))
        return None if row is None else _release(row)

    def list_releases(self, environment: str) -> list[ReleaseRow]:
        return [
            _release(r)
            for r in self._all(
                self._REL + " WHERE environment = ? ORDER BY created, id", (environment,)
            )
        ]

    def get_deployment(self, deployment_id: str) -> DeploymentRow | None:
        row = self._one(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?", (deployment_id,)
        )
        return None if row is None else _deployment(row)

    def list_deployments(
        self, environment: str | None = None, limit: int | None = None
    ) -> list[DeploymentRow]:
        sql = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
        params: list[Any] = []
        if environment is not None:
            sql += " WHERE environment = ?"
            params.append(environment)
        # Newest first in the order they were recorded: a clock that jumped back must not
        # make an older deployment look like the latest.
        sql += " ORDER BY rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_deployment(r) for r in self._all(sql, tuple(params))]

    def steps(self, deployment_id: str) -> list[StepRow]:
        return [
            StepRow(r[0], r[1], r[2], r[3], json.loads(r[4]), parse_time(r[5]))
            for r in self._all(
                "SELECT deployment_id, seq, step, state, data, at FROM deployment_steps"
                " WHERE deployment_id = ? ORDER BY seq",
                (deployment_id,),
            )
        ]

    def list_instances(self, environment: str | None = None) -> list[InstanceRow]:
        sql = "SELECT id, environment, release, address, runtime, status, data FROM instances"
        params: tuple[Any, ...] = ()
        if environment is not None:
            sql += " WHERE environment = ?"
            params = (environment,)
        return [_instance(r) for r in self._all(sql + " ORDER BY id", params)]

    def events(
        self, environment: str | None = None, since: datetime | None = None
    ) -> list[EventRow]:
        sql, params = _narrowed(
            "SELECT id, time, environment, kind, message, data FROM events WHERE 1 = 1",
            ("environment = ?", environment),
            ("time >= ?", None if since is None else format_time(since)),
        )
        return [
            EventRow(parse_time(r[1]), r[2], r[3], r[4], json.loads(r[5]), id=r[0])
            for r in self._all(sql + " ORDER BY id", params)
        ]

    def get_lease(self, environment: str) -> Lease | None:
        row = self._one(f"SELECT {_LEASE_COLUMNS} FROM locks WHERE environment = ?", (environment,))
        return None if row is None else _lease(row)

    def list_leases(self) -> list[Lease]:
        return [_lease(r) for r in self._all(f"SELECT {_LEASE_COLUMNS} FROM locks ORDER BY 1")]

    def approvals(self, environment: str, release: ReleaseId) -> list[ApprovalRow]:
        return [
            ApprovalRow(
                r[0],
                ReleaseId(r[1]),
                r[2],
                parse_time(r[3]),
                r[4],
                _identity(r[5], r[6]),
                r[7],
                r[8],
            )
            for r in self._all(
                "SELECT environment, release, actor, created, comment, identity_kind, identity,"
                " os_user, signature FROM approvals WHERE environment = ? AND release = ?"
                " ORDER BY created, actor, identity",
                (environment, release),
            )
        ]

    def gate_results(
        self, environment: str | None = None, evaluation: str | None = None
    ) -> list[GateResultRow]:
        sql, params = _narrowed(
            "SELECT id, evaluation, environment, release, digest, gate, passed, reason, data,"
            " checked FROM gate_results WHERE 1 = 1",
            ("environment = ?", environment),
            ("evaluation = ?", evaluation),
        )
        return [
            GateResultRow(
                evaluation=r[1],
                environment=r[2],
                release=ReleaseId(r[3]),
                digest=Digest(r[4]),
                gate=r[5],
                passed=bool(r[6]),
                reason=r[7],
                checked=parse_time(r[9]),
                data=json.loads(r[8]),
                id=r[0],
            )
            for r in self._all(sql + " ORDER BY id", params)
        ]

    def audit_entries(
        self, environment: str | None = None, since: datetime | None = None
    ) -> list[AuditEntry]:
        sql, params = _narrowed(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE 1 = 1",
            ("environment = ?", environment),
            ("time >= ?", None if since is None else format_time(since)),
        )
        return [audit.row_to_entry(r) for r in self._all(sql + " ORDER BY seq", params)]

    def dump(self, table: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Every row of ``table`` verbatim, in insertion order, with its column names (for
        ``castiron state migrate``).

        Raises:
            ValueError: when ``table`` is not one of :data:`TABLES`.
        """
        if table not in TABLES:
            raise ValueError(f"not a state table: {table!r}")
        with self._lock, self._errors():
            cur = self._conn.execute(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")
            names = [d[0] for d in cur.description]
            keep = [i for i, name in enumerate(names) if name != "rowid"]
            rows = [tuple(r[i] for i in keep) for r in cur.fetchall()]
            return [names[i] for i in keep], rows

    def get_token(self, name: str) -> TokenRow | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE name = ?", (name,))
        return None if row is None else _token(row)

    def token_by_hash(self, hash: str) -> TokenRow | None:
        row = self._one(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens WHERE hash = ?", (hash,))
        return None if row is None else _token(row)

    def list_tokens(self) -> list[TokenRow]:
        return [
            _token(r) for r in self._all(f"SELECT {_TOKEN_COLUMNS} FROM api_tokens ORDER BY name")
        ]

    def audit_rows(self) -> Iterator[audit.AuditRow]:
        """Every stored audit row in seq order, streamed (for export and verification)."""
        with self._lock, self._errors():
            cur = self._conn.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY seq")
            while batch := cur.fetchmany(4096):
                yield from batch

    def audit_links(self) -> Iterator[audit.ChainLink]:
        """(seq, prev, hash, canonical JSON bytes) of every entry in seq order, streamed."""
        with self._lock, self._errors():
            cur = self._conn.execute(
                f"SELECT seq, prev, hash, {self._CANONICAL} FROM audit ORDER BY seq"
            )
            while batch := cur.fetchmany(4096):
                yield from batch

    def _read_head(self) -> SignedHead | None:
        row = self._conn.execute(
            "SELECT seq, hash, public_key, signature FROM audit_head WHERE id = 1"
        ).fetchone()
        return None if row is None else SignedHead(row[0], row[1], row[2], row[3])

    def audit_head(self) -> SignedHead | None:
        with self._lock, self._errors():
            return self._read_head()

    def verify_audit(self) -> AuditReport:
        """Verify the chain, the database head and the head file against the key.

        Raises:
            AuditError: when the key file exists but is not a readable ed25519 key.
            StateError: when the database cannot be read.
        """
        self._flush_head()
        with self._lock, self._errors():
            self._conn.execute(self._BEGIN_SNAPSHOT)  # one snapshot of rows and head
            try:
                head = self._read_head()
                return audit.verify_chain(self.audit_links(), head, self._key_path, self._head_path)
            finally:
                self._conn.execute("COMMIT")


class SqliteStateStore(SqlStateStore):
    """State in one SQLite file."""

    _CANONICAL = f"CAST({CANONICAL_SQL} AS BLOB)"

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        actor: str,
        key_path: Path,
        clock: Clock,
        redactor: Redactor | None = None,
    ) -> None:
        self._path = path
        self._file = _file_key(path)
        super().__init__(conn, actor, key_path, clock, redactor)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _db_errors(self._path)

    def _begin_write(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def _new_tx(self) -> SqliteTx:
        return SqliteTx(self._conn, self._path, self._clock, self._redactor)

    def close(self) -> None:
        """Record the newest signed head in the head file, then close the database (and
        forget it in this process's table of live connections).

        Raises:
            AuditError: when the head file cannot be written (the database is closed anyway).
        """
        with self._lock:
            try:
                super().close()
            finally:
                file, self._file = self._file, None
                _forget_connection(file)

    def pragma(self, name: str) -> Any:
        """The value of ``PRAGMA name`` on this store's connection (for diagnostics)."""
        if not name.isidentifier():
            raise ValueError(f"not a pragma name: {name!r}")
        return self._one(f"PRAGMA {name}")[0]


__all__ = [
    "APPLICATION_ID",
    "CANONICAL_SQL",
    "TABLES",
    "Migration",
    "SqlStateStore",
    "SqlTx",
    "SqliteStateStore",
    "SqliteTx",
    "migrations",
    "open_state",
]


def _conforms(store: SqliteStateStore) -> StateStore:
    return store  # mypy checks here that SqliteStateStore satisfies the StateStore protocol
