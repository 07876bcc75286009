"""The image store: an OCI image layout on disk (``oci-layout``, ``index.json``, blobs).

Owns atomic, verified blob writes (temp file in the same directory, hashed while written,
fsync, digest compared, rename), ``index.json`` updates under an ``fcntl`` lock, immutable tags,
reference resolution (tag, digest, unique digest prefix) and garbage collection (:func:`prune`).
It knows nothing of how images are built, of the spec, or of any runtime.

A half-written blob never appears under its digest: readers only look at
``blobs/sha256/<hex>``; temporary files start with ``.tmp-`` and are ignored (and removed by
:func:`prune`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from castiron.errors import (
    DigestMismatchError,
    ImageError,
    NotFoundError,
    TagConflictError,
    UsageError,
)
from castiron.filemodes import make_private_dir, open_private
from castiron.images import oci
from castiron.model import Digest, is_digest

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_PREFIX_RE = re.compile(r"^(?:sha256:)?([0-9a-f]{12,64})$")
TMP_PREFIX = ".tmp-"


def check_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag (Docker's grammar: ``[A-Za-z0-9_][A-Za-z0-9._-]*``).

    Raises:
        UsageError: when it is not.
    """
    if not _TAG_RE.match(tag):
        raise UsageError(
            f"invalid tag {tag!r}: use up to 128 letters, digits, '_', '.' or '-', "
            "not starting with '.' or '-'"
        )
    return tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same dir, fsync, rename);
    missing directories are made 0700 and the file is 0600 (the store is private)."""
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class BlobWriter:
    """Streams one blob into the store: hashes while writing, commits under its digest.

    Use as a context manager; call :meth:`commit` to publish. Leaving the block without a
    commit (or with an exception) removes the temporary file.
    """

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        make_private_dir(store.blobs_dir)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=store.blobs_dir)
        self._tmp = Path(tmp)
        self._fh: IO[bytes] = os.fdopen(fd, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the blob."""
        self._hash.update(data)
        self._fh.write(data)
        self.size += len(data)

    def commit(self, expected: Digest | None = None, where: str = "blob") -> Digest:
        """Flush, fsync, verify and publish the blob; returns its digest.

        Raises:
            DigestMismatchError: when ``expected`` is given and the content hashes otherwise
                (the temporary file is removed and nothing is published).
        """
        digest = Digest("sha256:" + self._hash.hexdigest())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        if expected is not None and digest != expected:
            self.abort()
            raise DigestMismatchError(f"{where}: content is {digest}, expected {expected}")
        final = self._store.blob_path(digest)
        if final.exists():
            self._tmp.unlink()
        else:
            os.replace(self._tmp, final)
            _fsync_dir(self._store.blobs_dir)
            self._store.created_blobs.append(digest)
        self._done = True
        return digest

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if not self._fh.closed:
            self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()
        self._done = True

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()


@dataclass(frozen=True)
class StoredImage:
    """An image manifest and its config, read (and verified) from the store."""

    digest: Digest
    manifest_size: int
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_descriptor: oci.Descriptor
    layers: tuple[oci.Descriptor, ...]

    @property
    def config_digest(self) -> Digest:
        """The config's digest: the image's identity across machines (Docker's image ID)."""
        return self.config_descriptor.digest

    @property
    def annotations(self) -> dict[str, str]:
        """The manifest's annotations."""
        ann = self.manifest.get("annotations")
        return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}

    def descriptor(self) -> oci.Descriptor:
        """A descriptor pointing at this image's manifest."""
        media = self.manifest.get("mediaType")
        return oci.Descriptor(
            media_type=media if isinstance(media, str) else oci.MANIFEST,
            digest=self.digest,
            size=self.manifest_size,
        )


@dataclass(frozen=True)
class ImageSummary:
    """One image for listings: its digest, tags and sizes."""

    digest: Digest
    config_digest: Digest
    tags: tuple[str, ...]
    created: str | None
    size: int
    layers: int


@dataclass
class ImageStore:
    """An OCI image layout rooted at :attr:`root` (``Settings.images_path``)."""

    root: Path
    created_blobs: list[Digest] = field(default_factory=list, repr=False)
    """Blobs this object published (so a failed import can take back exactly those)."""

    @property
    def blobs_dir(self) -> Path:
        """``blobs/sha256``."""
        return self.root / "blobs" / "sha256"

    @property
    def cache_dir(self) -> Path:
        """Where the build cache keeps its small index files."""
        return self.root / "cache"

    def ensure(self) -> None:
        """Create the layout (``oci-layout``, empty ``index.json``) if it does not exist."""
        make_private_dir(self.blobs_dir)
        layout = self.root / "oci-layout"
        if not layout.exists():
            write_atomic(layout, oci.canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (self.root / "index.json").exists():
            with self._index_lock():
                if not (self.root / "index.json").exists():
                    self._write_index([])

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives (whether or not it exists).

        Raises:
            ImageError: for a malformed digest.
        """
        if not is_digest(digest):
            raise ImageError(f"not a sha256 digest: {digest!r}")
        return self.blobs_dir / digest.split(":", 1)[1]

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """True when the blob is present (and, if given, has ``size`` bytes)."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def writer(self) -> BlobWriter:
        """A :class:`BlobWriter` for a new blob."""
        return BlobWriter(self)

    def put_bytes(self, data: bytes, expected: Digest | None = None, where: str = "blob") -> Digest:
        """Store ``data`` as a blob (a no-op when present); returns its digest.

        Raises:
            DigestMismatchError: when ``expected`` is given and differs.
        """
        digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
        if expected is not None and digest != expected:
            raise DigestMismatchError(f"{where}: content is {digest}, expected {expected}")
        if self.has_blob(digest, len(data)):
            return digest
        with self.writer() as w:
            w.write(data)
            return w.commit(digest, where)

    def put_json(self, obj: Any) -> oci.Descriptor:
        """Store ``obj`` as canonical JSON; returns a descriptor (media type left to callers)."""
        data = oci.canonical_json(obj)
        return oci.Descriptor("application/json", self.put_bytes(data), len(data))

    def open_blob(self, digest: str) -> IO[bytes]:
        """Open a blob for reading (not verified; use :meth:`read_blob` for small ones).

        Raises:
            NotFoundError: when the blob is missing.
        """
        try:
            return self.blob_path(digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from {self.root}") from None

    def read_blob(self, digest: str, max_size: int = oci.MAX_JSON_BYTES) -> bytes:
        """Read a small blob and check it against its digest.

        Raises:
            NotFoundError: when it is missing.
            DigestMismatchError: when its content does not match its name (store damage).
            ImageError: when it is larger than ``max_size``.
        """
        with self.open_blob(digest) as fh:
            data = fh.read(max_size + 1)
        if len(data) > max_size:
            raise ImageError(f"blob {digest} is larger than {max_size} bytes")
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatchError(
                f"blob {digest} in {self.root} is damaged (hashes to {actual})"
            )
        return data

    def read_json(self, digest: str) -> dict[str, Any]:
        """Read and parse a JSON blob (verified).

        Raises:
            NotFoundError, DigestMismatchError, ImageError: see :meth:`read_blob`.
        """
        return oci.parse_json_object(self.read_blob(digest), f"blob {digest}")

    # -- index.json ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        make_private_dir(self.root)
        with open(open_private(self.root / "index.lock", os.O_WRONLY | os.O_CREAT), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Hold a shared lock for the duration of a bake/import so :func:`prune` waits."""
        make_private_dir(self.root)
        with open(open_private(self.root / "gc.lock", os.O_WRONLY | os.O_CREAT), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        make_private_dir(self.root)
        with open(open_private(self.root / "gc.lock", os.O_WRONLY | os.O_CREAT), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _write_index(self, manifests: list[dict[str, Any]]) -> None:
        doc = {"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": manifests}
        write_atomic(self.root / "index.json", json.dumps(doc, indent=2, sort_keys=True).encode())

    def index(self) -> list[oci.Descriptor]:
        """The descriptors listed in ``index.json`` (empty for a store not yet created).

        Raises:
            ImageError: when ``index.json`` is damaged.
        """
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        doc = oci.parse_json_object(data, str(path))
        items = doc.get("manifests")
        if not isinstance(items, list):
            raise ImageError(f"{path}: no manifests list")
        return [oci.Descriptor.from_json(d, f"{path}: manifests[{i}]") for i, d in enumerate(items)]

    def update_index(self, change: Callable[[list[oci.Descriptor]], list[oci.Descriptor]]) -> None:
        """Apply ``change`` to the index under the lock and replace ``index.json`` atomically."""
        self.ensure()
        with self._index_lock():
            current = self.index()
            updated = change(list(current))
            if updated != current or [d.annotations for d in updated] != [
                d.annotations for d in current
            ]:
                self._write_index([d.to_json() for d in updated])

    def tag(self, image: oci.Descriptor, tags: Iterable[str], extra: dict[str, str]) -> None:
        """Bind ``tags`` to the image manifest ``image`` (a no-op for a tag already bound to it).

        Raises:
            TagConflictError: when a tag is bound to another digest (nothing is changed).
            UsageError: for a malformed tag.
        """
        wanted = [check_tag(t) for t in tags]

        def change(current: list[oci.Descriptor]) -> list[oci.Descriptor]:
            bound = {d.annotations.get(oci.ANN_REF_NAME): d for d in current}
            for t in wanted:
                prior = bound.get(t)
                if prior is not None and prior.digest != image.digest:
                    raise TagConflictError(
                        f"tag {t!r} is already bound to {prior.digest}; tags never move "
                        "(choose another tag)"
                    )
            for t in wanted:
                if t not in bound:
                    ann = {**extra, oci.ANN_REF_NAME: t, oci.ANN_VERSION: t}
                    current.append(
                        oci.Descriptor(image.media_type, image.digest, image.size, annotations=ann)
                    )
            return current

        self.update_index(change)

    def attach(
        self,
        subject: oci.Descriptor,
        artifact_type: str,
        layer: oci.Descriptor,
        annotations: dict[str, str],
    ) -> Digest:
        """Store an artifact manifest (empty config, one ``layer`` already stored) referring
        to ``subject``, and list it in the index as a referrer; returns its digest.

        Raises:
            ImageError: when the store cannot be written.
        """
        empty = oci.Descriptor(oci.EMPTY, self.put_bytes(oci.EMPTY_JSON), len(oci.EMPTY_JSON))
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.MANIFEST,
            "artifactType": artifact_type,
            "config": empty.to_json(),
            "layers": [layer.to_json()],
            "subject": subject.to_json(),
            "annotations": annotations,
        }
        raw = oci.canonical_json(manifest)
        digest = self.put_bytes(raw)
        self.add_referrer(
            oci.Descriptor(
                oci.MANIFEST,
                digest,
                len(raw),
                annotations={oci.ANN_SUBJECT: subject.digest},
                artifact_type=artifact_type,
            )
        )
        return digest

    def add_referrer(self, artifact: oci.Descriptor) -> None:
        """List an artifact manifest (e.g. provenance) in the index, without a tag (idempotent)."""

        def change(current: list[oci.Descriptor]) -> list[oci.Descriptor]:
            if all(d.digest != artifact.digest for d in current):
                current.append(artifact)
            return current

        self.update_index(change)

    def tags(self) -> dict[str, Digest]:
        """Every tag and the digest it names."""
        return {
            d.annotations[oci.ANN_REF_NAME]: d.digest
            for d in self.index()
            if oci.ANN_REF_NAME in d.annotations
        }

    def referrers(self, digest: str) -> list[oci.Descriptor]:
        """Artifacts in the index whose subject is ``digest``."""
        return [d for d in self.index() if d.annotations.get(oci.ANN_SUBJECT) == digest]

    def resolve(self, ref: str) -> Digest:
        """Resolve a tag, a ``sha256:`` digest or a unique digest prefix (≥ 12 hex) to a digest.

        Raises:
            NotFoundError: when nothing in the store matches.
            UsageError: when a prefix is ambiguous or too short.
        """
        tags = self.tags()
        if ref in tags:
            return tags[ref]
        m = _PREFIX_RE.match(ref)
        if m is None:
            if ref.startswith("sha256:") or re.fullmatch(r"[0-9a-f]{1,11}", ref):
                raise UsageError(
                    f"{ref!r}: give a full digest or a prefix of at least 12 hex digits"
                )
            raise NotFoundError(f"no image tagged {ref!r} in {self.root}")
        prefix = m.group(1)
        known = {d.digest for d in self.index() if d.artifact_type is None}
        hits = sorted(d for d in known if d.split(":", 1)[1].startswith(prefix))
        if len(prefix) == 64 and not hits and self.has_blob("sha256:" + prefix):
            return Digest("sha256:" + prefix)
        if not hits:
            raise NotFoundError(f"no image with digest {ref!r} in {self.root}")
        if len(hits) > 1:
            raise UsageError(f"{ref!r} is ambiguous: it matches {', '.join(hits)}")
        return Digest(hits[0])

    def image(self, digest: str) -> StoredImage:
        """Read an image manifest and its config (both verified).

        Raises:
            NotFoundError: when the manifest or config is missing.
            ImageError: when it is not an image manifest or is damaged.
        """
        raw = self.read_blob(digest)
        where = f"manifest {digest}"
        manifest = oci.parse_json_object(raw, where)
        media = manifest.get("mediaType", oci.MANIFEST)
        if media not in oci.MANIFEST_TYPES:
            raise ImageError(f"{where}: media type {media!r} is not an image manifest")
        config_desc = oci.manifest_config(manifest, where)
        config = self.read_json(config_desc.digest)
        return StoredImage(
            digest=Digest(digest),
            manifest_size=len(raw),
            manifest=manifest,
            config=config,
            config_descriptor=config_desc,
            layers=tuple(oci.manifest_layers(manifest, where)),
        )

    def images(self) -> list[ImageSummary]:
        """Every tagged image, newest tag first within ``index.json`` order.

        Raises:
            ImageError: when the index or an image is damaged.
        """
        tags: dict[Digest, list[str]] = {}
        for d in self.index():
            name = d.annotations.get(oci.ANN_REF_NAME)
            if d.artifact_type is None and name is not None:
                tags.setdefault(d.digest, []).append(name)
        out: list[ImageSummary] = []
        for digest, names in tags.items():
            img = self.image(digest)
            created = img.config.get("created")
            out.append(
                ImageSummary(
                    digest=digest,
                    config_digest=img.config_digest,
                    tags=tuple(names),
                    created=created if isinstance(created, str) else None,
                    size=sum(layer.size for layer in img.layers),
                    layers=len(img.layers),
                )
            )
        return out

    def discard_created(self, since: int) -> None:
        """Remove the blobs this object published after ``len(created_blobs)`` was ``since``
        (used to take back a failed import, so nothing of it stays in the store)."""
        for digest in self.created_blobs[since:]:
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
        del self.created_blobs[since:]


def reachable_blobs(store: ImageStore, manifest_digest: str) -> set[Digest]:
    """Every blob an image or artifact manifest needs: itself, config, layers, side blobs.

    Raises:
        ImageError: when the manifest is damaged.
    """
    out: set[Digest] = {Digest(manifest_digest)}
    if not store.has_blob(manifest_digest):
        return out
    manifest = store.read_json(manifest_digest)
    where = f"manifest {manifest_digest}"
    out.add(oci.manifest_config(manifest, where).digest)
    out.update(d.digest for d in oci.manifest_layers(manifest, where))
    ann = manifest.get("annotations")
    if isinstance(ann, dict):
        side = ann.get(oci.ANN_FILES)
        if isinstance(side, str) and is_digest(side):
            out.add(Digest(side))
    return out


@dataclass(frozen=True)
class PruneReport:
    """What :func:`prune` removed (or would remove, in a dry run)."""

    dry_run: bool
    kept_images: tuple[Digest, ...]
    removed_blobs: tuple[Digest, ...]
    removed_bytes: int
    dropped_entries: tuple[Digest, ...]
    temp_files: int


def prune(
    store: ImageStore,
    keep: Iterable[Digest] = (),
    *,
    dry_run: bool = True,
    temp_grace_seconds: float = 3600.0,
) -> PruneReport:
    """Remove blobs that no tagged image, no ``keep`` digest and none of their artifacts use.

    ``keep`` is the hook for roots the store does not know about (e.g. the images of
    retained releases). Untagged index entries that are not kept are dropped; artifacts
    (provenance) live as long as their subject. Temporary files older than
    ``temp_grace_seconds`` are removed. A dry run changes nothing. Holds the store's
    exclusive lock, so it waits for bakes and imports in progress.

    Raises:
        ImageError: when the index or a manifest is damaged (nothing is removed then).
    """
    if not (store.root / "index.json").exists():
        return PruneReport(dry_run, (), (), 0, (), 0)
    with store._exclusive():
        index = store.index()
        roots = {
            d.digest for d in index if d.artifact_type is None and oci.ANN_REF_NAME in d.annotations
        }
        roots.update(k for k in keep if store.has_blob(k))
        live_entries = [
            d
            for d in index
            if (d.artifact_type is None and d.digest in roots)
            or (d.artifact_type is not None and d.annotations.get(oci.ANN_SUBJECT) in roots)
        ]
        dropped = tuple(d.digest for d in index if d not in live_entries)
        live: set[Digest] = set()
        for digest in sorted(roots | {d.digest for d in live_entries}):
            live |= reachable_blobs(store, digest)
        removed: list[Digest] = []
        removed_bytes = 0
        temps = 0
        now = time.time()
        for entry in (
            sorted(os.scandir(store.blobs_dir), key=lambda e: e.name)
            if store.blobs_dir.exists()
            else []
        ):
            if entry.name.startswith(TMP_PREFIX):
                if now - entry.stat().st_mtime > temp_grace_seconds:
                    temps += 1
                    if not dry_run:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                continue
            digest = Digest("sha256:" + entry.name)
            if not is_digest(digest) or digest in live:
                continue
            removed.append(digest)
            removed_bytes += entry.stat().st_size
            if not dry_run:
                try:
                    os.unlink(entry.path)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise ImageError(f"cannot remove blob {digest}: {exc}") from exc
        if not dry_run and dropped:
            store.update_index(lambda current: [d for d in current if d.digest not in set(dropped)])
        return PruneReport(
            dry_run=dry_run,
            kept_images=tuple(sorted(roots)),
            removed_blobs=tuple(removed),
            removed_bytes=removed_bytes,
            dropped_entries=dropped,
            temp_files=temps,
        )


__all__ = [
    "BlobWriter",
    "ImageStore",
    "ImageSummary",
    "PruneReport",
    "StoredImage",
    "check_tag",
    "prune",
    "reachable_blobs",
    "write_atomic",
]
