"""Deterministic layers: tar entries with normalised metadata, gzip with fixed bytes.

Owns the byte format of every layer castiron writes: entries sorted by path with parent
directories explicit; integer mtimes equal to ``SOURCE_DATE_EPOCH``; uid/gid 0 and empty
user/group names; modes normalised to what git records (``0644``/``0755`` files, ``0755``
directories); GNU headers (long names as ``././@LongLink``), never PAX records; hard links kept
as links. Compression is raw deflate at a fixed level in fixed 1 MiB chunks (each primed with
the previous 32 KiB, like pigz), so the bytes do not depend on how many threads compressed
them, wrapped in a gzip header written by hand (mtime 0, no name, OS 255).

It must not know the spec, the store's layout beyond :class:`castiron.images.store.BlobWriter`,
or any runtime.
"""

from __future__ import annotations

import hashlib
import stat
import struct
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from castiron.errors import ImageError
from castiron.images import oci
from castiron.images.store import ImageStore
from castiron.model import Digest

EntryKind = Literal["file", "dir", "symlink", "hardlink"]

GZIP_LEVEL = 6
CHUNK_SIZE = 1 << 20
_WINDOW = 32 * 1024
_READ_SIZE = 1 << 20
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
"""Magic, deflate, no flags, mtime 0, no extra flags (level 6), OS 255 (unknown)."""


def compressor_id() -> str:
    """What produced the compressed bytes; recorded in each manifest's annotations."""
    return (
        f"zlib {zlib.ZLIB_RUNTIME_VERSION} level {GZIP_LEVEL} chunk {CHUNK_SIZE} window {_WINDOW}"
    )


def normalise_mode(st_mode: int, kind: EntryKind) -> int:
    """The permission bits castiron records: like git, only "executable or not" survives."""
    if kind == "dir":
        return 0o755
    if kind == "symlink":
        return 0o777
    return 0o755 if st_mode & stat.S_IXUSR else 0o644


@dataclass(frozen=True)
class LayerEntry:
    """One entry of a layer: where it goes in the image and what it is."""

    path: str
    """In-image path without the leading ``/`` (``app/server.py``)."""
    kind: EntryKind
    mode: int
    size: int = 0
    sha256: str | None = None
    """Hex SHA-256 of a file's content (``None`` for other kinds)."""
    target: str | None = None
    """A symlink's target, or a hard link's in-image path (without ``/``)."""
    source: str | Path | None = field(default=None, compare=False)
    """Where a file's content is read from."""

    def key(self) -> list[object]:
        """What identifies this entry's bytes in a layer (for cache keys)."""
        return [self.path, self.kind, self.mode, self.size, self.sha256, self.target]


def _deflate(data: bytes, zdict: bytes, last: bool) -> bytes:
    if zdict:
        c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
    else:
        c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, 8)
    return c.compress(data) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


class GzipStream:
    """A deterministic gzip writer; compresses fixed-size chunks on ``pool`` when given.

    Also computes the SHA-256 of the uncompressed stream (the layer's diff_id).
    """

    def __init__(self, sink: Callable[[bytes], None], pool: Executor | None = None) -> None:
        self._sink = sink
        self._pool = pool
        self._buf = bytearray()
        self._prev = b""
        self._crc = 0
        self._size = 0
        self._hash = hashlib.sha256()
        self._pending: deque[Future[bytes]] = deque()
        self._max_pending = 8
        sink(GZIP_HEADER)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append uncompressed bytes."""
        self._buf += data
        while len(self._buf) >= CHUNK_SIZE:
            chunk = bytes(self._buf[:CHUNK_SIZE])
            del self._buf[:CHUNK_SIZE]
            self._submit(chunk, last=False)

    def _submit(self, chunk: bytes, last: bool) -> None:
        self._hash.update(chunk)
        self._crc = zlib.crc32(chunk, self._crc)
        self._size += len(chunk)
        zdict, self._prev = self._prev, chunk[-_WINDOW:]
        if self._pool is None:
            self._sink(_deflate(chunk, zdict, last))
            return
        self._pending.append(self._pool.submit(_deflate, chunk, zdict, last))
        while len(self._pending) > self._max_pending:
            self._sink(self._pending.popleft().result())

    def close(self) -> tuple[Digest, int]:
        """Finish the stream; returns the uncompressed digest and size."""
        self._submit(bytes(self._buf), last=True)
        self._buf.clear()
        while self._pending:
            self._sink(self._pending.popleft().result())
        self._sink(struct.pack("<II", self._crc & 0xFFFFFFFF, self._size & 0xFFFFFFFF))
        return Digest("sha256:" + self._hash.hexdigest()), self._size


def tar_header(entry: LayerEntry, mtime: int) -> bytes:
    """The GNU tar header block(s) for ``entry``."""
    info = tarfile.TarInfo(entry.path)
    info.mtime = int(mtime)
    info.mode = entry.mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.kind == "file":
        info.type = tarfile.REGTYPE
        info.size = entry.size
    elif entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target or ""
    else:
        info.type = tarfile.LNKTYPE
        info.linkname = entry.target or ""
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def write_tar(entries: Iterable[LayerEntry], out: Callable[[bytes], object], mtime: int) -> None:
    """Write ``entries`` (already sorted) as one tar stream to ``out``.

    Raises:
        ImageError: when a file cannot be read or changed while it was being read.
    """
    for entry in entries:
        out(tar_header(entry, mtime))
        if entry.kind != "file":
            continue
        if entry.source is None:
            raise ImageError(f"{entry.path}: no source for file content")
        h = hashlib.sha256()
        size = 0
        try:
            with open(entry.source, "rb") as fh:
                while block := fh.read(_READ_SIZE):
                    size += len(block)
                    if size > entry.size:
                        break
                    h.update(block)
                    out(block)
        except OSError as exc:
            raise ImageError(f"{entry.source}: cannot read ({exc.strerror})") from None
        if size != entry.size or (entry.sha256 is not None and h.hexdigest() != entry.sha256):
            raise ImageError(f"{entry.source}: the file changed while the image was being baked")
        if size % 512:
            out(b"\0" * (512 - size % 512))
    out(b"\0" * 1024)


@dataclass(frozen=True)
class LayerBlob:
    """A layer written to the store."""

    descriptor: oci.Descriptor
    diff_id: Digest


def write_layer(
    store: ImageStore, entries: Iterable[LayerEntry], mtime: int, pool: Executor | None
) -> LayerBlob:
    """Write ``entries`` as a gzip-compressed tar layer blob into ``store``.

    Raises:
        ImageError: when a source file cannot be read or changes during the write.
    """
    with store.writer() as w:
        gz = GzipStream(w.write, pool)
        write_tar(entries, gz.write, mtime)
        diff_id, _ = gz.close()
        size = w.size
        digest = w.commit(where="layer")
    return LayerBlob(oci.Descriptor(oci.LAYER_GZIP, digest, size), diff_id)


def sort_key(path: str) -> tuple[str, ...]:
    """Order entries so a directory is immediately followed by everything inside it."""
    return tuple(path.split("/"))


def with_parents(entries: Iterable[LayerEntry]) -> list[LayerEntry]:
    """``entries`` plus every missing parent directory, sorted by :func:`sort_key`."""
    by_path = {e.path: e for e in entries}
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in by_path:
                by_path[parent] = LayerEntry(parent, "dir", 0o755)
    return sorted(by_path.values(), key=lambda e: sort_key(e.path))


__all__ = [
    "CHUNK_SIZE",
    "GZIP_HEADER",
    "GZIP_LEVEL",
    "EntryKind",
    "GzipStream",
    "LayerBlob",
    "LayerEntry",
    "compressor_id",
    "normalise_mode",
    "sort_key",
    "tar_header",
    "with_parents",
    "write_layer",
    "write_tar",
]
