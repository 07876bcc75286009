"""Image archives: export to ``oci-archive`` / ``docker-archive``, import from archives and
OCI layout directories.

Owns the archive formats. Exports are deterministic tars written atomically; the
``docker-archive`` is the hybrid layout (an OCI layout plus Docker's ``manifest.json`` whose
``Config`` and ``Layers`` point into ``blobs/sha256/``), which ``docker load`` accepts from
Docker 20.10 on and which keeps Docker's image ID equal to the config digest.

Imports never extract to disk: members are read by name from the tar, every blob is hashed
and compared with its digest while it is copied into the store, names with path tricks,
unexpected entry types, absurd sizes or entry counts are refused, every layer of every image
is checked with the safe unpacker's rules (:func:`castiron.images.unpack.check_layers`,
nothing written), and a failed import takes back every blob it added, so nothing of it
remains. Knows nothing of the spec or runtimes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, Protocol, cast

from castiron.errors import (
    CastironError,
    DigestMismatchError,
    ImageError,
    NotFoundError,
    UnsafeArchiveError,
    UsageError,
)
from castiron.images import oci
from castiron.images.layer import LayerEntry, write_tar
from castiron.images.store import TMP_PREFIX, ImageStore, StoredImage, check_tag
from castiron.images.unpack import check_layers
from castiron.model import Digest, is_digest

ArchiveFormat = Literal["oci-archive", "docker-archive"]
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may contain before it is refused as absurd."""

    max_entries: int = 100_000
    max_member_bytes: int = 64 << 30
    max_total_bytes: int = 256 << 30
    max_json_bytes: int = oci.MAX_JSON_BYTES


@dataclass(frozen=True)
class ImportedImage:
    """One image brought into the store by an import."""

    digest: Digest
    config_digest: Digest
    tags: tuple[str, ...]


class _Source(Protocol):
    where: str

    def has(self, name: str) -> bool: ...

    def open(self, name: str) -> IO[bytes]: ...

    def size(self, name: str) -> int: ...


def _read(src: _Source, name: str, limit: int) -> bytes:
    if src.size(name) > limit:
        raise UnsafeArchiveError(f"{src.where}: {name} is larger than {limit} bytes", name)
    with src.open(name) as fh:
        return fh.read(limit + 1)


def _safe_name(name: str, where: str) -> str:
    if "\x00" in name or name.startswith("/") or "\\" in name:
        raise UnsafeArchiveError(f"{where}: refused entry name {name!r}", name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeArchiveError(f"{where}: refused entry name {name!r} (contains '..')", name)
    return "/".join(parts)


class _TarSource:
    """An indexed, read-only view of a tar archive (nothing is extracted)."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.where = str(path)
        try:
            self._tf = tarfile.open(path, mode="r:*")  # noqa: SIM115 (closed by close())
        except (OSError, tarfile.TarError) as exc:
            raise ImageError(f"{path}: not a readable tar archive ({exc})") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        total = 0
        count = 0
        try:
            while (info := self._tf.next()) is not None:
                count += 1
                if count > limits.max_entries:
                    raise UnsafeArchiveError(
                        f"{path}: more than {limits.max_entries} entries", info.name
                    )
                name = _safe_name(info.name, self.where)
                if info.isdir() or not name:
                    continue
                if not (info.isreg() or info.issym()):
                    raise UnsafeArchiveError(
                        f"{path}: entry {info.name!r} has a refused type", info.name
                    )
                if name in self._members:
                    raise UnsafeArchiveError(
                        f"{path}: entry {info.name!r} appears twice", info.name
                    )
                if info.size > limits.max_member_bytes:
                    raise UnsafeArchiveError(
                        f"{path}: entry {info.name!r} is {info.size} bytes, over the limit",
                        info.name,
                    )
                total += info.size
                if total > limits.max_total_bytes:
                    raise UnsafeArchiveError(f"{path}: archive content is too large", info.name)
                self._members[name] = info
        except tarfile.TarError as exc:
            self._tf.close()
            raise ImageError(f"{path}: damaged tar archive ({exc})") from None
        except BaseException:
            self._tf.close()
            raise

    def close(self) -> None:
        self._tf.close()

    def _resolve(self, name: str) -> tarfile.TarInfo:
        seen = 0
        current = name
        while True:
            info = self._members.get(current)
            if info is None:
                raise ImageError(f"{self.where}: entry {name!r} is missing")
            if info.isreg():
                return info
            seen += 1
            if seen > 8:
                raise UnsafeArchiveError(f"{self.where}: symlink loop at {name!r}", name)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(current), info.linkname))
            current = _safe_name(target, self.where)

    def has(self, name: str) -> bool:
        return name in self._members

    def size(self, name: str) -> int:
        return self._resolve(name).size

    def open(self, name: str) -> IO[bytes]:
        fh = self._tf.extractfile(self._resolve(name))
        if fh is None:
            raise ImageError(f"{self.where}: entry {name!r} is not a file")
        return fh


class _DirSource:
    """An OCI layout directory on disk."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        self._root = path

    def _path(self, name: str) -> Path:
        return self._root / _safe_name(name, self.where)

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def size(self, name: str) -> int:
        try:
            return self._path(name).stat().st_size
        except OSError:
            raise ImageError(f"{self.where}: {name} is missing") from None

    def open(self, name: str) -> IO[bytes]:
        try:
            return self._path(name).open("rb")
        except OSError:
            raise ImageError(f"{self.where}: {name} is missing") from None


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _copy_blob(store: ImageStore, src: _Source, desc: oci.Descriptor) -> None:
    name = _blob_name(desc.digest)
    if store.has_blob(desc.digest, desc.size):
        return
    if not src.has(name):
        raise ImageError(f"{src.where}: blob {name} is missing")
    if src.size(name) != desc.size:
        raise ImageError(
            f"{src.where}: {name} is {src.size(name)} bytes but its descriptor says {desc.size}"
        )
    with store.writer() as w, src.open(name) as fh:
        while block := fh.read(_COPY_BLOCK):
            w.write(block)
        w.commit(desc.digest, f"{src.where}: {name}")


def _read_verified(src: _Source, desc: oci.Descriptor, limits: ArchiveLimits) -> bytes:
    name = _blob_name(desc.digest)
    if not src.has(name):
        raise ImageError(f"{src.where}: blob {name} is missing")
    data = _read(src, name, limits.max_json_bytes)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != desc.digest:
        raise DigestMismatchError(f"{src.where}: {name} hashes to {actual}")
    return data


def _pick_platform(src: _Source, desc: oci.Descriptor, limits: ArchiveLimits) -> oci.Descriptor:
    where = f"{src.where}: index {desc.digest}"
    nested = oci.parse_json_object(_read_verified(src, desc, limits), where)
    items = nested.get("manifests")
    if not isinstance(items, list):
        raise ImageError(f"{where}: no manifests list")
    want = oci.host_platform()
    candidates = [oci.Descriptor.from_json(d, where) for d in items]
    for c in candidates:
        plat = c.platform or {}
        if plat.get("os") == want["os"] and plat.get("architecture") == want["architecture"]:
            return c
    raise ImageError(f"{where}: no image for {want['os']}/{want['architecture']}")


def _copy_image(
    store: ImageStore, src: _Source, desc: oci.Descriptor, limits: ArchiveLimits
) -> tuple[oci.Descriptor, Digest]:
    if desc.media_type in oci.INDEX_TYPES:
        desc = _pick_platform(src, desc, limits)
    if desc.media_type not in oci.MANIFEST_TYPES:
        raise ImageError(f"{src.where}: {desc.digest} is {desc.media_type!r}, not an image")
    where = f"{src.where}: manifest {desc.digest}"
    data = _read_verified(src, desc, limits)
    manifest = oci.parse_json_object(data, where)
    config = oci.manifest_config(manifest, where)
    config_bytes = _read_verified(src, config, limits)
    oci.parse_json_object(config_bytes, f"{src.where}: config {config.digest}")
    for layer in oci.manifest_layers(manifest, where):
        _copy_blob(store, src, layer)
    ann = manifest.get("annotations")
    side = ann.get(oci.ANN_FILES) if isinstance(ann, dict) else None
    if isinstance(side, str) and is_digest(side) and src.has(_blob_name(side)):
        size = src.size(_blob_name(side))
        _copy_blob(store, src, oci.Descriptor(oci.FILES, Digest(side), size))
    store.put_bytes(config_bytes, config.digest, f"{src.where}: config")
    store.put_bytes(data, desc.digest, where)
    return oci.Descriptor(desc.media_type, desc.digest, len(data)), config.digest


def _copy_docker_layer(
    store: ImageStore, src: _Source, name: str, diff_id: Digest
) -> oci.Descriptor:
    if not src.has(name):
        raise ImageError(f"{src.where}: layer {name} is missing")
    raw = hashlib.sha256()
    gunzip: Any = None
    with store.writer() as w, src.open(name) as fh:
        first = True
        while block := fh.read(_COPY_BLOCK):
            if first:
                first = False
                if block[:2] == b"\x1f\x8b":
                    gunzip = zlib.decompressobj(wbits=31)
            w.write(block)
            if gunzip is not None:
                try:
                    raw.update(gunzip.decompress(block))
                except zlib.error:
                    raise ImageError(f"{src.where}: layer {name} is not valid gzip") from None
            else:
                raw.update(block)
        actual = "sha256:" + raw.hexdigest()
        if actual != diff_id:
            raise DigestMismatchError(
                f"{src.where}: layer {name} has content {actual}, the config says {diff_id}"
            )
        size = w.size
        digest = w.commit(where=f"{src.where}: {name}")
    media = oci.LAYER_GZIP if gunzip is not None else oci.LAYER_TAR
    return oci.Descriptor(media, digest, size)


def _docker_entries(src: _Source, limits: ArchiveLimits) -> list[dict[str, Any]]:
    data = _read(src, "manifest.json", limits.max_json_bytes)
    try:
        entries = json.loads(data)
    except ValueError:
        raise ImageError(f"{src.where}: manifest.json is not valid JSON") from None
    if (
        not isinstance(entries, list)
        or not entries
        or not all(isinstance(e, dict) for e in entries)
    ):
        raise ImageError(f"{src.where}: manifest.json must be a non-empty list of objects")
    return entries


def _import_docker(
    store: ImageStore, src: _Source, limits: ArchiveLimits
) -> list[tuple[oci.Descriptor, Digest, list[str]]]:
    out: list[tuple[oci.Descriptor, Digest, list[str]]] = []
    for i, entry in enumerate(_docker_entries(src, limits)):
        where = f"{src.where}: manifest.json[{i}]"
        config_name, layers, repo_tags = (
            entry.get("Config"),
            entry.get("Layers"),
            entry.get("RepoTags"),
        )
        if not isinstance(config_name, str) or not isinstance(layers, list):
            raise ImageError(f"{where}: needs Config and Layers")
        if not all(isinstance(x, str) for x in layers):
            raise ImageError(f"{where}: Layers must be paths")
        config_name = _safe_name(config_name, src.where)
        config_bytes = _read(src, config_name, limits.max_json_bytes)
        config = oci.parse_json_object(config_bytes, f"{src.where}: {config_name}")
        diff_ids = oci.config_diff_ids(config, f"{src.where}: {config_name}")
        if len(diff_ids) != len(layers):
            raise ImageError(
                f"{where}: {len(layers)} layers but the config lists {len(diff_ids)} diff_ids"
            )
        descs = [
            _copy_docker_layer(store, src, _safe_name(name, src.where), diff_id)
            for name, diff_id in zip(layers, diff_ids, strict=True)
        ]
        config_digest = store.put_bytes(config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.MANIFEST,
            "config": oci.Descriptor(oci.CONFIG, config_digest, len(config_bytes)).to_json(),
            "layers": [d.to_json() for d in descs],
        }
        data = oci.canonical_json(manifest)
        digest = store.put_bytes(data)
        tags = []
        for rt in repo_tags if isinstance(repo_tags, list) else []:
            if isinstance(rt, str) and ":" in rt.rsplit("/", 1)[-1]:
                tags.append(rt.rsplit(":", 1)[1])
        out.append((oci.Descriptor(oci.MANIFEST, digest, len(data)), config_digest, tags))
    return out


def _expand_nested(
    src: _Source, desc: oci.Descriptor, limits: ArchiveLimits
) -> list[oci.Descriptor]:
    """A top-level index written by castiron (its image entry carries ``dev.castiron.tags``
    or its entries have subjects) becomes its image and referrers; any other entry stays."""
    if desc.media_type not in oci.INDEX_TYPES or desc.size > limits.max_json_bytes:
        return [desc]
    where = f"{src.where}: index {desc.digest}"
    nested = oci.parse_json_object(_read_verified(src, desc, limits), where)
    items = nested.get("manifests")
    if not isinstance(items, list):
        raise ImageError(f"{where}: no manifests list")
    inner = [oci.Descriptor.from_json(d, f"{where}: manifests[{i}]") for i, d in enumerate(items)]
    ours = any(ANN_TAGS in d.annotations or oci.ANN_SUBJECT in d.annotations for d in inner)
    if not ours:
        return [desc]
    images = [d for d in inner if d.artifact_type is None and oci.ANN_SUBJECT not in d.annotations]
    name = desc.annotations.get(oci.ANN_REF_NAME)
    out: list[oci.Descriptor] = []
    for d in images:
        ann = dict(d.annotations)
        if name:
            ann[oci.ANN_REF_NAME] = name
        out.append(oci.Descriptor(d.media_type, d.digest, d.size, annotations=ann))
    return out + [d for d in inner if d not in images]


def _import_oci(
    store: ImageStore, src: _Source, limits: ArchiveLimits, ref: str | None = None
) -> list[tuple[oci.Descriptor, Digest, list[str]]]:
    index = oci.parse_json_object(
        _read(src, "index.json", limits.max_json_bytes), f"{src.where}: index.json"
    )
    items = index.get("manifests")
    if not isinstance(items, list):
        raise ImageError(f"{src.where}: index.json has no manifests list")
    descs = [
        oci.Descriptor.from_json(d, f"{src.where}: index.json manifests[{i}]")
        for i, d in enumerate(items)
    ]
    images: dict[Digest, list[str]] = {}
    order: list[oci.Descriptor] = []
    artifacts: list[oci.Descriptor] = []
    descs = [x for d in descs for x in _expand_nested(src, d, limits)]
    for d in descs:
        if d.artifact_type is not None or oci.ANN_SUBJECT in d.annotations:
            artifacts.append(d)
            continue
        name = d.annotations.get(oci.ANN_REF_NAME)
        names = [t for t in d.annotations.get(ANN_TAGS, "").split(",") if t]
        if not names and name is not None:
            names = [name.rsplit(":", 1)[-1]]
        if ref is not None and name != ref and ref not in names:
            continue
        if d.digest not in images:
            images[d.digest] = []
            order.append(d)
        images[d.digest].extend(n for n in names if n not in images[d.digest])
    if ref is not None and not order:
        raise ImageError(f"{src.where}: no image tagged {ref!r}")
    out: list[tuple[oci.Descriptor, Digest, list[str]]] = []
    for d in order:
        desc, config_digest = _copy_image(store, src, d, limits)
        out.append((desc, config_digest, images[d.digest]))
    wanted = {desc.digest for desc, _, _ in out}
    for a in artifacts:
        if a.annotations.get(oci.ANN_SUBJECT) in wanted and a.size <= limits.max_json_bytes:
            data = _read_verified(src, a, limits)
            art = oci.parse_json_object(data, f"{src.where}: artifact {a.digest}")
            for layer in oci.manifest_layers(art, f"{src.where}: artifact {a.digest}"):
                _copy_blob(store, src, layer)
            _copy_blob(store, src, oci.manifest_config(art, f"{src.where}: artifact {a.digest}"))
            store.put_bytes(data, a.digest)
            store.add_referrer(a)
    return out


def check_image_layers(store: ImageStore, digest: Digest, where: str) -> None:
    """Check every layer of image ``digest`` of ``store`` with the safe unpacker's rules
    (lowest first, as an unpack would apply them), writing nothing.

    Raises:
        UnsafeArchiveError: an entry the unpacker would refuse, named with its image and layer.
        ImageError: a layer is not a valid (gzip) tar stream.
        NotFoundError: a layer blob is missing from the store.
    """
    layers = store.image(digest).layers
    streams: list[BinaryIO] = []
    try:
        for layer in layers:
            streams.append(cast(BinaryIO, store.open_blob(layer.digest)))
        check_layers(streams)
    except UnsafeArchiveError as exc:
        raise UnsafeArchiveError(f"{where}: image {digest}: {exc.message}", exc.entry) from exc
    except ImageError as exc:
        raise ImageError(f"{where}: image {digest}: {exc.message}") from exc
    finally:
        for stream in streams:
            stream.close()


def _finish(
    store: ImageStore,
    found: list[tuple[oci.Descriptor, Digest, list[str]]],
    tags: tuple[str, ...],
    where: str,
) -> list[ImportedImage]:
    if tags and len(found) != 1:
        raise UsageError(f"{where} holds {len(found)} images; --tag needs exactly one")
    result = []
    for desc, config_digest, archive_tags in found:
        chosen = tuple(tags) or tuple(t for t in archive_tags if _valid_tag(t))
        if not chosen:
            chosen = ("sha-" + oci.short(config_digest),)
        store.tag(desc, chosen, {})
        result.append(ImportedImage(desc.digest, config_digest, chosen))
    return result


def _valid_tag(tag: str) -> bool:
    try:
        check_tag(tag)
    except UsageError:
        return False
    return True


def import_archive(
    store: ImageStore,
    path: Path,
    *,
    tags: tuple[str, ...] = (),
    register: bool = True,
    limits: ArchiveLimits | None = None,
) -> list[ImportedImage]:
    """Import an ``oci-archive`` or ``docker-archive`` (detected from its content) into the store.

    With ``register`` the images are tagged (``tags``, else the archive's own tags, else
    ``sha-<config digest>``); without, only their blobs are stored (for a bake's base image).

    Raises:
        UnsafeArchiveError: for a refused entry (named), path tricks, or absurd sizes/counts,
            or a layer entry the safe unpacker would refuse.
        DigestMismatchError: when a blob does not match its digest.
        ImageError: for a damaged or incomplete archive.
        TagConflictError: when a tag is already bound to another image.
        UsageError: for ``tags`` with an archive holding several images.
    """
    for t in tags:
        check_tag(t)
    limits = limits or ArchiveLimits()
    store.ensure()
    mark = len(store.created_blobs)
    with store.using():
        try:
            src = _TarSource(path, limits)
            try:
                if src.has("index.json"):
                    found = _import_oci(store, src, limits)
                elif src.has("manifest.json"):
                    found = _import_docker(store, src, limits)
                else:
                    raise ImageError(
                        f"{path}: neither an OCI archive (index.json) nor a Docker archive "
                        "(manifest.json)"
                    )
            finally:
                src.close()
            if not found:
                raise ImageError(f"{path}: the archive holds no image")
            for desc, _, _ in found:
                check_image_layers(store, desc.digest, str(path))
            if not register:
                return [ImportedImage(d.digest, c, ()) for d, c, _ in found]
            return _finish(store, found, tags, str(path))
        except CastironError:
            store.discard_created(mark)
            raise


def import_layout(store: ImageStore, path: Path, ref: str | None = None) -> ImportedImage:
    """Copy one image from an OCI layout directory into the store (blobs only, untagged).

    ``ref`` picks the image by its ``org.opencontainers.image.ref.name``; without it the
    layout must hold exactly one image.

    Raises:
        ImageError: when the layout is missing, damaged, or ``ref`` is ambiguous or unknown.
        UnsafeArchiveError: when a layer entry would be refused by the safe unpacker.
        DigestMismatchError: when a blob does not match its digest.
    """
    if not (path / "index.json").is_file():
        raise ImageError(f"{path}: not an OCI image layout (no index.json)")
    src = _DirSource(path)
    mark = len(store.created_blobs)
    try:
        found = _import_oci(store, src, ArchiveLimits(), ref)
        for desc, _, _ in found:
            check_image_layers(store, desc.digest, str(path))
    except CastironError:
        store.discard_created(mark)
        raise
    if len(found) != 1:
        raise ImageError(f"{path}: holds {len(found)} images; name one as oci:{path}:TAG")
    desc, config_digest, _ = found[0]
    return ImportedImage(desc.digest, config_digest, ())


ANN_TAGS = "dev.castiron.tags"
"""On the image entry of an archive's nested index: every tag of the image, comma-separated."""


def _sha256(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def nested_index(image: StoredImage, tags: list[str], referrers: list[oci.Descriptor]) -> bytes:
    """The one index an ``oci-archive`` lists in ``index.json``: the image (with its platform,
    so tools that pick a platform find it, and its tags) followed by its signatures and
    provenance as referrers, as the OCI 1.1 image layout allows. With a single top-level
    entry, ``skopeo``/``podman`` open the archive without being told a ref."""
    plat = {
        "os": str(image.config.get("os") or "linux"),
        "architecture": str(
            image.config.get("architecture") or oci.host_platform()["architecture"]
        ),
    }
    variant = image.config.get("variant")
    if isinstance(variant, str) and variant:
        plat["variant"] = variant
    base = image.descriptor()
    ann = {ANN_TAGS: ",".join(tags)} if tags else {}
    entry = oci.Descriptor(base.media_type, base.digest, base.size, annotations=ann, platform=plat)
    manifests = [entry.to_json(), *(r.to_json() for r in referrers)]
    return oci.canonical_json({"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": manifests})


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_archive` wrote."""

    path: Path
    format: ArchiveFormat
    digest: Digest
    config_digest: Digest
    repo_tags: tuple[str, ...]
    size: int


def _tar_file(name: str, data_path: Path, size: int, sha: str | None) -> LayerEntry:
    return LayerEntry(name, "file", 0o644, size, sha, source=data_path)


@contextlib.contextmanager
def _atomic_output(dest: Path) -> Iterator[IO[bytes]]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def export_archive(
    store: ImageStore,
    digest: Digest,
    fmt: ArchiveFormat,
    dest: Path,
    *,
    repo: str | None = None,
) -> ExportResult:
    """Write image ``digest`` (with its tags and provenance) to ``dest`` as a tar archive.

    ``repo`` names the repository for Docker's ``RepoTags`` (default: the image title
    annotation, else ``castiron``). Every blob is verified against its digest as it is copied.

    Raises:
        NotFoundError: when the image or a blob is missing.
        ImageError: when a blob is damaged or ``dest`` cannot be written.
        UsageError: for an unknown format.
    """
    if fmt not in ("oci-archive", "docker-archive"):
        raise UsageError(f"unknown archive format {fmt!r}: use oci-archive or docker-archive")
    image = store.image(digest)
    tags = sorted(t for t, d in store.tags().items() if d == digest)
    referrers = store.referrers(digest)
    blobs: dict[str, int] = {
        digest: image.manifest_size,
        image.config_digest: image.config_descriptor.size,
    }
    for layer in image.layers:
        blobs[layer.digest] = layer.size
    side = image.annotations.get(oci.ANN_FILES)
    if side and is_digest(side) and store.has_blob(side):
        blobs[side] = store.blob_path(side).stat().st_size
    for ref in referrers:
        art = store.read_json(ref.digest)
        blobs[ref.digest] = ref.size
        for d in [oci.manifest_config(art, ref.digest), *oci.manifest_layers(art, ref.digest)]:
            blobs[d.digest] = d.size
    entries_index: list[dict[str, Any]] = []
    base = image.descriptor()
    nested: bytes | None = None
    if fmt == "oci-archive":
        nested = nested_index(image, tags, referrers)
        blobs[_sha256(nested)] = len(nested)
        ann = {oci.ANN_REF_NAME: tags[0]} if tags else {}
        entries_index.append(
            oci.Descriptor(oci.INDEX, _sha256(nested), len(nested), annotations=ann).to_json()
        )
    else:
        for t in tags or [""]:
            ann = {oci.ANN_REF_NAME: t} if t else {}
            entries_index.append(
                oci.Descriptor(base.media_type, digest, base.size, annotations=ann).to_json()
            )
        entries_index.extend(r.to_json() for r in referrers)
    index = oci.canonical_json(
        {"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": entries_index}
    )
    docs: dict[str, bytes] = {
        "oci-layout": oci.canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
    }
    name = repo or image.annotations.get(oci.ANN_TITLE) or "castiron"
    repo_tags = tuple(f"{name}:{t}" for t in tags)
    if fmt == "docker-archive":
        docs["manifest.json"] = oci.canonical_json(
            [
                {
                    "Config": _blob_name(image.config_digest),
                    "RepoTags": list(repo_tags),
                    "Layers": [_blob_name(layer.digest) for layer in image.layers],
                }
            ]
        )
    with tempfile.TemporaryDirectory(prefix="castiron-export-") as tmp:
        entries: list[LayerEntry] = [
            LayerEntry("blobs", "dir", 0o755),
            LayerEntry("blobs/sha256", "dir", 0o755),
        ]
        for doc_name, data in docs.items():
            p = Path(tmp) / doc_name
            p.write_bytes(data)
            entries.append(_tar_file(doc_name, p, len(data), hashlib.sha256(data).hexdigest()))
        if nested is not None:
            p = Path(tmp) / "nested-index.json"
            p.write_bytes(nested)
            nested_name = _blob_name(_sha256(nested))
            entries.append(_tar_file(nested_name, p, len(nested), _sha256(nested)[7:]))
        for blob, size in sorted(blobs.items()):
            if nested is not None and blob == _sha256(nested):
                continue
            path = store.blob_path(blob)
            if not path.exists():
                raise NotFoundError(f"blob {blob} of image {digest} is missing from {store.root}")
            entries.append(_tar_file(_blob_name(blob), path, size, blob.split(":", 1)[1]))
        entries.sort(key=lambda e: e.path)
        try:
            with _atomic_output(dest) as out:
                write_tar(entries, out.write, 0)
        except ImageError as exc:
            raise ImageError(f"export of {digest} failed: {exc}") from None
        except OSError as exc:
            raise ImageError(f"{dest}: cannot write ({exc.strerror})") from None
    return ExportResult(
        path=dest,
        format=fmt,
        digest=digest,
        config_digest=image.config_digest,
        repo_tags=repo_tags,
        size=dest.stat().st_size,
    )


__all__ = [
    "ArchiveFormat",
    "ArchiveLimits",
    "ExportResult",
    "ImportedImage",
    "check_image_layers",
    "export_archive",
    "import_archive",
    "import_layout",
]
