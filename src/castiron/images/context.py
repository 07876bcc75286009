"""The build context: which files go into an image, what they contain, and which look secret.

Owns the walk of the context directory (honouring ``image.exclude``, never following
symlinks, refusing devices, FIFOs and sockets), content hashing with a stat cache (a file
whose size, mtime, ctime, inode and device are unchanged since the last bake is not re-read),
hard-link detection, and the secret-file check. Knows nothing of tar, OCI or the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from castiron.errors import ImageError
from castiron.images.layer import EntryKind, normalise_mode, sort_key
from castiron.images.pattern import PatternSet

ALWAYS_EXCLUDED = (".git/",)
"""Never part of an image: version-control metadata changes with every commit."""

SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "**/.aws/credentials",
    "**/.docker/config.json",
    ".netrc",
    "_netrc",
    ".npmrc",
    ".pypirc",
    ".git-credentials",
    ".htpasswd",
    "application_default_credentials.json",
    "**/gcloud/credentials.db",
    "**/gcloud/access_tokens.db",
    "**/gcloud/legacy_credentials/**",
    "!*.pub",
    "!.env.example",
    "!.env.sample",
    "!.env.template",
    "!.env.dist",
)
"""File names that usually hold credentials; baking them needs ``image.allow_secrets``."""

_SNIFF_LIMIT = 64 * 1024
# A file modified within a second of the scan may change again within the same timestamp tick
# without changing its stat; such files are not remembered, so they are re-hashed next time.
_RACY_NS = 1_000_000_000
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class SourceFile:
    """One path of the context that goes into the image."""

    rel: str
    """POSIX path relative to the context root."""
    kind: EntryKind
    mode: int
    """Normalised permission bits."""
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    """Symlink target, or (for a hard link) the context path of the first link."""
    source: str | Path | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Scan:
    """The result of walking a context."""

    files: tuple[SourceFile, ...]
    stats: dict[str, list[int | str]]
    """The stat cache to save for the next bake: rel → [size, mtime_ns, ctime_ns, ino, dev, sha]."""
    hashed: int
    """How many files were read and hashed (the rest came from the stat cache)."""


def hash_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content.

    Raises:
        ImageError: when the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    return h.hexdigest()


@dataclass(frozen=True)
class WalkEntry:
    """One included path found by :func:`walk`."""

    rel: str
    path: str
    st: os.stat_result


def walk(root: Path, exclude: PatternSet, *, skip: Iterable[Path] = ()) -> list[WalkEntry]:
    """Every included path under ``root``, sorted so a directory precedes its contents.

    Excluded directories are not descended (gitignore semantics); ``.git/`` is always
    excluded. ``skip`` names directories and files that are never part of the context
    (castiron's own state directory, the spec file, a quickstart directory).

    Raises:
        ImageError: for an unreadable directory, or a device, FIFO or socket.
    """
    always = PatternSet.of(ALWAYS_EXCLUDED)
    skipped: set[tuple[int, int]] = set()
    for p in skip:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            skipped.add((st.st_dev, st.st_ino))
    found: list[WalkEntry] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        dir_path = os.path.join(root, rel_dir) if rel_dir else str(root)
        try:
            entries = list(os.scandir(dir_path))
        except OSError as exc:
            raise ImageError(f"{dir_path}: cannot list directory ({exc.strerror})") from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                raise ImageError(f"{entry.path}: cannot stat ({exc.strerror})") from None
            is_dir = stat.S_ISDIR(st.st_mode)
            if always.excluded(rel, is_dir) or exclude.excluded(rel, is_dir):
                continue
            if (st.st_dev, st.st_ino) in skipped:
                continue
            if is_dir:
                stack.append(rel)
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise ImageError(
                    f"{entry.path}: only files, directories and symlinks can go into an image "
                    "(add it to image.exclude)"
                )
            found.append(WalkEntry(rel, entry.path, st))
    found.sort(key=lambda item: sort_key(item.rel))
    return found


def scan(
    root: Path,
    exclude: PatternSet,
    *,
    skip: Iterable[Path] = (),
    stat_cache: Mapping[str, list[int | str]] | None = None,
    pool: Executor | None = None,
) -> Scan:
    """Walk ``root`` (see :func:`walk`) and describe every included path with its content hash.

    Raises:
        ImageError: for an unreadable path, or a device, FIFO or socket.
    """
    started_ns = time.time_ns()
    found = [(w.rel, w.st, w.path) for w in walk(root, exclude, skip=skip)]

    cache = stat_cache or {}
    stats: dict[str, list[int | str]] = {}
    to_hash: list[tuple[str, str]] = []
    known: dict[str, str] = {}
    for rel, st, path in found:
        if not stat.S_ISREG(st.st_mode):
            continue
        ident: list[int | str] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
        prior = cache.get(rel)
        if prior is not None and list(prior[:5]) == ident and isinstance(prior[5], str):
            known[rel] = prior[5]
        else:
            to_hash.append((rel, path))
    paths = [p for _, p in to_hash]
    digests = (
        list(pool.map(hash_file, paths)) if pool is not None else [hash_file(p) for p in paths]
    )
    known.update((rel, d) for (rel, _), d in zip(to_hash, digests, strict=True))

    files: list[SourceFile] = []
    first_link: dict[tuple[int, int], str] = {}
    for rel, st, path in found:
        if stat.S_ISDIR(st.st_mode):
            files.append(SourceFile(rel, "dir", normalise_mode(st.st_mode, "dir")))
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(path)
            except OSError as exc:
                raise ImageError(f"{path}: cannot read link ({exc.strerror})") from None
            files.append(SourceFile(rel, "symlink", 0o777, target=target))
        else:
            sha = known[rel]
            mode = normalise_mode(st.st_mode, "file")
            link_key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and link_key in first_link:
                files.append(
                    SourceFile(rel, "hardlink", mode, st.st_size, sha, first_link[link_key], path)
                )
            else:
                if st.st_nlink > 1:
                    first_link[link_key] = rel
                files.append(SourceFile(rel, "file", mode, st.st_size, sha, source=path))
            if started_ns - st.st_mtime_ns > _RACY_NS:
                stats[rel] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, sha]
    return Scan(files=tuple(files), stats=stats, hashed=len(to_hash))


def _looks_like_cloud_key(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_LIMIT)
    except OSError:
        return False
    return b'"private_key"' in head or (b'"refresh_token"' in head and b'"client_secret"' in head)


def secret_files(files: Iterable[SourceFile], allow: PatternSet) -> list[str]:
    """Context paths that look like credentials and are not allowed by ``allow``.

    Matches :data:`SECRET_PATTERNS` by name, and JSON files (up to 64 KiB) that carry a cloud
    service-account private key or an OAuth refresh token.
    """
    patterns = PatternSet.of(SECRET_PATTERNS)
    found: list[str] = []
    for f in files:
        if f.kind == "dir":
            continue
        suspicious = patterns.excluded(f.rel, False)
        if (
            not suspicious
            and f.kind == "file"
            and f.rel.endswith(".json")
            and f.size <= _SNIFF_LIMIT
            and f.source is not None
        ):
            suspicious = _looks_like_cloud_key(f.source)
        if suspicious and not allow.excluded(f.rel, False):
            found.append(f.rel)
    return found


__all__ = [
    "ALWAYS_EXCLUDED",
    "SECRET_PATTERNS",
    "Scan",
    "SourceFile",
    "WalkEntry",
    "hash_file",
    "scan",
    "secret_files",
    "walk",
]
