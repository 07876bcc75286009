"""The audit chain's format, its head signature and its verification.

Owns the exact bytes of an entry (canonical JSON), the hash formula, the per-installation
ed25519 key (a PEM file kept outside the database, created 0600 on first use), the head file
beside it, and :func:`verify_chain`, which checks a sequence of stored rows against both signed
heads. Everything here is pure or touches only the key and head files; the database side lives
in the store (``sqlite.py``), which calls these functions inside its transactions.

What detects what (see docs/state.md):

* editing any field of an entry changes its hash; editing the hash breaks the next ``prev``;
* deleting or reordering entries breaks ``seq`` continuity or ``prev`` links;
* deleting the tail, or rewriting the whole chain with valid hashes, no longer matches the
  signed head (and a head cannot be re-signed without the key);
* restoring an older database (an older, validly signed head) is caught by the head file beside
  the key, which only ever moves forward.

This module knows no SQL and no CLI; it never reads the environment. cryptography is
imported only when a key is loaded, created or checked, so commands that only read state start
without it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.errors import AuditError
from castiron.filemodes import make_private_dir, open_private
from castiron.state.base import AuditEntry, AuditReport, SignedHead
from castiron.values import value

if TYPE_CHECKING:  # cryptography is imported when a key is used: reads never need it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GENESIS = "0" * 64
"""The ``prev`` of the first entry."""

HEAD_FILE_NAME = "audit.head"

AuditRow = tuple[Any, ...]
"""A stored entry in column order: seq, time, actor, action, environment, subject, from, to,
result, details (canonical JSON text), prev, hash."""

_canonical_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
)


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON: sorted keys, no insignificant whitespace, non-ASCII kept."""
    return _canonical_encoder.encode(obj)


def _s(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is not str:
        raise TypeError(f"expected text, found {type(value).__name__}")
    return encode_basestring(value)


def canonical_bytes(row: AuditRow) -> bytes:
    """The canonical UTF-8 bytes of a stored entry (without its own hash).

    Equal to ``canonical_json({...})`` of the entry's eleven fields when ``details`` is stored
    canonically (which the store guarantees); assembled by hand because it is the hot loop of
    verification.

    Raises:
        TypeError: when a stored field has the wrong type (a tampered row).
    """
    seq, time, actor, action, environment, subject, from_, to, result, details, prev = row[:11]
    if type(seq) is not int or type(details) is not str:
        raise TypeError("seq must be an integer and details JSON text")
    return (
        '{"action":'
        + _s(action)
        + ',"actor":'
        + _s(actor)
        + ',"details":'
        + details
        + ',"environment":'
        + _s(environment)
        + ',"from":'
        + _s(from_)
        + ',"prev":'
        + _s(prev)
        + ',"result":'
        + _s(result)
        + ',"seq":'
        + str(seq)
        + ',"subject":'
        + _s(subject)
        + ',"time":'
        + _s(time)
        + ',"to":'
        + _s(to)
        + "}"
    ).encode("utf-8")


def entry_hash(prev: str, canonical: bytes) -> str:
    """``sha256(ascii(prev) || canonical)`` as lowercase hex."""
    return hashlib.sha256(prev.encode("ascii") + canonical).hexdigest()


def entry_object(entry: AuditEntry, *, with_hash: bool = True) -> dict[str, Any]:
    """An entry as the JSON object that is hashed (plus ``hash`` when ``with_hash``)."""
    obj: dict[str, Any] = {
        "seq": entry.seq,
        "time": entry.time,
        "actor": entry.actor,
        "action": entry.action,
        "environment": entry.environment,
        "subject": entry.subject,
        "from": entry.from_,
        "to": entry.to,
        "result": entry.result,
        "details": dict(entry.details),
        "prev": entry.prev,
    }
    if with_hash:
        obj["hash"] = entry.hash
    return obj


def row_to_entry(row: AuditRow) -> AuditEntry:
    """A stored row as an :class:`AuditEntry` (details parsed)."""
    seq, time, actor, action, environment, subject, from_, to, result, details, prev, hash_ = row
    return AuditEntry(
        seq=seq,
        time=time,
        actor=actor,
        action=action,
        environment=environment,
        subject=subject,
        from_=from_,
        to=to,
        result=result,
        details=json.loads(details),
        prev=prev,
        hash=hash_,
    )


# --------------------------------------------------------------------------------------------
# key and signed head


def head_message(seq: int, hash_: str) -> bytes:
    """The bytes the head signature covers: ``castiron-audit-head-v1\\n{seq}\\n{hash}\\n``."""
    return f"castiron-audit-head-v1\n{seq}\n{hash_}\n".encode("ascii")


@value
class AuditKey:
    """The installation's signing key and where it lives."""

    path: Path
    private: Ed25519PrivateKey

    @property
    def public_hex(self) -> str:
        """Hex of the raw 32-byte public key."""
        return self.private.public_key().public_bytes_raw().hex()

    def sign_head(self, seq: int, hash_: str) -> SignedHead:
        """Sign (seq, hash) as the chain's head."""
        signature = self.private.sign(head_message(seq, hash_))
        return SignedHead(seq, hash_, self.public_hex, signature.hex())


def load_key(path: Path) -> AuditKey | None:
    """The key at ``path``, or ``None`` when there is no file.

    Raises:
        AuditError: when the file is not an unencrypted PEM ed25519 private key.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read the audit key {path}: {exc.strerror}") from exc
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = _pkcs8_ed25519_seed(data)
    if seed is not None:
        return AuditKey(path, Ed25519PrivateKey.from_private_bytes(seed))
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditError(f"{path} is not a PEM ed25519 private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise AuditError(f"{path} is not an ed25519 key")
    return AuditKey(path, private)


_PKCS8_ED25519_PREFIX = bytes.fromhex("302e020100300506032b657004220420")
"""DER of an unencrypted PKCS#8 ed25519 private key up to its 32-byte seed (RFC 8410)."""


def _pkcs8_ed25519_seed(pem: bytes) -> bytes | None:
    """The seed of the exact PEM that :func:`create_key` writes, else None (then the general
    PEM parser decides). Parsing this one shape by hand spares loading cryptography's
    serialization package on every command that signs."""
    import base64
    import binascii

    lines = pem.strip().splitlines()
    if len(lines) != 3 or lines[0] != b"-----BEGIN PRIVATE KEY-----":
        return None
    if lines[2] != b"-----END PRIVATE KEY-----":
        return None
    try:
        der = base64.b64decode(lines[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != 48 or not der.startswith(_PKCS8_ED25519_PREFIX):
        return None
    return der[len(_PKCS8_ED25519_PREFIX) :]


def create_key(path: Path) -> AuditKey:
    """Create a new key at ``path`` (mode 0600; the directory 0700 when created).

    If another process created it first, that key is returned.

    Raises:
        AuditError: when the file cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        make_private_dir(path.parent)
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        existing = load_key(path)
        if existing is None:  # pragma: no cover - deleted between the two calls
            raise AuditError(f"the audit key {path} vanished while being created") from None
        return existing
    except OSError as exc:
        raise AuditError(f"cannot create the audit key {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return AuditKey(path, private)


def signature_valid(head: SignedHead, public_hex: str) -> bool:
    """True when ``head`` was signed by the key whose raw public key is ``public_hex``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        public.verify(bytes.fromhex(head.signature), head_message(head.seq, head.hash))
    except (InvalidSignature, ValueError):
        return False
    return True


def head_to_json(head: SignedHead) -> dict[str, Any]:
    """A signed head as a JSON object."""
    return {
        "seq": head.seq,
        "hash": head.hash,
        "public_key": head.public_key,
        "signature": head.signature,
    }


def head_from_json(obj: Mapping[str, Any]) -> SignedHead:
    """Parse :func:`head_to_json` output.

    Raises:
        ValueError: when a field is missing or has the wrong type.
    """
    seq, hash_, public, sig = obj["seq"], obj["hash"], obj["public_key"], obj["signature"]
    if type(seq) is not int or not all(isinstance(v, str) for v in (hash_, public, sig)):
        raise ValueError("bad head fields")
    return SignedHead(seq, hash_, public, sig)


class _HeadFileUnreadable(Exception):
    """The head file exists but cannot be parsed (internal to verification)."""


def read_head_file(path: Path) -> SignedHead | None:
    """The signed head recorded in ``path`` (``None`` when absent).

    Raises:
        _HeadFileUnreadable: when the file exists but is not a signed head.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _HeadFileUnreadable(str(exc)) from exc
    try:
        return head_from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise _HeadFileUnreadable(str(exc)) from exc


def check_head_file(path: Path) -> None:
    """Refuse to go on when the head file exists but is not a signed head: overwriting it
    would erase what it guards (a restored or truncated database would go unnoticed).

    Raises:
        AuditError: naming the file and what to do.
    """
    try:
        read_head_file(path)
    except _HeadFileUnreadable as exc:
        raise AuditError(
            f"the audit head file {path} is damaged ({exc}); nothing was changed. Run "
            "`castiron audit verify` to check the audit log; if only this file is wrong, move "
            f"it aside (mv {path} {path}.damaged) and run the command again: the next change "
            "records a fresh head"
        ) from None


def advance_head_file(path: Path, head: SignedHead) -> None:
    """Record ``head`` in ``path`` unless it already records a later one (it never goes back).

    Written atomically (temp file, fsync, rename) under an exclusive ``flock`` on a sibling
    lock file, so concurrent writers cannot move it backwards.

    Raises:
        AuditError: when the file cannot be written.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        with open(open_private(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = read_head_file(path)
            except _HeadFileUnreadable:
                current = None
            if current is not None and current.seq >= head.seq:
                return
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as out:
                out.write(canonical_json(head_to_json(head)).encode("utf-8") + b"\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
    except OSError as exc:
        raise AuditError(f"cannot write the audit head file {path}: {exc.strerror}") from exc


# --------------------------------------------------------------------------------------------
# verification


class _Bad(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


def check_row(row: AuditRow, expected_seq: int, prev: str) -> str:
    """Check one stored entry against its position; return its (verified) hash.

    Raises:
        AuditError: naming the entry and what is wrong with it.
    """
    seq = row[0]
    if seq != expected_seq:
        raise _gap(expected_seq, seq)
    try:
        computed = entry_hash(row[10], canonical_bytes(row))
    except (TypeError, ValueError, UnicodeError) as exc:
        raise AuditError(f"entry {seq}: a field has the wrong type ({exc})", seq) from exc
    if computed != row[11]:
        raise AuditError(f"entry {seq}: its hash does not match its contents", seq)
    if row[10] != prev:
        what = "the genesis value" if seq == 1 else f"the hash of entry {seq - 1}"
        raise AuditError(f"entry {seq}: its prev does not match {what}", seq)
    return computed


ChainLink = tuple[int, str, str, bytes]
"""What verification reads per entry: seq, prev, hash, and the canonical JSON as UTF-8."""


def _gap(expected: int, seq: object) -> AuditError:
    if isinstance(seq, int) and seq > expected:
        gap = (
            f"entry {expected} is missing"
            if seq == expected + 1
            else f"entries {expected}..{seq - 1} are missing"
        )
        return AuditError(f"{gap} (the chain jumps from {expected - 1} to {seq})", expected)
    return AuditError(f"entry {expected}: found seq {seq!r} in its place", expected)


ChainPart = tuple[int, Iterable[ChainLink]]
"""A run of consecutive entries: the seq it must start at, and its links in seq order."""


@dataclass
class PartResult:
    """What walking one part found: where it ended, and the first fault (if any)."""

    first_prev: str | None = None
    last_seq: int = 0
    last_hash: str | None = None
    at_file_seq: str | None = None
    bad: tuple[int | None, str] | None = None


def _walk(links: Iterable[ChainLink], first: int, file_seq: int) -> PartResult:
    """Check each link's hash against its contents and its prev against the link before it.
    The part starting at seq 1 must start from the genesis value; any other part starts from
    its first link's prev, which the caller checks against the part before (see
    :func:`verify_chain_parts`)."""
    out = PartResult(last_seq=first - 1)
    prev: str | None = GENESIS if first == 1 else None
    expected = first
    sha256 = hashlib.sha256
    try:
        for seq, stored_prev, stored_hash, text in links:
            if seq != expected:
                gap = _gap(expected, seq)
                raise _Bad(gap.seq, gap.message)
            if prev is None:
                prev = out.first_prev = stored_prev
            try:
                computed = sha256(prev.encode("ascii") + text).hexdigest()
            except (TypeError, UnicodeError, AttributeError):
                raise _Bad(seq, f"entry {seq}: a field has the wrong type") from None
            if computed != stored_hash:
                raise _Bad(seq, f"entry {seq}: its hash does not match its contents")
            if stored_prev != prev:  # pragma: no cover - the hash check catches it first
                raise _Bad(seq, f"entry {seq}: its prev does not match entry {seq - 1}")
            prev = stored_hash
            if seq == file_seq:
                out.at_file_seq = prev
            expected += 1
    except _Bad as bad:
        out.bad = (bad.seq, bad.reason)
    finally:
        close = getattr(links, "close", None)
        if close is not None:  # a stream left early (a fault) ends here, not when collected
            close()
    out.last_seq = expected - 1
    out.last_hash = prev
    if first == 1:
        out.first_prev = GENESIS
    return out


def _in_order(walks: Sequence[Callable[[], PartResult]]) -> list[PartResult]:
    return [walk() for walk in walks]


def verify_chain(
    links: Iterable[ChainLink],
    db_head: SignedHead | None,
    key_path: Path,
    head_file: Path,
) -> AuditReport:
    """Verify stored entries (in seq order) against the database head and the head file.

    ``links`` carry each entry's canonical text as the store renders it (the SQLite store has
    the database assemble it, which keeps this loop to one hash per entry).

    Never raises for a bad chain: the report says which seq is bad and why.

    Raises:
        AuditError: only when the key file exists but cannot be read or parsed.
    """
    return verify_chain_parts([(1, links)], db_head, key_path, head_file)


def verify_chain_parts(
    parts: Sequence[ChainPart],
    db_head: SignedHead | None,
    key_path: Path,
    head_file: Path,
    *,
    run: Callable[[Sequence[Callable[[], PartResult]]], Sequence[PartResult]] = _in_order,
) -> AuditReport:
    """:func:`verify_chain` over consecutive parts of the chain (the first starting at seq 1),
    which ``run`` may walk at the same time (it gets one call per part and returns their
    results in order). Each part is checked on its own, then each one's first prev against
    the hash the part before ended with: the same verdict as one walk over the whole chain.

    Raises:
        AuditError: only when the key file exists but cannot be read or parsed.
    """
    try:
        file_head = read_head_file(head_file)
        file_unreadable: str | None = None
    except _HeadFileUnreadable as exc:
        file_head, file_unreadable = None, str(exc)
    file_seq = file_head.seq if file_head is not None else -1
    results = run([functools.partial(_walk, links, first, file_seq) for first, links in parts])
    hash_at_file_seq: str | None = None
    last_seq, last_hash = 0, GENESIS
    try:
        for (first, _), part in zip(parts, results, strict=True):
            if first != 1 and part.first_prev is not None:
                if last_seq != first - 1:
                    gap = _gap(last_seq + 1, first)
                    raise _Bad(gap.seq, gap.message)
                if part.first_prev != last_hash:
                    raise _Bad(
                        first,
                        f"entry {first}: its prev does not match the hash of entry {first - 1}",
                    )
            if part.at_file_seq is not None:
                hash_at_file_seq = part.at_file_seq
            if part.bad is not None:
                last_seq = part.last_seq
                raise _Bad(*part.bad)
            if part.last_hash is not None and part.last_seq >= first:
                last_seq, last_hash = part.last_seq, part.last_hash
        _check_heads(
            last_seq,
            last_hash,
            db_head,
            key_path,
            head_file,
            file_head,
            file_unreadable,
            hash_at_file_seq,
        )
    except _Bad as bad:
        return AuditReport(last_seq, db_head, False, bad.seq, bad.reason)
    return AuditReport(last_seq, db_head, True)


def _check_heads(
    last_seq: int,
    last_hash: str,
    db_head: SignedHead | None,
    key_path: Path,
    head_file: Path,
    file_head: SignedHead | None,
    file_unreadable: str | None,
    hash_at_file_seq: str | None,
) -> None:
    if file_unreadable is not None:
        raise _Bad(
            None,
            f"the head file {head_file} is unreadable ({file_unreadable}); if the entries are "
            f"right, move it aside (mv {head_file} {head_file}.damaged): the next change "
            "records a fresh head",
        )
    if db_head is None and file_head is None:
        if last_seq == 0:
            return
        raise _Bad(last_seq, f"the chain has {last_seq} entries but no signed head")
    key = load_key(key_path)
    if key is None:
        seq = db_head.seq if db_head is not None else None
        raise _Bad(seq, f"the audit key {key_path} is missing: the signed head cannot be checked")
    public = key.public_hex
    for where, head in (("database", db_head), (str(head_file), file_head)):
        if head is None:
            continue
        if head.public_key != public:
            raise _Bad(
                head.seq,
                f"the head in {where} was signed by another key ({head.public_key[:16]}...) "
                f"than {key_path} ({public[:16]}...)",
            )
        if not signature_valid(head, public):
            raise _Bad(head.seq, f"the head signature in {where} does not verify with {key_path}")
    if db_head is None:
        if file_head is not None and file_head.seq > last_seq:
            where = f"the head file {head_file}"
            raise _Bad(last_seq + 1, _tail_missing(last_seq, file_head.seq, where))
        raise _Bad(last_seq or None, "the signed head is missing from the database")
    if db_head.seq > last_seq:
        raise _Bad(last_seq + 1, _tail_missing(last_seq, db_head.seq, "the signed head"))
    if db_head.seq < last_seq:
        raise _Bad(
            db_head.seq + 1,
            f"entries after {db_head.seq} are not covered by the "
            "signed head (appended without the key)",
        )
    if db_head.hash != last_hash:
        raise _Bad(
            last_seq, f"entry {last_seq} does not match the signed head (the chain was rewritten)"
        )
    if file_head is None:
        raise _Bad(None, f"the head file {head_file} is missing")
    if file_head.seq > last_seq:
        raise _Bad(
            last_seq + 1, _tail_missing(last_seq, file_head.seq, f"the head file {head_file}")
        )
    if hash_at_file_seq != file_head.hash:
        raise _Bad(
            file_head.seq,
            f"entry {file_head.seq} does not match the head file "
            f"{head_file} (the chain was rewritten or an older copy restored)",
        )


def _tail_missing(last_seq: int, head_seq: int, where: str) -> str:
    span = (
        f"entry {head_seq} is"
        if head_seq == last_seq + 1
        else (f"entries {last_seq + 1}..{head_seq} are")
    )
    return f"{span} missing: {where} records entry {head_seq}, the chain ends at {last_seq}"


def head_file_for(key_path: Path) -> Path:
    """The head file kept beside the key."""
    return key_path.with_name(HEAD_FILE_NAME)


__all__ = [
    "GENESIS",
    "AuditKey",
    "ChainLink",
    "ChainPart",
    "advance_head_file",
    "canonical_bytes",
    "canonical_json",
    "check_head_file",
    "check_row",
    "create_key",
    "entry_hash",
    "entry_object",
    "head_file_for",
    "head_message",
    "load_key",
    "read_head_file",
    "row_to_entry",
    "signature_valid",
    "verify_chain",
    "verify_chain_parts",
]
