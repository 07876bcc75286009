"""Release root filesystems: an image of the store unpacked into a read-only directory tree.

Owns :func:`unpack_release`, which the local runtime is handed (by the engine) to make an image
runnable: it reads the image's manifest from the OCI layout, streams every layer through the
safe unpacker while hashing it, refuses a layer whose bytes do not match its digest, and makes
the finished tree read-only (files ``0444``, or ``0555`` when executable; directories
``0555``) before it appears under its final name. Nothing half-unpacked ever appears there.

It knows nothing of runtimes, instances or the agent; locking against concurrent callers is
the caller's job (the local driver holds a file lock per digest).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
from pathlib import Path
from typing import IO

from castiron.errors import DigestMismatchError, ImageError
from castiron.images import oci
from castiron.images.store import ImageStore
from castiron.images.unpack import UnpackStats, unpack_layer


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes every byte it passes on."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the unpacker left unread (tar padding, gzip trailer)."""
        while chunk := self._raw.read(1024 * 1024):
            self.hash.update(chunk)
            self.size += len(chunk)


def make_read_only(root: Path) -> None:
    """Make every file under ``root`` (and ``root``) read-only; symlinks are left as they are.

    Executable files keep ``a+x`` (``0555``), other files get ``0444``, directories ``0555``.

    Raises:
        ImageError: when a mode cannot be changed.
    """
    try:
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(path, 0o555)
                else:
                    os.chmod(path, 0o555 if st.st_mode & 0o111 else 0o444)
        os.chmod(root, 0o555)
    except OSError as exc:
        raise ImageError(f"cannot make {root} read-only: {exc}") from exc


def remove_tree(root: Path) -> None:
    """Remove a read-only tree made by :func:`unpack_release` (making it writable first)."""
    if not root.exists():
        return
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
    os.chmod(root, 0o755)
    shutil.rmtree(root, ignore_errors=True)


def unpack_release(store_path: Path, digest: str, rootfs: Path) -> UnpackStats:
    """Unpack image ``digest`` of the OCI layout at ``store_path`` into ``rootfs``, read-only.

    The tree is built beside ``rootfs`` and renamed into place when complete; every layer's
    bytes are checked against its digest and size.

    Raises:
        ImageError: when ``rootfs`` exists, the image cannot be read, or unpacking fails.
        NotFoundError: when the image or one of its blobs is missing from the store.
        DigestMismatchError: when a layer's content does not match its digest.
        UnsafeArchiveError: when a layer entry is refused by the safe unpacker.
    """
    if rootfs.exists() or rootfs.is_symlink():
        raise ImageError(f"cannot unpack into {rootfs}: it already exists")
    store = ImageStore(store_path)
    image = store.image(digest)
    work = rootfs.with_name(f".{rootfs.name}.{os.getpid()}.new")
    if work.exists():
        remove_tree(work)
    total = UnpackStats()
    try:
        work.mkdir(parents=True, mode=0o755)
        for layer in image.layers:
            total = total + _unpack_layer(store, layer, work)
        make_read_only(work)
        try:
            os.rename(work, rootfs)
        except OSError as exc:
            raise ImageError(f"cannot move the unpacked tree to {rootfs}: {exc}") from exc
    except BaseException:
        remove_tree(work)
        raise
    return total


def _unpack_layer(store: ImageStore, layer: oci.Descriptor, root: Path) -> UnpackStats:
    with store.open_blob(layer.digest) as raw:
        reader = _HashingReader(raw)
        try:
            stats = unpack_layer(io.BufferedReader(reader, buffer_size=1024 * 1024), root)
        except ImageError as exc:
            # A damaged blob often fails to decompress first: say what is really wrong.
            reader.drain()
            _check(store, layer, reader, exc)
            raise
        reader.drain()
    _check(store, layer, reader, None)
    return stats


def _check(
    store: ImageStore, layer: oci.Descriptor, reader: _HashingReader, cause: Exception | None
) -> None:
    actual = "sha256:" + reader.hash.hexdigest()
    if actual != layer.digest or reader.size != layer.size:
        raise DigestMismatchError(
            f"layer {layer.digest} in {store.root} is damaged "
            f"(hashes to {actual}, {reader.size} bytes, expected {layer.size})"
        ) from cause


__all__ = ["make_read_only", "remove_tree", "unpack_release"]
