"""Safe unpacking of image layers (tar, optionally gzip) into a root filesystem directory.

This module owns the rules that keep a hostile layer inside its target directory: which entry
names, types and links are accepted, how OCI whiteouts are applied, and the size and count
limits. It streams every layer (never holding one in memory) and writes only through directory
file descriptors opened with ``O_NOFOLLOW``, so no symlink is ever followed while writing.

Rules (docs/unpacking.md explains each one):

- names must be relative, non-empty, without ``..`` components or NUL bytes, and within the
  name, component and depth limits; ``.`` and ``./`` (the root itself) are ignored when they are
  directories and refused otherwise; the root directory is never replaced or chmod-ed;
- a symlink (or a non-directory) in the *parent* path of an entry is refused, whether it came
  from this layer or a lower one: entries are never written through symlinks;
- symlinks are stored verbatim and may point anywhere; they are never followed;
- hard links must name an existing regular file inside the root, reached without symlinks;
- character and block devices, FIFOs, contiguous and sparse files and unknown types are refused;
- setuid and setgid bits are dropped, and the sticky bit on anything but directories;
- ``.wh.NAME`` removes NAME from lower layers and ``.wh..wh..opq`` hides a directory's
  lower-layer contents, as the OCI image-spec layer rules say; whiteouts never touch entries of
  the same layer;
- owners are applied only when asked (``preserve_owner=True``) and running as root; extended
  attributes (including file capabilities) are never applied.

It knows nothing of the OCI store, manifests, or runtimes: callers hand it byte streams.
"""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from castiron.errors import ImageError, UnsafeArchiveError

GiB = 1024**3
MiB = 1024**2

WHITEOUT_PREFIX = ".wh."
"""A layer entry ``DIR/.wh.NAME`` deletes ``DIR/NAME`` of lower layers."""

OPAQUE_WHITEOUT = ".wh..wh..opq"
"""A layer entry ``DIR/.wh..wh..opq`` hides every lower-layer entry inside ``DIR``."""

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = MiB
_MAX_COMPONENT_BYTES = 255
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_META_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)
_REFUSED_TYPES = {
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}
# A bad checksum or a cut-off block: tarfile would take either as the end of the archive.
_CORRUPT_HEADER_ERRORS: tuple[type[Exception], ...] = (
    tarfile.InvalidHeaderError,  # type: ignore[attr-defined]
    tarfile.TruncatedHeaderError,  # type: ignore[attr-defined]
)
# Errors the tar and gzip readers raise on malformed input (never on our own writes).
_READ_ERRORS = (
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    UnicodeError,
    ValueError,
    OverflowError,
    RecursionError,
)


@dataclass(frozen=True)
class UnpackLimits:
    """Caps that bound what one unpack may write; exceeding one refuses the entry."""

    max_total_bytes: int = 8 * GiB
    """Sum of the declared sizes of all entries, over every layer of one call."""
    max_entries: int = 1_000_000
    """Number of entries (files, directories, links, whiteouts), over every layer of one call."""
    max_name_bytes: int = 4096
    """Length of an entry name or link target, in bytes (UTF-8)."""
    max_depth: int = 256
    """Number of path components of an entry name."""
    max_header_bytes: int = 1 * MiB
    """Size of one PAX or GNU long-name header (these are read into memory)."""


@dataclass(frozen=True)
class UnpackStats:
    """What an unpack wrote."""

    entries: int = 0
    """Entries read, including whiteouts and ignored root entries."""
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    whiteouts: int = 0
    """Whiteout entries applied (``.wh.NAME`` and opaque markers)."""
    bytes: int = 0
    """Bytes of regular file content written."""

    def __add__(self, other: UnpackStats) -> UnpackStats:
        return UnpackStats(
            entries=self.entries + other.entries,
            files=self.files + other.files,
            directories=self.directories + other.directories,
            symlinks=self.symlinks + other.symlinks,
            hardlinks=self.hardlinks + other.hardlinks,
            whiteouts=self.whiteouts + other.whiteouts,
            bytes=self.bytes + other.bytes,
        )


def unpack_layer(
    fileobj: BinaryIO,
    root: Path,
    *,
    limits: UnpackLimits | None = None,
    compressed: bool | None = None,
    preserve_owner: bool = False,
) -> UnpackStats:
    """Apply one layer (a tar stream, gzip-compressed or not) on top of the tree at ``root``.

    ``root`` is created when missing. ``compressed=None`` detects gzip by its magic bytes.
    On error, ``root`` may hold part of the layer (never anything outside it): unpack into a
    fresh directory, or use :func:`unpack_rootfs`, when that matters.

    Raises:
        UnsafeArchiveError: an entry is refused or a limit is exceeded (``entry`` names it).
        ImageError: the stream is not a valid (gzip) tar, or writing below ``root`` failed.
    """
    return unpack_layers(
        [fileobj], root, limits=limits, compressed=compressed, preserve_owner=preserve_owner
    )


def unpack_layers(
    layers: Iterable[BinaryIO],
    root: Path,
    *,
    limits: UnpackLimits | None = None,
    compressed: bool | None = None,
    preserve_owner: bool = False,
) -> UnpackStats:
    """Apply ``layers`` in order (lowest first) on top of ``root``; limits span all layers.

    Raises:
        UnsafeArchiveError: an entry is refused or a limit is exceeded (``entry`` names it).
        ImageError: a layer is not a valid (gzip) tar, or writing below ``root`` failed.
    """
    budget = _Budget(limits or UnpackLimits())
    chown = preserve_owner and os.geteuid() == 0
    try:
        root.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"cannot open unpack target {root}: {exc.strerror or exc}") from exc
    total = UnpackStats()
    try:
        for index, layer in enumerate(layers):
            total = total + _Layer(root, root_fd, budget, chown, index).apply(layer, compressed)
    finally:
        os.close(root_fd)
    return total


def unpack_rootfs(
    layers: Iterable[BinaryIO],
    dest: Path,
    *,
    limits: UnpackLimits | None = None,
    compressed: bool | None = None,
    preserve_owner: bool = False,
) -> UnpackStats:
    """Unpack ``layers`` into a new directory ``dest``, atomically: all of it or nothing.

    The tree is built in a temporary sibling of ``dest`` and renamed into place; on any error
    the temporary tree is removed and ``dest`` does not appear.

    Raises:
        ImageError: ``dest`` already exists, or as :func:`unpack_layers`.
        UnsafeArchiveError: as :func:`unpack_layers`.
    """
    if dest.exists() or dest.is_symlink():
        raise ImageError(f"cannot unpack into {dest}: it already exists")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
        os.chmod(work, 0o755)
    except OSError as exc:
        raise ImageError(f"cannot create a directory beside {dest}: {exc.strerror or exc}") from exc
    try:
        stats = unpack_layers(
            layers, work, limits=limits, compressed=compressed, preserve_owner=preserve_owner
        )
        try:
            os.rename(work, dest)
        except OSError as exc:
            raise ImageError(
                f"cannot move the unpacked tree to {dest}: {exc.strerror or exc}"
            ) from exc
    except BaseException:
        _remove_tree(work)
        raise
    return stats


class _Budget:
    """Counters shared by the layers of one call (local to that call)."""

    def __init__(self, limits: UnpackLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def take(self, entry: str, size: int) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise UnsafeArchiveError(
                f"layer entry {entry!r}: more than {self.limits.max_entries} entries", entry=entry
            )
        if size < 0 or self.bytes + size > self.limits.max_total_bytes:
            raise UnsafeArchiveError(
                f"layer entry {entry!r}: declared size {size} bytes exceeds the limit of "
                f"{self.limits.max_total_bytes} bytes in total",
                entry=entry,
            )
        self.bytes += size


class _Blocked(Exception):
    """A parent path component is a symlink or not a directory (internal signal)."""

    def __init__(self, prefix: tuple[str, ...], kind: str) -> None:
        super().__init__(prefix, kind)
        self.prefix = prefix
        self.kind = kind


class _Layer:
    """The state of applying one layer: the paths it wrote and the directory modes to set."""

    def __init__(self, root: Path, root_fd: int, budget: _Budget, chown: bool, index: int):
        self.root = root
        self.root_fd = root_fd
        self.budget = budget
        self.limits = budget.limits
        self.chown = chown
        self.index = index
        self.paths: set[tuple[str, ...]] = set()
        self._cached: tuple[tuple[str, ...], int] | None = None
        self.dirs: dict[tuple[str, ...], tarfile.TarInfo] = {}
        self.counts = {
            "files": 0,
            "directories": 0,
            "symlinks": 0,
            "hardlinks": 0,
            "whiteouts": 0,
            "bytes": 0,
            "entries": 0,
        }

    # --- reading ------------------------------------------------------------------------------

    def apply(self, fileobj: BinaryIO, compressed: bool | None) -> UnpackStats:
        stream = self._decompressed(fileobj, compressed)
        tar_info = _guarded_tarinfo(self.limits.max_header_bytes)
        try:
            with tarfile.open(
                fileobj=stream,
                mode="r|",
                tarinfo=tar_info,
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar:
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    # Streaming: tarfile would otherwise keep every header in memory.
                    vars(tar)["members"].clear()
                    self._entry(tar, member)
        except _READ_ERRORS as exc:
            raise ImageError(f"layer {self.index} is not a valid tar stream: {exc}") from exc
        finally:
            self._forget()
        self._finish_dirs()
        return UnpackStats(**self.counts)

    def _decompressed(self, fileobj: BinaryIO, compressed: bool | None) -> BinaryIO:
        try:
            head = fileobj.read(4)
        except OSError as exc:
            raise ImageError(f"cannot read layer {self.index}: {exc}") from exc
        stream: BinaryIO = io.BufferedReader(_Prefixed(head, fileobj), _CHUNK)
        is_gzip = head[:2] == _GZIP_MAGIC
        if compressed is None:
            if head == _ZSTD_MAGIC:
                raise ImageError(f"layer {self.index} is zstd-compressed, which is not supported")
            compressed = is_gzip
        if not compressed:
            return stream
        if not is_gzip:
            raise ImageError(f"layer {self.index} was expected to be gzip-compressed but is not")
        return gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[return-value]

    # --- one entry --------------------------------------------------------------------------------

    def _entry(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        name = info.name
        self.budget.take(name, info.size)
        self.counts["entries"] += 1
        parts = _entry_parts(name, self.limits, what="name", entry=name)
        kind = _REFUSED_TYPES.get(info.type)
        if kind is None and info.sparse is not None:
            kind = "a sparse file"
        if kind is None and info.type not in (
            tarfile.REGTYPE,
            tarfile.AREGTYPE,
            tarfile.DIRTYPE,
            tarfile.SYMTYPE,
            tarfile.LNKTYPE,
        ):
            kind = f"an unsupported entry type {info.type!r}"
        if kind is not None:
            raise UnsafeArchiveError(f"layer entry {name!r} is {kind}", entry=name)
        if not parts:
            if info.type != tarfile.DIRTYPE:
                raise UnsafeArchiveError(
                    f"layer entry {name!r} would replace the root directory", entry=name
                )
            return  # the root itself: never replaced, never chmod-ed
        for part in parts[:-1]:
            if part.startswith(WHITEOUT_PREFIX):
                raise UnsafeArchiveError(
                    f"layer entry {name!r} has a whiteout {part!r} as a directory", entry=name
                )
        leaf = parts[-1]
        try:
            if leaf.startswith(WHITEOUT_PREFIX):
                self._whiteout(parts, name)
            elif info.type == tarfile.DIRTYPE:
                self._directory(parts, info, name)
            elif info.type == tarfile.SYMTYPE:
                self._symlink(parts, info, name)
            elif info.type == tarfile.LNKTYPE:
                self._hardlink(parts, info, name)
            else:
                self._file(tar, parts, info, name)
        except OSError as exc:
            raise ImageError(
                f"cannot unpack layer entry {name!r} into {self.root}: {exc.strerror or exc}"
            ) from exc

    def _parent(self, parts: tuple[str, ...], name: str, *, create: bool) -> int | None:
        """An fd of the entry's parent directory, refusing symlinks; None when missing.

        The last parent is kept open: entries of one directory usually come together. The
        cache is dropped whenever a directory may be removed (see :meth:`_remove`).
        """
        key = parts[:-1]
        if self._cached is not None and self._cached[0] == key:
            return os.dup(self._cached[1])
        try:
            fd = _open_dir(self.root_fd, key, create=create)
        except _Blocked as blocked:
            raise _parent_refused(name, blocked) from None
        if fd is not None:
            self._forget()
            self._cached = (key, os.dup(fd))
        return fd

    def _forget(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _remove(self, dir_fd: int, name: str) -> None:
        """Remove ``name`` (a whole tree for a directory) without following links."""
        st = _lstat(dir_fd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            self._forget()
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _record(self, parts: tuple[str, ...]) -> None:
        for i in range(1, len(parts) + 1):
            self.paths.add(parts[:i])

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        target, opaque = _whiteout_target(parts, name)
        pfd = self._parent(parts, name, create=False)
        self.counts["whiteouts"] += 1
        if pfd is None:
            return  # nothing below to hide
        try:
            if opaque:
                self._forget()
                _prune_lower(pfd, parts[:-1], self.paths)
            elif (*parts[:-1], target) not in self.paths:
                self._remove(pfd, target)
        finally:
            os.close(pfd)

    def _directory(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        pfd = self._parent(parts, name, create=True)
        assert pfd is not None
        leaf = parts[-1]
        try:
            st = _lstat(pfd, leaf)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                os.unlink(leaf, dir_fd=pfd)
                st = None
            if st is None:
                os.mkdir(leaf, 0o755, dir_fd=pfd)
        finally:
            os.close(pfd)
        self._record(parts)
        self.dirs[parts] = info
        self.counts["directories"] += 1

    def _symlink(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        target = info.linkname
        _check_link_target(target, self.limits, name)
        pfd = self._parent(parts, name, create=True)
        assert pfd is not None
        leaf = parts[-1]
        try:
            self._remove(pfd, leaf)
            os.symlink(target, leaf, dir_fd=pfd)
            if self.chown:
                os.chown(leaf, info.uid, info.gid, dir_fd=pfd, follow_symlinks=False)
            os.utime(leaf, ns=_mtime_ns(info), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(pfd)
        self._record(parts)
        self.counts["symlinks"] += 1

    def _hardlink(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        target = _link_target(parts, info, self.limits, name)
        try:
            tfd = _open_dir(self.root_fd, target[:-1], create=False)
        except _Blocked as blocked:
            raise _link_refused(name, target, blocked) from None
        try:
            st = _lstat(tfd, target[-1]) if tfd is not None else None
            _check_link_source(name, target, _kind_of(st))
            pfd = self._parent(parts, name, create=True)
            assert pfd is not None and tfd is not None
            try:
                self._remove(pfd, parts[-1])
                os.link(
                    target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False
                )
            finally:
                os.close(pfd)
        finally:
            if tfd is not None:
                os.close(tfd)
        self._record(parts)
        self.counts["hardlinks"] += 1

    def _file(
        self, tar: tarfile.TarFile, parts: tuple[str, ...], info: tarfile.TarInfo, name: str
    ) -> None:
        source = tar.extractfile(info)
        if source is None:  # pragma: no cover - regular members always have a reader
            raise ImageError(f"cannot read layer entry {name!r}")
        pfd = self._parent(parts, name, create=True)
        assert pfd is not None
        leaf = parts[-1]
        try:
            self._remove(pfd, leaf)
            fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=pfd)
        finally:
            os.close(pfd)
        try:
            written = 0
            while chunk := _read(source, name):
                written += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            if written != info.size:
                raise ImageError(f"layer entry {name!r} is truncated")
            if self.chown:
                os.fchown(fd, info.uid, info.gid)
            os.fchmod(fd, info.mode & 0o777)
            os.utime(fd, ns=_mtime_ns(info))
        finally:
            os.close(fd)
        self._record(parts)
        self.counts["files"] += 1
        self.counts["bytes"] += written

    def _finish_dirs(self) -> None:
        """Set directory modes, owners and times once the layer's entries are all written."""
        for parts, info in self.dirs.items():
            try:
                fd = _open_dir(self.root_fd, parts, create=False)
            except _Blocked:
                continue  # replaced later in the layer
            if fd is None:
                continue
            try:
                if self.chown:
                    os.fchown(fd, info.uid, info.gid)
                os.fchmod(fd, info.mode & 0o1777)
                os.utime(fd, ns=_mtime_ns(info))
            except OSError as exc:
                raise ImageError(
                    f"cannot set the mode of {'/'.join(parts)!r} in {self.root}: "
                    f"{exc.strerror or exc}"
                ) from exc
            finally:
                os.close(fd)


_Node = dict[str, "_Node"] | str
"""A path of a dry run's tree: a directory (its children by name), ``file`` or ``symlink``."""


class _DryLayer(_Layer):
    """Applies one layer's rules to an in-memory tree: nothing is written anywhere.

    Every rule that depends on what lower layers left (a symlink in a parent path, a hard
    link's target, whiteouts) is judged against ``tree``, the names the layers so far made.
    The messages are the unpacker's own, so a refusal at import reads as it would at deploy.
    """

    def __init__(self, tree: dict[str, _Node], budget: _Budget, index: int) -> None:
        super().__init__(Path("."), -1, budget, False, index)
        self.tree = tree

    def _forget(self) -> None:
        pass

    def _finish_dirs(self) -> None:
        pass

    def _node_dir(self, key: tuple[str, ...], *, create: bool) -> dict[str, _Node] | None:
        node = self.tree
        for i, part in enumerate(key):
            child = node.get(part)
            if child is None:
                if not create:
                    return None
                child = node[part] = {}
            elif not isinstance(child, dict):
                kind = "a symlink" if child == "symlink" else "not a directory"
                raise _Blocked(key[: i + 1], kind)
            node = child
        return node

    def _dir_of(
        self, parts: tuple[str, ...], name: str, *, create: bool
    ) -> dict[str, _Node] | None:
        try:
            return self._node_dir(parts[:-1], create=create)
        except _Blocked as blocked:
            raise _parent_refused(name, blocked) from None

    def _whiteout(self, parts: tuple[str, ...], name: str) -> None:
        target, opaque = _whiteout_target(parts, name)
        node = self._dir_of(parts, name, create=False)
        self.counts["whiteouts"] += 1
        if node is None:
            return
        if opaque:
            _prune_lower_dry(node, parts[:-1], self.paths)
        elif (*parts[:-1], target) not in self.paths:
            node.pop(target, None)

    def _directory(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        node = self._dir_of(parts, name, create=True)
        assert node is not None
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = {}
        self._record(parts)
        self.counts["directories"] += 1

    def _symlink(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        _check_link_target(info.linkname, self.limits, name)
        node = self._dir_of(parts, name, create=True)
        assert node is not None
        node[parts[-1]] = "symlink"
        self._record(parts)
        self.counts["symlinks"] += 1

    def _hardlink(self, parts: tuple[str, ...], info: tarfile.TarInfo, name: str) -> None:
        target = _link_target(parts, info, self.limits, name)
        try:
            holder = self._node_dir(target[:-1], create=False)
        except _Blocked as blocked:
            raise _link_refused(name, target, blocked) from None
        found = None if holder is None else holder.get(target[-1])
        kind = None if found is None else "other" if isinstance(found, dict) else found
        _check_link_source(name, target, kind)
        node = self._dir_of(parts, name, create=True)
        assert node is not None
        node[parts[-1]] = "file"
        self._record(parts)
        self.counts["hardlinks"] += 1

    def _file(
        self, tar: tarfile.TarFile, parts: tuple[str, ...], info: tarfile.TarInfo, name: str
    ) -> None:
        source = tar.extractfile(info)
        if source is None:  # pragma: no cover - regular members always have a reader
            raise ImageError(f"cannot read layer entry {name!r}")
        node = self._dir_of(parts, name, create=True)
        assert node is not None
        read = 0
        while chunk := _read(source, name):
            read += len(chunk)
        if read != info.size:
            raise ImageError(f"layer entry {name!r} is truncated")
        node[parts[-1]] = "file"
        self._record(parts)
        self.counts["files"] += 1
        self.counts["bytes"] += read


def check_layers(
    layers: Iterable[BinaryIO],
    *,
    limits: UnpackLimits | None = None,
    compressed: bool | None = None,
) -> UnpackStats:
    """Apply every rule of :func:`unpack_layers` to ``layers`` (lowest first) without writing
    anything: the checks an import or a bake base needs before it accepts an image. Returns
    what an unpack would write.

    Raises:
        UnsafeArchiveError: an entry the unpacker would refuse (same message, ``entry`` names it).
        ImageError: a layer is not a valid (gzip) tar stream.
    """
    budget = _Budget(limits or UnpackLimits())
    tree: dict[str, _Node] = {}
    total = UnpackStats()
    for index, layer in enumerate(layers):
        total = total + _DryLayer(tree, budget, index).apply(layer, compressed)
    return total


# --- helpers ---------------------------------------------------------------------------------


class _Prefixed(io.RawIOBase):
    """A raw stream that replays ``head`` (already read for magic detection), then ``rest``."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        want = len(buffer)
        if self._head:
            n = min(want, len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(want)
        buffer[: len(data)] = data
        return len(data)


def _guarded_tarinfo(max_header_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses oversized metadata headers before they are read."""

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> GuardedTarInfo:
            try:
                info = super().frombuf(buf, encoding, errors)
            except _CORRUPT_HEADER_ERRORS as exc:
                # tarfile would silently end the archive here; a corrupt header is an error.
                raise tarfile.ReadError(f"corrupt tar header: {exc}") from None
            if info.type in _META_TYPES and info.size > max_header_bytes:
                raise UnsafeArchiveError(
                    f"layer entry {info.name!r}: a {info.size}-byte metadata header exceeds the "
                    f"limit of {max_header_bytes} bytes",
                    entry=info.name,
                )
            return info

    return GuardedTarInfo


def _read(source: IO[bytes], name: str) -> bytes:
    try:
        return source.read(_CHUNK)
    except _READ_ERRORS as exc:
        raise ImageError(f"cannot read layer entry {name!r}: {exc}") from exc


def _parent_refused(name: str, blocked: _Blocked) -> UnsafeArchiveError:
    where = "/".join(blocked.prefix)
    why = "; entries are never written through symlinks" if "symlink" in blocked.kind else ""
    return UnsafeArchiveError(
        f"layer entry {name!r}: its parent {where!r} is {blocked.kind}{why}", entry=name
    )


def _whiteout_target(parts: tuple[str, ...], name: str) -> tuple[str, bool]:
    """The name a whiteout entry hides, and whether it is the opaque marker."""
    leaf = parts[-1]
    target = leaf[len(WHITEOUT_PREFIX) :]
    opaque = leaf == OPAQUE_WHITEOUT
    if not opaque and (target in ("", ".", "..") or target.startswith(WHITEOUT_PREFIX)):
        raise UnsafeArchiveError(
            f"layer entry {name!r} is a whiteout of an invalid name {target!r}", entry=name
        )
    return target, opaque


def _check_link_target(target: str, limits: UnpackLimits, name: str) -> None:
    if not target or "\x00" in target or _nbytes(target) > limits.max_name_bytes:
        raise UnsafeArchiveError(
            f"layer entry {name!r} is a symlink with an empty, NUL-bearing or over-long target",
            entry=name,
        )


def _link_target(
    parts: tuple[str, ...], info: tarfile.TarInfo, limits: UnpackLimits, name: str
) -> tuple[str, ...]:
    target = _entry_parts(info.linkname, limits, what="hard link target", entry=name)
    if not target or target[: len(parts)] == parts:
        raise UnsafeArchiveError(
            f"layer entry {name!r} is a hard link to the root, itself or its own contents",
            entry=name,
        )
    return target


def _link_refused(name: str, target: tuple[str, ...], blocked: _Blocked) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"layer entry {name!r} is a hard link to {'/'.join(target)!r} through "
        f"{'/'.join(blocked.prefix)!r}, which is {blocked.kind}",
        entry=name,
    )


def _kind_of(st: os.stat_result | None) -> str | None:
    if st is None:
        return None
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "symlink" if stat.S_ISLNK(st.st_mode) else "other"


def _check_link_source(name: str, target: tuple[str, ...], kind: str | None) -> None:
    """Refuse a hard link whose target (of ``kind``: file, symlink, other) is no regular file."""
    where = "/".join(target)
    if kind is None:
        raise UnsafeArchiveError(
            f"layer entry {name!r} is a hard link to {where!r}, which does not exist", entry=name
        )
    if kind != "file":
        what = "a symlink" if kind == "symlink" else "not a regular file"
        raise UnsafeArchiveError(
            f"layer entry {name!r} is a hard link to {where!r}, which is {what}", entry=name
        )


def _prune_lower_dry(
    node: dict[str, _Node], dir_parts: tuple[str, ...], layer: set[tuple[str, ...]]
) -> None:
    """The dry run's :func:`_prune_lower`: drop every name below ``node`` the layer did not make."""
    stack = [(node, dir_parts)]
    while stack:
        current, parts = stack.pop()
        for name in sorted(current):
            child = (*parts, name)
            if child not in layer:
                del current[name]
            elif isinstance(current[name], dict):
                sub = current[name]
                assert isinstance(sub, dict)
                stack.append((sub, child))


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def _entry_parts(value: str, limits: UnpackLimits, *, what: str, entry: str) -> tuple[str, ...]:
    """The normalised components of a name; ``()`` for the root. Refuses unsafe names."""

    def refuse(reason: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"layer entry {entry!r}: {what} {value!r} {reason}", entry=entry)

    if not value:
        raise refuse("is empty")
    if "\x00" in value:
        raise refuse("contains a NUL byte")
    try:
        size = _nbytes(value)
    except UnicodeError:
        raise refuse("is not valid UTF-8") from None
    if size > limits.max_name_bytes:
        raise refuse(f"is longer than {limits.max_name_bytes} bytes")
    if value.startswith("/"):
        raise refuse("is absolute")
    parts = tuple(p for p in value.split("/") if p not in ("", "."))
    if ".." in parts:
        raise refuse("has a '..' component")
    if len(parts) > limits.max_depth:
        raise refuse(f"is deeper than {limits.max_depth} components")
    if any(_nbytes(p) > _MAX_COMPONENT_BYTES for p in parts):
        raise refuse(f"has a component longer than {_MAX_COMPONENT_BYTES} bytes")
    return parts


def _open_dir(root_fd: int, parts: tuple[str, ...], *, create: bool) -> int | None:
    """Open ``parts`` below ``root_fd`` one component at a time, never following a symlink.

    Missing components are created (mode 0755) when ``create``; otherwise None is returned.
    Raises :class:`_Blocked` when a component is a symlink or not a directory.
    """
    fd = os.dup(root_fd)
    try:
        for i, part in enumerate(parts):
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(part, 0o755, dir_fd=fd)
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = _lstat(fd, part)
                kind = "a symlink" if st and stat.S_ISLNK(st.st_mode) else "not a directory"
                raise _Blocked(parts[: i + 1], kind) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` (a whole tree for a directory) without following links."""
    st = _lstat(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _prune_lower(dir_fd: int, dir_parts: tuple[str, ...], layer: set[tuple[str, ...]]) -> None:
    """Remove everything below ``dir_fd`` that the current layer did not write (opaque dir)."""
    stack: list[tuple[int, tuple[str, ...], bool]] = [(dir_fd, dir_parts, False)]
    try:
        while stack:
            fd, parts, owned = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    child = (*parts, name)
                    if child not in layer:
                        _remove(fd, name)
                        continue
                    st = _lstat(fd, name)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), child, True))
            finally:
                if owned:
                    os.close(fd)
    except BaseException:
        for fd, _, owned in stack:
            if owned:
                os.close(fd)
        raise


def _mtime_ns(info: tarfile.TarInfo) -> tuple[int, int]:
    try:
        seconds = int(info.mtime)
    except (OverflowError, ValueError):
        seconds = 0
    ns = min(max(seconds, 0), 2**33) * 1_000_000_000
    return ns, ns


def _remove_tree(path: Path) -> None:
    """Remove a partly unpacked tree, making read-only directories writable first."""
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "OPAQUE_WHITEOUT",
    "WHITEOUT_PREFIX",
    "UnpackLimits",
    "UnpackStats",
    "check_layers",
    "unpack_layer",
    "unpack_layers",
    "unpack_rootfs",
]
