"""The file manifest of an image: every path of its root filesystem with type, mode, size,
content hash and link target, for drift detection.

Owns the :class:`FileEntry` value, the manifest's JSON form (a blob of media type
``application/vnd.castiron.files.v1+json`` named by the image manifest's ``dev.castiron.files``
annotation) and the computation from layers (applying OCI whiteouts). Knows nothing of the
spec, of building, or of any runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import marshal
import posixpath
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal

from castiron.errors import ImageError
from castiron.images import oci
from castiron.images.layer import LayerEntry
from castiron.images.store import ImageStore, write_atomic
from castiron.model import Digest, is_digest

FileType = Literal["file", "dir", "symlink", "hardlink"]
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"


@dataclass(frozen=True)
class FileEntry:
    """One path of an image's root filesystem."""

    path: str
    """Absolute in-image path (``/app/server.py``)."""
    type: FileType
    mode: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the file manifest."""
        out: dict[str, Any] = {"type": self.type, "mode": self.mode}
        if self.type == "file":
            out["size"] = self.size
            out["sha256"] = self.sha256
        if self.target is not None:
            out["target"] = self.target
        return out

    @classmethod
    def from_json(cls, path: str, obj: object) -> FileEntry:
        """Read one entry from the stored JSON.

        Raises:
            ImageError: for a malformed entry.
        """
        if not isinstance(obj, dict) or obj.get("type") not in (
            "file",
            "dir",
            "symlink",
            "hardlink",
        ):
            raise ImageError(f"file manifest: bad entry for {path!r}")
        mode, size = obj.get("mode", 0), obj.get("size", 0)
        sha, target = obj.get("sha256"), obj.get("target")
        if not isinstance(mode, int) or not isinstance(size, int):
            raise ImageError(f"file manifest: bad mode or size for {path!r}")
        return cls(
            path=path,
            type=obj["type"],
            mode=mode,
            size=size,
            sha256=sha if isinstance(sha, str) else None,
            target=target if isinstance(target, str) else None,
        )


def from_layer_entries(entries: Iterable[LayerEntry]) -> list[FileEntry]:
    """File entries for entries castiron wrote itself (no need to read the layer back)."""
    return [
        FileEntry(
            path="/" + e.path,
            type=e.kind,
            mode=e.mode,
            size=e.size if e.kind == "file" else 0,
            sha256=e.sha256 if e.kind == "file" else None,
            target=("/" + e.target if e.kind == "hardlink" and e.target else e.target),
        )
        for e in entries
    ]


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    path = posixpath.normpath("/" + name)
    return "/" + path.lstrip("/")


def read_layer_entries(fileobj: IO[bytes], where: str) -> list[FileEntry]:
    """List a layer tar stream (gzip or plain), hashing regular files; whiteouts are kept as
    entries of type ``file`` named ``.wh.*`` for :func:`merge` to apply.

    Raises:
        ImageError: naming ``where`` when the stream is not a readable tar.
    """
    out: list[FileEntry] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for info in tf:
                path = _clean(info.name)
                if path == "/":
                    continue
                mode = info.mode & 0o7777
                if info.isdir():
                    out.append(FileEntry(path, "dir", mode))
                elif info.issym():
                    out.append(FileEntry(path, "symlink", mode, target=info.linkname))
                elif info.islnk():
                    out.append(FileEntry(path, "hardlink", mode, target=_clean(info.linkname)))
                elif info.isreg():
                    h = hashlib.sha256()
                    src = tf.extractfile(info)
                    if src is not None:
                        while block := src.read(1 << 20):
                            h.update(block)
                    out.append(FileEntry(path, "file", mode, info.size, h.hexdigest()))
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ImageError(f"{where}: cannot read layer ({exc})") from None
    return out


def merge(layers: Iterable[Iterable[FileEntry]]) -> dict[str, FileEntry]:
    """Apply layers bottom to top (with OCI whiteouts) into one path → entry mapping."""
    tree: dict[str, FileEntry] = {}
    for layer in layers:
        entries = list(layer)
        whiteouts = [e for e in entries if "/" + _WHITEOUT in e.path]
        for e in whiteouts:
            parent, base = posixpath.split(e.path)
            if base == _OPAQUE:
                prefix = parent.rstrip("/") + "/"
                for key in [k for k in tree if k.startswith(prefix)]:
                    del tree[key]
        for e in whiteouts:
            parent, base = posixpath.split(e.path)
            if base.startswith(_WHITEOUT) and base != _OPAQUE:
                gone = posixpath.join(parent, base[len(_WHITEOUT) :])
                tree.pop(gone, None)
                prefix = gone + "/"
                for key in [k for k in tree if k.startswith(prefix)]:
                    del tree[key]
        for e in entries:
            if "/" + _WHITEOUT in e.path and posixpath.basename(e.path).startswith(_WHITEOUT):
                continue
            prior = tree.get(e.path)
            if prior is not None and prior.type == "dir" and e.type != "dir":
                prefix = e.path + "/"
                for key in [k for k in tree if k.startswith(prefix)]:
                    del tree[key]
            tree[e.path] = e
    return dict(sorted(tree.items()))


def encode(files: Mapping[str, FileEntry]) -> bytes:
    """The stored JSON form of a file manifest (canonical, so its digest is deterministic)."""
    return oci.canonical_json(
        {"mediaType": oci.FILES, "files": {p: e.to_json() for p, e in sorted(files.items())}}
    )


def decode(data: bytes, where: str) -> dict[str, FileEntry]:
    """Parse a stored file manifest.

    Raises:
        ImageError: naming ``where`` when it is malformed.
    """
    doc = oci.parse_json_object(data, where)
    files = doc.get("files")
    if doc.get("mediaType") != oci.FILES or not isinstance(files, dict):
        raise ImageError(f"{where}: not a castiron file manifest")
    return {str(p): FileEntry.from_json(str(p), e) for p, e in files.items()}


RawEntry = tuple[str, int, int, str | None, str | None]
"""One entry as :class:`FileIndex` keeps it: type, mode, size, sha256, target."""
_FILE_TYPES = frozenset(("file", "dir", "symlink", "hardlink"))
_INDEX_MAGIC = b"castiron files-index 1\n"


class FileIndex(Mapping[str, FileEntry]):
    """A file manifest kept as plain tuples (:data:`RawEntry`): cheap to load and to look up
    path by path; :class:`FileEntry` values are made only for the paths asked for."""

    __slots__ = ("raw",)

    def __init__(self, raw: dict[str, RawEntry]) -> None:
        self.raw = raw

    @classmethod
    def of(cls, files: Mapping[str, FileEntry]) -> FileIndex:
        """The index of a manifest held as entries."""
        if isinstance(files, FileIndex):
            return files
        return cls({p: (e.type, e.mode, e.size, e.sha256, e.target) for p, e in files.items()})

    def __getitem__(self, path: str) -> FileEntry:
        kind, mode, size, sha, target = self.raw[path]
        return FileEntry(path, kind, mode, size, sha, target)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __contains__(self, path: object) -> bool:
        return path in self.raw


def decode_index(data: bytes, where: str) -> FileIndex:
    """Parse a stored file manifest (the JSON :func:`decode` reads) straight into an index.

    Raises:
        ImageError: naming ``where`` (and the path) when it is malformed.
    """
    doc = oci.parse_json_object(data, where)
    files = doc.get("files")
    if doc.get("mediaType") != oci.FILES or not isinstance(files, dict):
        raise ImageError(f"{where}: not a castiron file manifest")
    raw: dict[str, RawEntry] = {}
    kinds = _FILE_TYPES
    for path, obj in files.items():
        try:
            kind, mode = obj["type"], obj["mode"]
            size, sha, target = obj.get("size", 0), obj.get("sha256"), obj.get("target")
        except (TypeError, KeyError, AttributeError):
            kind = mode = size = None
        if kind not in kinds or type(mode) is not int or type(size) is not int:
            raise ImageError(f"{where}: file manifest: bad entry for {path!r}")
        raw[path] = (
            kind,
            mode,
            size,
            sha if type(sha) is str else None,
            target if type(target) is str else None,
        )
    return FileIndex(raw)


def encode_index_cache(index: FileIndex) -> bytes:
    """The local cache form of an index: a magic line, the SHA-256 of the rest, then the
    tuples in :mod:`marshal` form (loads several times faster than the JSON)."""
    payload = marshal.dumps(index.raw, 4)
    return _INDEX_MAGIC + hashlib.sha256(payload).digest() + payload


def decode_index_cache(data: bytes) -> FileIndex | None:
    """An index from its cache form, or ``None`` when the data is not an intact cache entry
    (checked against its SHA-256 before :mod:`marshal` sees a byte of it)."""
    head = len(_INDEX_MAGIC)
    if not data.startswith(_INDEX_MAGIC) or len(data) < head + 32:
        return None
    digest, payload = data[head : head + 32], data[head + 32 :]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        raw = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    return FileIndex(raw) if isinstance(raw, dict) else None


def layer_file_entries(store: ImageStore, layer: oci.Descriptor) -> list[FileEntry]:
    """Read one stored layer's entries.

    Raises:
        NotFoundError: when the blob is missing.
        ImageError: when it is not a readable tar.
    """
    with store.open_blob(layer.digest) as fh:
        return read_layer_entries(fh, f"layer {layer.digest}")


def file_manifest(store: ImageStore, digest: Digest) -> dict[str, FileEntry]:
    """The file manifest of image ``digest``: path → :class:`FileEntry`.

    Uses the stored manifest blob when the image has one; otherwise (imported images) reads
    the layers.

    Raises:
        NotFoundError: when the image or a blob is missing.
        ImageError: when something is damaged.
    """
    image = store.image(digest)
    ref = image.annotations.get(oci.ANN_FILES)
    if ref is not None and is_digest(ref) and store.has_blob(ref):
        return decode(store.read_blob(ref, max_size=1 << 30), f"file manifest {ref}")
    return merge(layer_file_entries(store, layer) for layer in image.layers)


def file_index(store: ImageStore, digest: Digest) -> FileIndex:
    """The file manifest of image ``digest`` as a :class:`FileIndex`, from the store's cache
    when an intact entry is there (``cache/files-index/<hex>.idx``), else computed as
    :func:`file_manifest` does and cached (a cache that cannot be written costs only time).

    Raises:
        NotFoundError: when the image or a blob is missing.
        ImageError: when something is damaged.
    """
    image = store.image(digest)
    cached = store.cache_dir / "files-index" / f"{image.digest.split(':', 1)[1]}.idx"
    with contextlib.suppress(OSError):
        index = decode_index_cache(cached.read_bytes())
        if index is not None:
            return index
    ref = image.annotations.get(oci.ANN_FILES)
    if ref is not None and is_digest(ref) and store.has_blob(ref):
        blob = store.read_blob(ref, max_size=1 << 30)
        index = decode_index(blob, f"file manifest {ref}")
    else:
        index = FileIndex.of(merge(layer_file_entries(store, layer) for layer in image.layers))
    with contextlib.suppress(OSError):
        write_atomic(cached, encode_index_cache(index))
    return index


__all__ = [
    "FileEntry",
    "FileIndex",
    "RawEntry",
    "decode",
    "decode_index",
    "decode_index_cache",
    "encode",
    "encode_index_cache",
    "file_index",
    "file_manifest",
    "from_layer_entries",
    "layer_file_entries",
    "merge",
    "read_layer_entries",
]
