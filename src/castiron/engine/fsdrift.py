"""Filesystem drift: an instance's root filesystem checked against its image's file manifest.

Owns the filesystem part of drift detection for instances whose root filesystem is a local
directory (the local runtime's read-only ``releases/<digest>/rootfs``):

- :func:`scan_full` walks the tree and compares every path with the manifest, re-hashing every
  regular file with SHA-256 (optionally in several worker processes, one per core, each given
  an equal share of the bytes);
- :func:`take_baseline` records, when an instance starts, one stat tuple per path (size,
  mtime, mode, inode, ctime) in a compact binary file under the instance's state directory;
- :func:`scan_fast` walks the tree again and compares stat tuples with the baseline, so only
  paths whose tuple changed (or that appeared or vanished) are compared with the manifest and
  re-hashed. The ctime cannot be set from user space, so content written and then back-dated
  with ``touch -m``/``os.utime`` is still caught.

Findings are values (:class:`Finding`, kind ``filesystem``): a path added, removed, or with
other content, mode, type or link target. Paths the service declares ``writable`` and paths
matching the user's ``ignore`` patterns (gitignore style, see
:mod:`castiron.images.pattern`) are skipped, with everything below them. Drift is a result,
not an exception.

It knows the file manifest's values (:mod:`castiron.images.manifest`) and nothing of drivers,
the router, the agent or the state store: callers hand it a directory, a manifest and paths.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import posixpath
import signal
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

from castiron.errors import ImageError, NotFoundError, StateCorruptError, StateError
from castiron.filemodes import make_private_dir, open_private
from castiron.images.manifest import FileEntry, FileIndex, RawEntry
from castiron.images.pattern import PatternSet

FINDING_KIND = "filesystem"
"""The ``kind`` of every finding this module makes."""

Change = Literal["added", "removed", "content", "mode", "type", "target"]
"""What differs at a path: it is new, gone, or its content, mode, type or link target."""

ManifestSource = Mapping[str, FileEntry] | Callable[[], Mapping[str, FileEntry]]
"""A file manifest, or a function returning it (called only when something changed)."""

HASH_BUFFER = 1 << 20
"""Bytes read per system call while hashing: large reads keep SHA-256 near its peak speed."""

_RECORD = struct.Struct("<QqIQq")
"""One baseline record: size, mtime_ns, st_mode, inode, ctime_ns (36 bytes)."""
_MAGIC = b"castiron fs-baseline 1\n"
_HEADER = struct.Struct("<QQ")
"""After the magic: number of paths, bytes of the NUL-separated path list."""
_RACY = -1
"""The ctime stored for a path changed while the baseline was taken: it never matches."""
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NOATIME", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINK_HOPS = 40
_T = TypeVar("_T")


@dataclass(frozen=True)
class Finding:
    """One difference between what runs and what the release says."""

    kind: str
    """``filesystem`` for every finding of this module."""
    instance: str
    """The instance whose root filesystem differs."""
    path: str
    """In-image absolute path (``/app/server.py``)."""
    expected: str | None
    """What the image says (``None``: the path should not exist)."""
    actual: str | None
    """What the instance has (``None``: the path is gone)."""
    change: Change
    """Which aspect differs."""


@dataclass(frozen=True)
class ScanStats:
    """What a scan did; counters, so tests and benchmarks can tell work from results."""

    entries: int = 0
    """Paths found in the tree (after skipping writable and ignored ones)."""
    checked: int = 0
    """Paths compared with the manifest (all of them on a full scan)."""
    hashed_files: int = 0
    """Regular files read and hashed."""
    hashed_bytes: int = 0
    """Bytes read and hashed."""


@dataclass(frozen=True)
class ScanResult:
    """Findings sorted by path, and what it took to find them."""

    findings: tuple[Finding, ...]
    stats: ScanStats

    @property
    def clean(self) -> bool:
        """True when nothing differs."""
        return not self.findings


@dataclass(frozen=True)
class PathFilter:
    """Paths a scan skips, with everything below them: the service's writable paths and the
    user's ignore patterns. Paths are relative to the root, without a leading ``/``."""

    writable: frozenset[str] = frozenset()
    ignore: PatternSet = field(default_factory=lambda: PatternSet(()))

    @classmethod
    def of(cls, writable: Iterable[str] = (), ignore: Iterable[str] = ()) -> PathFilter:
        """Build a filter from in-image absolute ``writable`` paths and gitignore-style
        ``ignore`` patterns (``*.pyc``, ``/app/cache/``, ``**/__pycache__``, ``!keep``).

        Raises:
            ImageError: for an unusable ignore pattern (naming it and its index).
        """
        rels = frozenset(posixpath.normpath("/" + w).lstrip("/") for w in writable)
        return cls(writable=rels, ignore=PatternSet.of(ignore, "drift ignore"))

    def skips(self, rel: str, is_dir: bool) -> bool:
        """True when ``rel`` itself (not counting its parents) is writable or ignored."""
        if rel in self.writable:
            return True
        return bool(self.ignore) and self.ignore.excluded(rel, is_dir)


@dataclass(frozen=True)
class _Tree:
    names: list[str]
    """Relative paths in walk order."""
    records: list[bytes]
    """One packed :data:`_RECORD` per name (when the walk was asked for stat records)."""
    modes: list[int] = field(default_factory=list)
    """``st_mode`` per name (when it was not)."""
    sizes: list[int] = field(default_factory=list)
    """``st_size`` per name (when it was not)."""


def _walk(
    root: Path,
    paths: PathFilter,
    records: bool = True,
    on_file: Callable[[str, int], None] | None = None,
) -> _Tree:
    """Every path under ``root`` that ``paths`` does not skip, with its packed stat tuple
    (``records``) or just its mode and size (what a full scan needs). ``on_file`` is told
    each regular file (relative path, size) as soon as it is found.

    One ``os.scandir`` per directory and one ``lstat`` per entry; no per-entry objects kept
    beyond a name and a few bytes, so a tree of 100,000 paths walks in well under a second.
    """
    tree = _Tree([], [])
    add_name, add_record, pack = tree.names.append, tree.records.append, _RECORD.pack
    add_mode, add_size = tree.modes.append, tree.sizes.append
    writable = paths.writable
    excluded = paths.ignore.excluded if paths.ignore else None
    isdir, isreg = stat.S_ISDIR, stat.S_ISREG
    if "" in writable:
        return tree
    top = os.fspath(root)
    try:
        root_fd = os.open(top, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself may be a link
    except FileNotFoundError:
        raise ImageError(f"{root}: no such root filesystem") from None
    except OSError as exc:
        raise ImageError(f"{root}: cannot read directory: {exc.strerror or exc}") from exc
    stack = [""]
    try:
        while stack:
            # Directories are opened relative to the root and scanned by descriptor, so each
            # entry's lstat looks up one name, not the whole path.
            prefix = stack.pop()
            try:
                fd = os.open(prefix[:-1], _DIR_FLAGS, dir_fd=root_fd) if prefix else root_fd
                it = os.scandir(fd)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed or replaced while walking: reported as gone
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # replaced by a symbolic link while walking
                raise ImageError(
                    f"{top}/{prefix}: cannot read directory: {exc.strerror or exc}"
                ) from exc
            try:
                with it:
                    for entry in it:
                        rel = prefix + entry.name
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        except OSError as exc:
                            why = exc.strerror or exc
                            raise ImageError(f"{top}/{rel}: cannot stat: {why}") from exc
                        mode = st.st_mode
                        if isdir(mode):
                            if (writable and rel in writable) or (excluded and excluded(rel, True)):
                                continue
                            stack.append(rel + "/")
                        elif (writable and rel in writable) or (excluded and excluded(rel, False)):
                            continue
                        add_name(rel)
                        if records:
                            add_record(
                                pack(st.st_size, st.st_mtime_ns, mode, st.st_ino, st.st_ctime_ns)
                            )
                        else:
                            add_mode(mode)
                            add_size(st.st_size)
                        if on_file is not None and isreg(mode):
                            on_file(rel, st.st_size)
            finally:
                if fd != root_fd:
                    os.close(fd)
    finally:
        os.close(root_fd)
    return tree


# --- comparing paths with the manifest -------------------------------------------------------


def _type_name(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "unknown"


def _mode_text(mode: int) -> str:
    return f"{mode:04o}"


class _Judge:
    """Compares tree paths with one manifest; collects findings and hashing jobs."""

    def __init__(
        self,
        root: Path,
        manifest: Mapping[str, FileEntry],
        instance: str,
        paths: PathFilter,
        read_only: bool,
    ) -> None:
        self.root = os.fspath(root)
        self.expect: dict[str, RawEntry] = FileIndex.of(manifest).raw
        """In-image path -> (type, mode, size, sha256, target)."""
        self.instance = instance
        self.paths = paths
        self.read_only = read_only
        self.findings: list[Finding] = []
        self.jobs: list[tuple[int, str, str]] = []
        """(size, rel, expected hex) of files whose content must be hashed."""
        self.checked = 0
        self.known = 0
        """Paths checked that the manifest has."""
        self._dir_skipped: dict[str, bool] = {"": "" in paths.writable}

    def finding(self, rel: str, change: Change, expected: str | None, actual: str | None) -> None:
        self.findings.append(
            Finding(FINDING_KIND, self.instance, "/" + rel, expected, actual, change)
        )

    def _resolve(self, entry: RawEntry) -> RawEntry | None:
        """The regular-file entry a hard link entry stands for."""
        for _ in range(_MAX_LINK_HOPS):
            if entry[0] != "hardlink":
                return entry if entry[0] == "file" else None
            target = self.expect.get(entry[4] or "")
            if target is None:
                return None
            entry = target
        return None

    def expected_mode(self, kind: str, mode: int) -> int:
        if not self.read_only:
            return mode & 0o7777
        # What castiron.images.rootfs.make_read_only leaves: only "executable or not" survives.
        if kind == "dir":
            return 0o555
        return 0o555 if mode & 0o111 else 0o444

    def check(self, rel: str, st_mode: int, size: int) -> None:
        """Compare one present path; files whose content must be read become jobs."""
        self.checked += 1
        entry = self.expect.get("/" + rel)
        actual_type = "file" if stat.S_ISREG(st_mode) else _type_name(st_mode)
        if entry is None:
            self.finding(rel, "added", None, actual_type)
            return
        self.known += 1
        kind = entry[0]
        resolved: RawEntry | None = entry
        if kind == "hardlink":
            resolved, kind = self._resolve(entry), "file"
        if actual_type != kind:
            self.finding(rel, "type", kind, actual_type)
            return
        if kind == "symlink":
            try:
                target = os.readlink(os.path.join(self.root, rel))
            except FileNotFoundError:
                self.finding(rel, "removed", kind, None)
                return
            except OSError as exc:
                raise ImageError(f"{self.root}/{rel}: cannot read link: {exc.strerror}") from exc
            if target != entry[4]:
                self.finding(rel, "target", entry[4], target)
            return
        if resolved is None:  # a hard link to nothing the manifest knows: nothing to expect
            return
        want = self.expected_mode(resolved[0], resolved[1])
        have = st_mode & 0o7777
        if want != have:
            self.finding(rel, "mode", _mode_text(want), _mode_text(have))
        if kind == "file" and resolved[3] is not None:
            self.jobs.append((size, rel, resolved[3]))

    def skipped(self, rel: str, is_dir: bool) -> bool:
        """True when ``rel`` or one of its parent directories is skipped by the filter."""
        return self.paths.skips(rel, is_dir) or self._parent_skipped(posixpath.dirname(rel))

    def _parent_skipped(self, parent: str) -> bool:
        known = self._dir_skipped.get(parent)
        if known is None:
            known = self.paths.skips(parent, True) or self._parent_skipped(
                posixpath.dirname(parent)
            )
            self._dir_skipped[parent] = known
        return known

    def removed(self, rel: str) -> None:
        """``rel`` is not in the tree: a finding when the manifest has it and it is not skipped."""
        entry = self.expect.get("/" + rel)
        if entry is not None and not self.skipped(rel, entry[0] == "dir"):
            self.finding(rel, "removed", entry[0], None)

    def hashed(self, rel: str, expected: str, actual: str) -> None:
        if actual != expected:
            self.finding(rel, "content", expected, actual)

    def result(self, entries: int, hashed_files: int, hashed_bytes: int) -> ScanResult:
        stats = ScanStats(entries, self.checked, hashed_files, hashed_bytes)
        return ScanResult(_collapse(self.findings), stats)


def _collapse(findings: list[Finding]) -> tuple[Finding, ...]:
    """Fold findings below an added, removed or retyped directory into that one finding.

    ``rm -r /app/lib`` is one finding ("dir (120 entries inside)"), not 121.
    """
    folding = {
        f.path: f
        for f in findings
        if (f.change in ("added", "removed") and "dir" in (f.expected, f.actual))
        or (f.change == "type" and "dir" in (f.expected, f.actual))
    }
    inside: dict[str, int] = {}
    kept: list[Finding] = []
    for f in findings:
        parent, top = posixpath.dirname(f.path), None
        while parent != "/" and parent:
            if parent in folding:
                top = parent  # keep climbing: the outermost folding directory wins
            parent = posixpath.dirname(parent)
        if top is None:
            kept.append(f)
        else:
            inside[top] = inside.get(top, 0) + 1
    out: list[Finding] = []
    for f in kept:
        count = inside.get(f.path)
        if count:
            note = f"dir ({count} entries inside)"
            f = replace(f, actual=note) if f.actual == "dir" else replace(f, expected=note)
        out.append(f)
    return tuple(sorted(out, key=lambda f: (f.path.split("/"), f.change)))


# --- hashing ---------------------------------------------------------------------------------


_SHA256 = hashlib.sha256()
"""An empty hash that every file's hash copies (no algorithm lookup, and none of its locks,
in a forked worker)."""


def _hash_each(root: str, items: Iterable[tuple[_T, str]]) -> Iterator[tuple[_T, bytes, int, int]]:
    """Hash the files ``(tag, rel)`` of ``items`` with one reused buffer; yields ``(tag,
    digest, bytes read, errno)`` per file (errno 0 when it was read; else the digest is empty).
    """
    buf = bytearray(HASH_BUFFER)
    view, bufs = memoryview(buf), [buf]
    readv, fresh = os.readv, _SHA256.copy
    for tag, rel in items:
        read, digest, error = 0, b"", 0
        try:
            fd = os.open(f"{root}/{rel}", _OPEN_FLAGS)
        except OSError as exc:
            yield tag, b"", 0, exc.errno or errno.EIO
            continue
        try:
            h = fresh()
            while n := readv(fd, bufs):
                h.update(view[:n])
                read += n
            digest = h.digest()
        except OSError as exc:
            error = exc.errno or errno.EIO
        finally:
            os.close(fd)
        yield tag, digest, read, error


def _actual(digest: bytes, error: int) -> str:
    """What a finding says a file holds: its digest, or why it could not be read."""
    return f"unreadable ({os.strerror(error)})" if error else "sha256:" + digest.hex()


def _hash_files(root: str, jobs: Iterator[tuple[int, str, str]]) -> list[tuple[str, str, int]]:
    """Hash files taken from ``jobs`` (shared between threads).

    Returns ``(rel, "sha256:<hex>" or why it could not be read, bytes read)`` per file.
    """
    items = ((rel, rel) for _size, rel, _expected in jobs)
    return [(rel, _actual(d, error), read) for rel, d, read, error in _hash_each(root, items)]


_SLOT = struct.Struct("<32sqi")
"""One file's result in a pool's shared memory: digest, bytes read, state (see below)."""
_PENDING, _DONE = 0, 1
"""Slot states; a negative state is ``-errno`` of a file that could not be read."""
_BATCH = struct.Struct("<IIII")
"""One queue message: start and end of its paths in the arena, first file index, count."""
_BATCH_BYTES = 1 << 20
"""A batch closes at this many bytes of files (or :data:`_BATCH_FILES` files)."""
_BATCH_FILES = 256
_ARENA_BYTES = 64 << 20
"""Shared memory for queued paths (reserved, touched only as used)."""
_MAX_FILES = 1 << 20
"""Files a pool takes at most; past that (or a full arena) this process hashes the rest."""


def _hash_into(
    root: str, rels: list[str], first: int, slots: mmap.mmap, wanted: Mapping[str, str] | None
) -> None:
    """Hash files ``rels`` (those in ``wanted``, when given) into slots ``first``, ``first+1``...

    The state is written after the digest, so a worker stopped half-way leaves it pending.
    """
    pack, size, done = _SLOT.pack_into, _SLOT.size, _DONE.to_bytes(4, "little")
    items: Iterable[tuple[int, str]] = enumerate(rels, first)
    if wanted is not None:
        items = ((index, rel) for index, rel in enumerate(rels, first) if rel in wanted)
    for index, digest, read, error in _hash_each(root, items):
        offset = index * size
        if error:
            pack(slots, offset, b"", read, -error)
        else:
            pack(slots, offset, digest, read, _PENDING)
            slots[offset + 40 : offset + 44] = done


class _HashPool:
    """Worker processes that hash the files a walk finds, while it goes on.

    Processes, not threads: the per-file work around each hash (open, read, bookkeeping) holds
    the GIL, which caps threads at about 1.2x one core on small files. The workers are forked
    before the walk; it queues batches of about 1 MiB of files as it finds them (paths in
    shared memory, a fixed-size message per batch on one pipe, which every reader takes whole).
    Results land in shared memory, one slot per file. This process joins in once it has loaded
    the manifest and compared every path, taking batches from the same queue (hashing only the
    files the comparison wants), so all finish together.
    """

    def __init__(self, root: str, workers: int) -> None:
        self.root = root
        self.index: dict[str, int] = {}
        """Path -> slot of every file queued (or kept here)."""
        self.kept: list[tuple[int, list[str]]] = []
        """Batches the queue had no room for: this process hashes them."""
        self.used = 0
        self.batch: list[str] = []
        self.batch_bytes = 0
        self.children: list[int] = []
        self.arena = mmap.mmap(-1, _ARENA_BYTES)
        try:
            self.slots = mmap.mmap(-1, _MAX_FILES * _SLOT.size)
        except BaseException:
            self.arena.close()
            raise
        self.queue_r = self.queue_w = -1
        try:
            self.queue_r, self.queue_w = os.pipe()
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(self.queue_w, fcntl.F_SETPIPE_SZ, 1 << 20)
            os.set_blocking(self.queue_w, False)
            for _ in range(workers):
                self.children.append(self._fork())
        except BaseException:
            self.abandon()
            self.close()
            raise

    def _fork(self) -> int:
        pid = os.fork()
        if pid == 0:  # a worker: hash queued batches until the queue ends, exit without cleanup
            code = 1
            try:
                os.close(self.queue_w)
                while message := os.read(self.queue_r, _BATCH.size):
                    start, end, first, _ = _BATCH.unpack(message)
                    rels = self.arena[start:end].decode("utf-8", "surrogateescape").split("\0")
                    _hash_into(self.root, rels, first, self.slots, None)
                code = 0
            finally:
                os._exit(code)
        return pid

    def add(self, rel: str, size: int) -> None:
        """Queue a regular file found by the walk (batched)."""
        self.batch.append(rel)
        self.batch_bytes += size
        if self.batch_bytes >= _BATCH_BYTES or len(self.batch) >= _BATCH_FILES:
            self.flush()

    def flush(self) -> None:
        """Queue the current batch; keep it here when shared memory or the queue is full."""
        rels, self.batch, self.batch_bytes = self.batch, [], 0
        if not rels:
            return
        first = len(self.index)
        if first + len(rels) > _MAX_FILES:
            self.kept.append((-1, rels))
            return
        for offset, rel in enumerate(rels, first):
            self.index[rel] = offset
        data = "\0".join(rels).encode("utf-8", "surrogateescape")
        start = self.used
        if start + len(data) <= _ARENA_BYTES:
            self.arena[start : start + len(data)] = data
            try:
                os.write(self.queue_w, _BATCH.pack(start, start + len(data), first, len(rels)))
            except BlockingIOError:
                pass
            else:
                self.used += len(data)
                return
        self.kept.append((first, rels))

    def close_queue(self) -> None:
        """The walk is over: queue the last batch and let workers see the end of the queue."""
        self.flush()
        os.close(self.queue_w)
        self.queue_w = -1

    def finish(self, wanted: Mapping[str, str]) -> tuple[int, int, list[tuple[str, str]]]:
        """Help hash what is left, wait for the workers, and compare every path of ``wanted``
        (path -> expected hex digest); returns files and bytes hashed, and ``(path, actual
        digest or why unreadable)`` for every file whose content differs."""
        root, slots = self.root, self.slots
        for first, rels in self.kept:
            if first >= 0:
                _hash_into(root, rels, first, slots, wanted)
        while message := os.read(self.queue_r, _BATCH.size):
            start, end, first, _ = _BATCH.unpack(message)
            rels = self.arena[start:end].decode("utf-8", "surrogateescape").split("\0")
            _hash_into(root, rels, first, slots, wanted)
        self._reap()
        unpack, size, index = _SLOT.unpack_from, _SLOT.size, self.index
        files = total = 0
        differ: list[tuple[str, str]] = []
        late: list[tuple[int, str, str]] = []
        for rel, want in wanted.items():
            slot = index.get(rel)
            if slot is None:
                late.append((0, rel, want))
                continue
            digest, read, state = unpack(slots, slot * size)
            if state == _DONE:
                if digest.hex() != want:
                    differ.append((rel, "sha256:" + digest.hex()))
            elif state < 0:
                differ.append((rel, _actual(b"", -state)))
            else:  # kept past the pool's room, or a worker stopped before it: hash it here
                late.append((0, rel, want))
                continue
            files += 1
            total += read
        for rel, actual, read in _hash_files(root, iter(late)):
            files += 1
            total += read
            if actual != "sha256:" + wanted[rel]:
                differ.append((rel, actual))
        return files, total, differ

    def _reap(self) -> None:
        while self.children:
            pid = self.children.pop()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def abandon(self) -> None:
        """Stop every worker (after an error: never leave one behind)."""
        for pid in self.children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self._reap()

    def close(self) -> None:
        """Release the queue and the shared memory (workers are gone by now)."""
        for fd in (self.queue_r, self.queue_w):
            if fd != -1:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.queue_r = self.queue_w = -1
        self.arena.close()
        self.slots.close()


def _start_pool(root: str, threads: int) -> _HashPool | None:
    """``threads - 1`` worker processes, or ``None`` (one thread, no ``fork``, or the system
    refused a process or shared memory: threads then do the work)."""
    if threads <= 1 or not hasattr(os, "fork"):
        return None
    try:
        return _HashPool(root, threads - 1)
    except OSError:
        return None


def _run_jobs(judge: _Judge, threads: int, pool: _HashPool | None = None) -> tuple[int, int]:
    """Hash every job of ``judge`` and record mismatches; returns counters.

    One worker hashes in walk order (neighbouring files, warm directory entries); threads
    take the largest files first, so that they finish together.
    """
    expected = {rel: want for _, rel, want in judge.jobs}
    if pool is not None:
        files, total, differ = pool.finish(expected)
        for rel, actual in differ:
            judge.hashed(rel, "sha256:" + expected[rel], actual)
        return files, total
    if not expected:
        return 0, 0
    elif threads <= 1 or len(expected) == 1:
        parts = [_hash_files(judge.root, iter(judge.jobs))]
    else:
        shared = iter(sorted(judge.jobs, key=_size_of, reverse=True))  # next() holds the GIL
        count = min(threads, len(expected))
        from concurrent.futures import ThreadPoolExecutor  # only where there is no fork

        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="fsdrift") as pool_:
            futures = [pool_.submit(_hash_files, judge.root, shared) for _ in range(count)]
            parts = [f.result() for f in futures]
    files = total = 0
    for part in parts:
        for rel, actual, read in part:
            files += 1
            total += read
            judge.hashed(rel, "sha256:" + expected[rel], actual)
    return files, total


def _size_of(job: tuple[int, str, str]) -> int:
    return job[0]


# --- the two scans ---------------------------------------------------------------------------


def scan_full(
    root: Path,
    manifest: ManifestSource,
    *,
    instance: str,
    paths: PathFilter | None = None,
    threads: int = 1,
    read_only: bool = True,
) -> ScanResult:
    """Compare every path under ``root`` with ``manifest``, re-hashing every regular file.

    ``manifest`` may be a callable that loads it: with several workers it is then loaded while
    they already hash. ``read_only`` expects the modes
    :func:`castiron.images.rootfs.make_read_only` leaves (directories ``0555``, files ``0555``
    or ``0444``); without it, the manifest's modes as recorded. ``threads`` workers hash files
    in parallel, largest first (forked processes where the OS has fork, threads elsewhere; pass
    ``os.cpu_count()`` to use every core).

    Raises:
        ImageError: when ``root`` or a directory or link in it cannot be read.
    """
    paths = paths or PathFilter()
    pool = _start_pool(os.fspath(root), threads)
    try:
        tree = _walk(root, paths, records=False, on_file=pool.add if pool else None)
        if pool is not None:
            pool.close_queue()
        entries = manifest() if callable(manifest) else manifest
        judge = _Judge(root, entries, instance, paths, read_only)
        check = judge.check
        for rel, mode, size in zip(tree.names, tree.modes, tree.sizes, strict=True):
            check(rel, mode, size)
        if judge.known < len(judge.expect) - ("/" in judge.expect):  # something is gone
            present = set(tree.names)
            for path in judge.expect:
                rel = path.lstrip("/")
                if rel and rel not in present:  # the root itself is never an entry
                    judge.removed(rel)
        files, total = _run_jobs(judge, threads, pool)
    except BaseException:
        if pool is not None:
            pool.abandon()
        raise
    finally:
        if pool is not None:
            pool.close()
    return judge.result(len(tree.names), files, total)


def scan_fast(
    root: Path,
    manifest: ManifestSource,
    baseline: Path,
    *,
    instance: str,
    paths: PathFilter | None = None,
    read_only: bool = True,
) -> ScanResult:
    """Compare ``root`` with the ``baseline`` taken when the instance started; only paths
    whose stat tuple changed, appeared or vanished are compared with ``manifest`` (and only
    their files re-hashed). ``manifest`` may be a function: it is called only then.

    The baseline certifies the tree as it was when taken (right after unpacking, whose layer
    digests were verified); :func:`scan_full` checks everything regardless.

    Raises:
        NotFoundError: when ``baseline`` does not exist.
        StateError: when ``baseline`` cannot be read.
        StateCorruptError: when ``baseline`` is not a baseline file or is damaged.
        ImageError: when ``root`` or a directory or link in it cannot be read.
    """
    paths = paths or PathFilter()
    base_names, base_blob = _read_baseline(baseline)
    tree = _walk(root, paths)
    if tree.names == base_names and b"".join(tree.records) == base_blob:
        return ScanResult((), ScanStats(entries=len(tree.names)))
    size = _RECORD.size
    base = {name: base_blob[i * size : (i + 1) * size] for i, name in enumerate(base_names)}
    changed: list[int] = []
    for i, (name, record) in enumerate(zip(tree.names, tree.records, strict=True)):
        if base.pop(name, None) != record:
            changed.append(i)
    judge = _Judge(root, manifest() if callable(manifest) else manifest, instance, paths, read_only)
    unpack = _RECORD.unpack
    for i in changed:
        st_size, _, mode, _, _ = unpack(tree.records[i])
        judge.check(tree.names[i], mode, st_size)
    for rel in base:  # in the baseline, gone from the tree (or skipped now)
        judge.removed(rel)
    files, total = _run_jobs(judge, 1)
    return judge.result(len(tree.names), files, total)


# --- the baseline file -----------------------------------------------------------------------


def _fs_now(fd: int) -> int:
    """The filesystem's current timestamp (coarse, as it stamps ctimes), via ``fd``."""
    os.utime(fd)
    return os.fstat(fd).st_mtime_ns


def take_baseline(root: Path, out: Path, *, paths: PathFilter | None = None) -> int:
    """Record the stat tuple of every path under ``root`` in ``out`` (written atomically);
    returns the number of paths recorded. Take it when the instance starts, right after its
    root filesystem was unpacked, with the same ``paths`` filter the scans will use.

    A path whose ctime falls in the clock tick the walk started in (or later) could change
    again without its ctime moving; it is recorded so that every fast scan re-checks it.

    Raises:
        ImageError: when ``root`` or a directory in it cannot be read.
        StateError: when ``out`` cannot be written.
    """
    paths = paths or PathFilter()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        make_private_dir(out.parent)
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    except OSError as exc:
        raise StateError(f"{out}: cannot write the baseline: {exc.strerror or exc}") from exc
    try:
        # Wait for the filesystem clock to tick once, so that everything changed before
        # this call has a ctime strictly before ``start``.
        first = start = _fs_now(fd)
        deadline = time.monotonic() + 1.0
        while start == first and time.monotonic() < deadline:
            time.sleep(0.001)
            start = _fs_now(fd)
        tree = _walk(root, paths)
        unpack, pack = _RECORD.unpack, _RECORD.pack
        records = tree.records
        for i, record in enumerate(records):
            size, mtime, mode, ino, ctime = unpack(record)
            if ctime >= start:
                records[i] = pack(size, mtime, mode, ino, _RACY)
        names = "\0".join(tree.names).encode("utf-8", "surrogateescape")
        body = _MAGIC + _HEADER.pack(len(tree.names), len(names)) + names + b"".join(records)
        data = body + hashlib.sha256(body).digest()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except OSError as exc:
        raise StateError(f"{out}: cannot write the baseline: {exc.strerror or exc}") from exc
    finally:
        if fd != -1:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    return len(tree.names)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read_baseline(path: Path) -> tuple[list[str], bytes]:
    """The path list and the packed records of a baseline file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"{path}: no filesystem baseline (take one when the instance starts, or scan in full)"
        ) from None
    except OSError as exc:
        raise StateError(f"{path}: cannot read the baseline: {exc.strerror or exc}") from exc
    fixed = len(_MAGIC) + _HEADER.size
    if not data.startswith(_MAGIC) or len(data) < fixed + 32:
        raise StateCorruptError(f"{path}: not a castiron filesystem baseline")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateCorruptError(f"{path}: the baseline is damaged (checksum mismatch)")
    count, names_len = _HEADER.unpack_from(data, len(_MAGIC))
    if fixed + names_len + count * _RECORD.size != len(body):
        raise StateCorruptError(f"{path}: the baseline is damaged (bad lengths)")
    names_blob = body[fixed : fixed + names_len]
    names = names_blob.decode("utf-8", "surrogateescape").split("\0") if count else []
    if len(names) != count:
        raise StateCorruptError(f"{path}: the baseline is damaged (bad path list)")
    return names, body[fixed + names_len :]


__all__ = [
    "FINDING_KIND",
    "HASH_BUFFER",
    "Change",
    "Finding",
    "ManifestSource",
    "PathFilter",
    "ScanResult",
    "ScanStats",
    "scan_fast",
    "scan_full",
    "take_baseline",
]
