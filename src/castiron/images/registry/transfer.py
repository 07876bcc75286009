"""Push and pull: move an image, its signatures and its provenance between the store and a
registry, verifying every byte.

Push sends only what the registry lacks (a HEAD per blob, or none at all when the manifest is
already there), mounts a blob from another repository of the same registry when castiron
pushed it there before, uploads small blobs in one request and large ones in chunks (a dropped
chunk resumes from what the registry holds), then PUTs the manifest by digest and by tag.
Signature and provenance artifacts are pushed as OCI 1.1 referrers (listed in the
``sha256-<hex>`` fallback tag when the registry has no referrers API) and in cosign's tag
scheme (``sha256-<hex>.sig`` with simple-signing layers, ``sha256-<hex>.att`` with DSSE
envelopes).

Pull resolves a tag to a digest once, picks the host's platform from an index, downloads
what the store lacks (a dropped download resumes with a Range request), checks every blob and
manifest against its digest, brings the image's referrers along (or reads cosign's tags), and
can require a valid signature before anything is kept. A failed pull takes back every blob it
added: nothing half stored. Knows nothing of the spec or of any runtime.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from castiron.errors import (
    CastironError,
    DigestMismatchError,
    ImageError,
    NotFoundError,
    PolicyRefusedError,
    RegistryError,
    UsageError,
)
from castiron.images import oci
from castiron.images.registry.client import (
    Manifest,
    RegistryClient,
    client_for,
)
from castiron.images.registry.reference import Reference
from castiron.images.registry.transport import TransportOptions
from castiron.images.store import ImageStore, write_atomic
from castiron.model import Digest

if TYPE_CHECKING:
    from castiron.images.sign import VerifyKey

COSIGN_PREDICATE = "predicateType"
"""Layer annotation cosign puts on an attestation layer."""
_HINTS_FILE = "registry-blobs.json"
_MAX_PAYLOAD_BYTES = 1024 * 1024
"""The largest signature payload or DSSE envelope read from cosign's tags."""
_BLOCK = 1 << 20

BlobOutcome = Literal["uploaded", "mounted", "skipped", "downloaded", "present"]


class TransferObserver(Protocol):
    """Receives per-blob progress (the CLI draws it on a terminal)."""

    def start(self, digest: Digest, size: int, what: str) -> None: ...
    def advance(self, digest: Digest, n: int) -> None: ...
    def finish(self, digest: Digest, outcome: BlobOutcome) -> None: ...


class SilentObserver:
    """A :class:`TransferObserver` that shows nothing."""

    def start(self, digest: Digest, size: int, what: str) -> None:
        pass

    def advance(self, digest: Digest, n: int) -> None:
        pass

    def finish(self, digest: Digest, outcome: BlobOutcome) -> None:
        pass


@dataclass(frozen=True)
class TransferOptions:
    """How blobs move."""

    transport: TransportOptions = field(default_factory=TransportOptions)
    monolithic_max: int = 32 * 1024 * 1024
    """Blobs up to this size are uploaded in one request; larger ones in chunks."""
    chunk_size: int = 16 * 1024 * 1024
    workers: int = 4
    """Blobs moved at the same time."""


@dataclass(frozen=True)
class BlobReport:
    """What happened to one blob."""

    digest: Digest
    size: int
    outcome: BlobOutcome


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did."""

    reference: str
    digest: Digest
    blobs: tuple[BlobReport, ...]
    referrers: tuple[Digest, ...]
    cosign_tags: tuple[str, ...]
    referrers_api: bool
    requests: int

    @property
    def bytes_sent(self) -> int:
        """Bytes of blobs uploaded (mounted and skipped ones cost nothing)."""
        return sum(b.size for b in self.blobs if b.outcome == "uploaded")

    @property
    def skipped(self) -> int:
        """Blobs the registry already had."""
        return sum(1 for b in self.blobs if b.outcome == "skipped")


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` stored."""

    reference: str
    digest: Digest
    config_digest: Digest
    index_digest: Digest | None
    blobs: tuple[BlobReport, ...]
    referrers: tuple[Digest, ...]
    tag: str | None
    verified_by: str | None

    @property
    def bytes_received(self) -> int:
        """Bytes of blobs downloaded."""
        return sum(b.size for b in self.blobs if b.outcome == "downloaded")


def fallback_tag(digest: str) -> str:
    """The OCI 1.1 referrers tag schema: ``sha256-<hex>``."""
    return digest.replace(":", "-")


def cosign_tag(digest: str, suffix: Literal["sig", "att"]) -> str:
    """cosign's tag for an image's signatures (``sig``) or attestations (``att``)."""
    return f"{fallback_tag(digest)}.{suffix}"


# -- mount hints ---------------------------------------------------------------------------


class _Hints:
    """Which repositories of a registry castiron pushed a blob to (a hint for mounts; the
    registry decides whether a mount works, so a stale hint costs one request)."""

    def __init__(self, store: ImageStore, registry: str) -> None:
        self._path = store.cache_dir / _HINTS_FILE
        self._registry = registry
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(self._path.read_bytes())
            if isinstance(doc, dict):
                self._doc = doc
        self.changed = False

    def sources(self, digest: str, repo: str) -> list[str]:
        reg = self._doc.get(self._registry)
        repos = reg.get(digest) if isinstance(reg, dict) else None
        if not isinstance(repos, list):
            return []
        return [r for r in repos if isinstance(r, str) and r != repo][-3:]

    def add(self, digest: str, repo: str) -> None:
        with self._lock:
            reg = self._doc.setdefault(self._registry, {})
            if not isinstance(reg, dict):
                reg = self._doc[self._registry] = {}
            repos = reg.setdefault(digest, [])
            if isinstance(repos, list) and repo not in repos:
                repos.append(repo)
                self.changed = True

    def save(self) -> None:
        if self.changed:
            with contextlib.suppress(OSError):
                write_atomic(self._path, oci.canonical_json(self._doc))


# -- push --------------------------------------------------------------------------------


class _Pusher:
    def __init__(
        self,
        store: ImageStore,
        client: RegistryClient,
        repo: str,
        options: TransferOptions,
        observer: TransferObserver,
        hints: _Hints,
    ) -> None:
        self.store = store
        self.client = client
        self.repo = repo
        self.options = options
        self.observer = observer
        self.hints = hints

    def _read(self, digest: str, offset: int, size: int) -> bytes:
        with self.store.open_blob(digest) as fh:
            fh.seek(offset)
            return fh.read(size)

    def blob(self, desc: oci.Descriptor, what: str) -> BlobReport:
        if not self.store.has_blob(desc.digest, desc.size):
            raise NotFoundError(
                f"blob {desc.digest} ({what}) is missing from {self.store.root} or has the "
                "wrong size"
            )
        if self.client.blob_exists(self.repo, desc.digest, push=True):
            self.hints.add(desc.digest, self.repo)
            self.observer.finish(desc.digest, "skipped")
            return BlobReport(desc.digest, desc.size, "skipped")
        location: str | None = None
        for source in self.hints.sources(desc.digest, self.repo):
            location = self.client.mount_blob(self.repo, desc.digest, source)
            if location is None:
                self.hints.add(desc.digest, self.repo)
                self.observer.finish(desc.digest, "mounted")
                return BlobReport(desc.digest, desc.size, "mounted")
        self.observer.start(desc.digest, desc.size, what)
        if location is None:
            location = self.client.start_upload(self.repo)
        if desc.size <= self.options.monolithic_max:
            body = self._read(desc.digest, 0, desc.size)
            self.client.finish_upload(self.repo, location, desc.digest, body)
            self.observer.advance(desc.digest, len(body))
        else:
            self._chunked(desc, location)
        self.hints.add(desc.digest, self.repo)
        self.observer.finish(desc.digest, "uploaded")
        return BlobReport(desc.digest, desc.size, "uploaded")

    def _chunked(self, desc: oci.Descriptor, location: str) -> None:
        offset = 0
        failures = 0
        transport = self.options.transport
        delay = transport.backoff
        while offset < desc.size:
            size = min(self.options.chunk_size, desc.size - offset)
            chunk = self._read(desc.digest, offset, size)
            try:
                location = self.client.upload_chunk(self.repo, location, offset, chunk)
            except (OSError, http.client.HTTPException) as exc:
                lost: BaseException = exc
            else:
                offset += len(chunk)
                self.observer.advance(desc.digest, len(chunk))
                continue
            failures += 1
            if failures >= transport.attempts:
                raise RegistryError(
                    f"registry {self.client.host}: upload of {desc.digest} kept failing at "
                    f"byte {offset} ({lost or type(lost).__name__})"
                )
            transport.sleep(min(delay, 5.0))
            delay *= 2
            held_at = offset
            status = self.client.upload_status(self.repo, location)
            if status is None:  # the session is gone: this blob starts over in a new one
                location, offset = self.client.start_upload(self.repo), 0
                self.observer.advance(desc.digest, -held_at)
                continue
            location, offset = status
            if offset > held_at + len(chunk):
                raise RegistryError(
                    f"registry {self.client.host}: upload of {desc.digest} reports "
                    f"{offset} bytes held, more than were sent"
                )
            self.observer.advance(desc.digest, offset - held_at)
        self.client.finish_upload(self.repo, location, desc.digest)

    def blobs(self, items: Sequence[tuple[oci.Descriptor, str]]) -> list[BlobReport]:
        unique = list({d.digest: (d, w) for d, w in items}.values())
        if len(unique) <= 1 or self.options.workers <= 1:
            return [self.blob(d, w) for d, w in unique]
        from concurrent.futures import ThreadPoolExecutor  # only when there is work to share

        with ThreadPoolExecutor(max_workers=self.options.workers) as pool:
            futures = [pool.submit(self.blob, d, w) for d, w in unique]
            return [f.result() for f in futures]


def _cosign_config(layers: Sequence[oci.Descriptor]) -> bytes:
    zero = "0001-01-01T00:00:00Z"
    return oci.canonical_json(
        {
            "architecture": "",
            "config": {},
            "created": zero,
            "history": [{"created": zero}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [d.digest for d in layers]},
        }
    )


def _cosign_layers(
    store: ImageStore, refs: Sequence[oci.Descriptor], kind: str
) -> list[oci.Descriptor]:
    out: list[oci.Descriptor] = []
    for ref in refs:
        if ref.artifact_type != kind:
            continue
        art = store.read_json(ref.digest)
        ann = art.get("annotations") if isinstance(art.get("annotations"), dict) else {}
        assert isinstance(ann, dict)
        keyid = ann.get(oci.ANN_KEYID)
        for layer in oci.manifest_layers(art, f"artifact {ref.digest}"):
            if kind == oci.SIGNATURE_ARTIFACT and layer.media_type == oci.SIMPLE_SIGNING:
                extra = dict(layer.annotations)
            elif kind == oci.DSSE and layer.media_type == oci.DSSE:
                extra = {oci.ANN_SIGNATURE: ""}
                predicate = ann.get(oci.ANN_PREDICATE_TYPE)
                if isinstance(predicate, str):
                    extra[COSIGN_PREDICATE] = predicate
            else:
                continue
            if isinstance(keyid, str):
                extra[oci.ANN_KEYID] = keyid
            out.append(
                oci.Descriptor(layer.media_type, layer.digest, layer.size, annotations=extra)
            )
    return out


def _merge_layers(
    existing: Manifest | None, ours: list[oci.Descriptor], where: str
) -> list[oci.Descriptor]:
    merged: list[oci.Descriptor] = []
    seen: set[tuple[str, str]] = set()
    theirs: list[oci.Descriptor] = []
    if existing is not None:
        with contextlib.suppress(ImageError):
            theirs = oci.manifest_layers(existing.json(where), where)
    for d in [*theirs, *ours]:
        key = (d.digest, d.annotations.get(oci.ANN_SIGNATURE, ""))
        if key not in seen:
            seen.add(key)
            merged.append(d)
    return merged


def push(
    store: ImageStore,
    digest: Digest,
    reference: Reference,
    *,
    environ: Mapping[str, str],
    options: TransferOptions | None = None,
    observer: TransferObserver | None = None,
) -> PushResult:
    """Push image ``digest`` from the store to ``reference`` (its tag, if any, is set
    after the manifest is stored by digest), with its signatures and provenance.

    Raises:
        NotFoundError: when the image or one of its blobs is not in the store.
        RegistryAuthError: when the registry refuses the credentials.
        RegistryError: when the registry cannot be reached, keeps failing, or refuses content.
        UsageError: when ``reference`` names a digest other than the image's.
    """
    options = options or TransferOptions()
    observer = observer or SilentObserver()
    if reference.digest is not None and reference.digest != digest:
        raise UsageError(f"{reference} names another digest than the image {digest}")
    image = store.image(digest)
    raw = store.read_blob(digest)
    media = image.descriptor().media_type
    client = client_for(reference, environ, options.transport)
    repo = reference.repository
    hints = _Hints(store, reference.api_host)
    pusher = _Pusher(store, client, repo, options, observer, hints)
    try:
        blobs: list[BlobReport] = []
        # The registry stores a manifest only once every blob it names is there, so a tag
        # (or digest) that already names this image means there is nothing to send.
        tagged = reference.tag is not None and client.manifest_digest(repo, reference.tag) == digest
        if tagged or client.manifest_exists(repo, digest):
            blobs = [
                BlobReport(d.digest, d.size, "skipped")
                for d in [image.config_descriptor, *image.layers]
            ]
        else:
            items = [(image.config_descriptor, "config")]
            items += [(layer, f"layer {i + 1}") for i, layer in enumerate(image.layers)]
            blobs = pusher.blobs(items)
            client.put_manifest(repo, digest, raw, media)
        if reference.tag is not None and not tagged:
            client.put_manifest(repo, reference.tag, raw, media)
        referrers, api, tags = _push_referrers(store, pusher, image.descriptor())
        hints.save()
        return PushResult(
            reference=str(reference.with_digest(digest)),
            digest=digest,
            blobs=tuple(blobs),
            referrers=tuple(referrers),
            cosign_tags=tuple(tags),
            referrers_api=api,
            requests=len(client.requests),
        )
    finally:
        client.close()


def _push_referrers(
    store: ImageStore, pusher: _Pusher, subject: oci.Descriptor
) -> tuple[list[Digest], bool, list[str]]:
    client, repo = pusher.client, pusher.repo
    refs = [
        r
        for r in store.referrers(subject.digest)
        if r.artifact_type in (oci.SIGNATURE_ARTIFACT, oci.DSSE, oci.IN_TOTO)
    ]
    if not refs:
        return [], False, []
    api = client.referrers(repo, subject.digest) is not None
    listed = set() if api else _fallback_listed(client, repo, subject.digest)
    pushed: list[Digest] = []
    for ref in refs:
        if ref.digest not in listed and not client.manifest_exists(repo, ref.digest):
            art = store.read_json(ref.digest)
            where = f"artifact {ref.digest}"
            items = [(oci.manifest_config(art, where), "artifact config")]
            items += [(d, "artifact") for d in oci.manifest_layers(art, where)]
            pusher.blobs(items)
            client.put_manifest(repo, ref.digest, store.read_blob(ref.digest), oci.MANIFEST)
        pushed.append(ref.digest)
    if not api and not {r.digest for r in refs} <= listed:
        _update_fallback_index(client, repo, subject.digest, refs)
    tags: list[str] = []
    suffixes: tuple[tuple[str, Literal["sig", "att"]], ...] = (
        (oci.SIGNATURE_ARTIFACT, "sig"),
        (oci.DSSE, "att"),
    )
    for kind, suffix in suffixes:
        layers = _cosign_layers(store, refs, kind)
        if not layers:
            continue
        tag = cosign_tag(subject.digest, suffix)
        existing = client.get_manifest(repo, tag, push=True)
        merged = _merge_layers(existing, layers, f"{repo}:{tag}")
        config = _cosign_config(merged)
        config_desc = oci.Descriptor(oci.CONFIG, store.put_bytes(config), len(config))
        manifest = oci.canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": oci.MANIFEST,
                "config": config_desc.to_json(),
                "layers": [d.to_json() for d in merged],
            }
        )
        if existing is None or existing.data != manifest:  # else every blob is there already
            pusher.blobs([*((d, "signature") for d in layers), (config_desc, "signature config")])
            client.put_manifest(repo, tag, manifest, oci.MANIFEST)
        tags.append(tag)
    return pushed, api, tags


def _fallback_listed(client: RegistryClient, repo: str, subject: Digest) -> set[str]:
    """Digests listed in the ``sha256-<hex>`` fallback index (castiron writes it only after
    pushing what it lists, so those are known to be there)."""
    existing = client.get_manifest(repo, fallback_tag(subject), push=True)
    if existing is None:
        return set()
    with contextlib.suppress(ImageError):
        found = existing.json(f"{repo}:{fallback_tag(subject)}").get("manifests")
        if isinstance(found, list):
            return {d["digest"] for d in found if isinstance(d, dict) and "digest" in d}
    return set()


def _update_fallback_index(
    client: RegistryClient, repo: str, subject: Digest, refs: Sequence[oci.Descriptor]
) -> None:
    tag = fallback_tag(subject)
    existing = client.get_manifest(repo, tag, push=True)
    items: list[dict[str, Any]] = []
    if existing is not None:
        with contextlib.suppress(ImageError):
            doc = existing.json(f"{repo}:{tag}")
            found = doc.get("manifests")
            if isinstance(found, list):
                items = [d for d in found if isinstance(d, dict)]
    known = {d.get("digest") for d in items}
    for ref in refs:
        if ref.digest not in known:
            desc = oci.Descriptor(
                oci.MANIFEST,
                ref.digest,
                ref.size,
                artifact_type=ref.artifact_type,
            )
            items.append(desc.to_json())
    index = oci.canonical_json({"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": items})
    if existing is None or existing.data != index:
        client.put_manifest(repo, tag, index, oci.INDEX)


# -- pull ----------------------------------------------------------------------------------


def _download(
    client: RegistryClient,
    store: ImageStore,
    repo: str,
    desc: oci.Descriptor,
    what: str,
    options: TransferOptions,
    observer: TransferObserver,
) -> BlobReport:
    if store.has_blob(desc.digest, desc.size):
        observer.finish(desc.digest, "present")
        return BlobReport(desc.digest, desc.size, "present")
    observer.start(desc.digest, desc.size, what)
    transport = options.transport
    delay = transport.backoff
    failures = 0
    where = f"registry {client.host}: {repo} {what} {desc.digest}"
    with store.writer() as w:
        while True:
            resp = client.get_blob(repo, desc.digest, offset=w.size)
            skip = w.size if resp.status == 200 else 0
            lost: BaseException | None = None
            try:
                for block in resp.stream(_BLOCK):
                    if skip:
                        cut = min(skip, len(block))
                        block, skip = block[cut:], skip - cut
                    if w.size + len(block) > desc.size:
                        resp.close()
                        raise DigestMismatchError(
                            f"{where}: the registry sent more than the {desc.size} bytes of its "
                            "descriptor; refused"
                        )
                    w.write(block)
                    observer.advance(desc.digest, len(block))
            except (OSError, http.client.HTTPException) as exc:
                lost = exc
            if w.size == desc.size:
                break
            failures += 1
            if failures >= transport.attempts:
                detail = f"connection lost ({lost})" if lost else "the body was truncated"
                raise RegistryError(
                    f"{where}: got {w.size} of {desc.size} bytes after {failures} tries; {detail}"
                )
            transport.sleep(min(delay, 5.0))
            delay *= 2
        try:
            w.commit(desc.digest, where)
        except DigestMismatchError:
            raise DigestMismatchError(
                f"{where}: content does not match its digest; refused, nothing stored"
            ) from None
    observer.finish(desc.digest, "downloaded")
    return BlobReport(desc.digest, desc.size, "downloaded")


def _download_all(
    client: RegistryClient,
    store: ImageStore,
    repo: str,
    todo: list[tuple[oci.Descriptor, str]],
    options: TransferOptions,
    observer: TransferObserver,
    referrers: _Pull,
    subject: oci.Descriptor,
) -> list[BlobReport]:
    """Download the blobs of ``todo`` (reports in its order) and fetch ``subject``'s
    signatures and provenance; with several workers all at once, the largest blobs first (the
    longest download starts at once), the referrers next to them."""
    if options.workers <= 1 or len(todo) <= 1:
        done = [_download(client, store, repo, d, w, options, observer) for d, w in todo]
        referrers.fetch(subject)
        return done
    from concurrent.futures import Future, ThreadPoolExecutor

    order = sorted(range(len(todo)), key=lambda i: -todo[i][0].size)
    with ThreadPoolExecutor(max_workers=min(options.workers, len(todo) + 1)) as pool:
        found = pool.submit(referrers.fetch, subject)
        futures: dict[int, Future[BlobReport]] = {
            i: pool.submit(_download, client, store, repo, *todo[i], options, observer)
            for i in order
        }
        errors: list[BaseException] = []
        reports: list[BlobReport] = []
        for i in range(len(todo)):
            try:
                reports.append(futures[i].result())
            except BaseException as exc:  # every worker finishes before we leave
                errors.append(exc)
        try:
            found.result()
        except BaseException as exc:
            errors.append(exc)
        if errors:
            raise errors[0]
    return reports


def _fetch_manifest(client: RegistryClient, repo: str, selector: str) -> Manifest:
    found = client.get_manifest(repo, selector)
    if found is None:
        what = f"tag {selector!r}" if not selector.startswith("sha256:") else selector
        raise NotFoundError(f"registry {client.host}: {repo} has no {what}")
    if selector.startswith("sha256:") and found.digest != selector:
        raise DigestMismatchError(
            f"registry {client.host}: {repo}@{selector} returned content hashing to "
            f"{found.digest}; refused"
        )
    return found


def _pick_platform(client: RegistryClient, repo: str, index: Manifest) -> oci.Descriptor:
    where = f"registry {client.host}: index {index.digest}"
    doc = index.json(where)
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise ImageError(f"{where}: no manifests list")
    want = oci.host_platform()
    for i, item in enumerate(items):
        d = oci.Descriptor.from_json(item, f"{where}: manifests[{i}]")
        plat = d.platform or {}
        if plat.get("os") == want["os"] and plat.get("architecture") == want["architecture"]:
            return d
    raise NotFoundError(f"{where}: no image for {want['os']}/{want['architecture']}")


class _Pull:
    """The signatures and provenance of a pulled image, in two phases: :meth:`fetch` (network
    and blobs only, so it can run while the layers download) and :meth:`publish` (the index
    entries, once the image itself is stored)."""

    def __init__(self, store: ImageStore, client: RegistryClient, repo: str) -> None:
        self.store = store
        self.client = client
        self.repo = repo
        self.added: list[Digest] = []
        self._pending: list[Callable[[], None]] = []

    def small_blob(self, desc: oci.Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise RegistryError(f"registry {self.client.host}: blob {desc.digest} is too large")
        data = self.client.read_blob(self.repo, desc.digest, limit)
        self.store.put_bytes(data, desc.digest, f"registry {self.client.host}: blob")
        return data

    def artifact(self, desc: oci.Descriptor, subject: Digest) -> None:
        found = _fetch_manifest(self.client, self.repo, desc.digest)
        art = found.json(f"artifact {desc.digest}")
        where = f"artifact {desc.digest}"
        for d in [oci.manifest_config(art, where), *oci.manifest_layers(art, where)]:
            self.small_blob(d, oci.MAX_JSON_BYTES)
        self.store.put_bytes(found.data, desc.digest)
        artifact_type = art.get("artifactType")
        listed = oci.Descriptor(
            oci.MANIFEST,
            desc.digest,
            len(found.data),
            annotations={oci.ANN_SUBJECT: subject},
            artifact_type=artifact_type if isinstance(artifact_type, str) else desc.artifact_type,
        )

        def publish() -> None:
            self.store.add_referrer(listed)
            self.added.append(desc.digest)

        self._pending.append(publish)

    def cosign(self, subject: oci.Descriptor) -> None:
        kinds: tuple[tuple[Literal["sig", "att"], str, str], ...] = (
            ("sig", oci.SIGNATURE_ARTIFACT, oci.SIMPLE_SIGNING),
            ("att", oci.DSSE, oci.DSSE),
        )
        for suffix, kind, layer_type in kinds:
            tag = cosign_tag(subject.digest, suffix)
            found = self.client.get_manifest(self.repo, tag)
            if found is None:
                continue
            where = f"{self.repo}:{tag}"
            for layer in oci.manifest_layers(found.json(where), where):
                if layer.media_type != layer_type:
                    continue
                data = self.small_blob(layer, _MAX_PAYLOAD_BYTES)
                keyid = layer.annotations.get(oci.ANN_KEYID)
                manifest_ann = {oci.ANN_KEYID: keyid} if keyid else {}
                if kind == oci.SIGNATURE_ARTIFACT:
                    sig = layer.annotations.get(oci.ANN_SIGNATURE, "")
                    desc = oci.Descriptor(
                        oci.SIMPLE_SIGNING,
                        layer.digest,
                        layer.size,
                        {oci.ANN_SIGNATURE: sig},
                    )
                else:
                    predicate = layer.annotations.get(COSIGN_PREDICATE)
                    if predicate:
                        manifest_ann[oci.ANN_PREDICATE_TYPE] = predicate
                    desc = oci.Descriptor(oci.DSSE, layer.digest, layer.size)
                self._pending.append(
                    functools.partial(self._attach, subject, kind, desc, manifest_ann, data)
                )

    def _attach(
        self,
        subject: oci.Descriptor,
        kind: str,
        desc: oci.Descriptor,
        annotations: dict[str, str],
        data: bytes,
    ) -> None:
        self.added.append(self.store.attach(subject, kind, desc, annotations))
        if kind == oci.DSSE:
            self._statement_from_envelope(subject, data)

    def _statement_from_envelope(self, subject: oci.Descriptor, envelope: bytes) -> None:
        from castiron.images import provenance  # (its layer module is costly to import)
        from castiron.images.sign import b64decode_strict

        with contextlib.suppress(CastironError, ValueError, KeyError, TypeError):
            doc = oci.parse_json_object(envelope, "DSSE envelope")
            statement = oci.parse_json_object(b64decode_strict(doc["payload"]), "DSSE payload")
            if statement.get("_type") == provenance.STATEMENT_TYPE:
                self.added.append(provenance.attach(self.store, subject, statement))

    def fetch(self, subject: oci.Descriptor) -> None:
        """Find ``subject``'s signatures and provenance and store their blobs (not listed in
        the index yet: see :meth:`publish`)."""
        listed = self.client.referrers(self.repo, subject.digest)
        if listed is None:
            index = self.client.get_manifest(self.repo, fallback_tag(subject.digest))
            if index is not None:
                where = f"{self.repo}:{fallback_tag(subject.digest)}"
                items = index.json(where).get("manifests")
                listed = [
                    oci.Descriptor.from_json(d, f"{where}: manifests[{i}]")
                    for i, d in enumerate(items if isinstance(items, list) else [])
                ]
        wanted = (oci.SIGNATURE_ARTIFACT, oci.DSSE, oci.IN_TOTO)
        if listed is None:
            self.cosign(subject)
            return
        for desc in listed:
            if desc.artifact_type in wanted and desc.size <= oci.MAX_JSON_BYTES:
                self.artifact(desc, subject.digest)

    def publish(self) -> None:
        """List what :meth:`fetch` found in the index (call once the image is stored)."""
        pending, self._pending = self._pending, []
        for step in pending:
            step()

    def take_back(self) -> None:
        added = set(self.added)
        if added:
            with contextlib.suppress(CastironError):
                self.store.update_index(lambda cur: [d for d in cur if d.digest not in added])


def pull(
    store: ImageStore,
    reference: Reference,
    *,
    environ: Mapping[str, str],
    options: TransferOptions | None = None,
    observer: TransferObserver | None = None,
    tag: str | None = None,
    verify_keys: Sequence[Path | bytes | VerifyKey] = (),
) -> PullResult:
    """Pull ``reference`` into the store with its signatures and provenance; bind ``tag``
    when given; with ``verify_keys``, keep it only when a signature by one of them verifies.

    Raises:
        UsageError: for a bad tag or key.
        NotFoundError: when the registry has no such tag, digest or platform.
        DigestMismatchError: when the registry sends content that does not match its digest.
        RegistryAuthError, RegistryError: when the registry refuses or fails.
        PolicyRefusedError: when ``verify_keys`` are given and the image does not verify.
        ImageError: when the manifest is not an image, or too large.
        TagConflictError: when ``tag`` is bound to another image.
    """
    from castiron.images.store import check_tag

    if tag is not None:
        check_tag(tag)

    keys: list[VerifyKey] = []
    if verify_keys:  # a bad key fails before anything is fetched
        from castiron.images.sign import VerifyKey as _Key
        from castiron.images.sign import load_verify_key

        keys = [k if isinstance(k, _Key) else load_verify_key(k) for k in verify_keys]
    options = options or TransferOptions()
    observer = observer or SilentObserver()
    client = client_for(reference, environ, options.transport)
    repo = reference.repository
    store.ensure()
    mark = len(store.created_blobs)
    state = _Pull(store, client, repo)
    try:
        with store.using():
            top = _fetch_manifest(client, repo, reference.selector)
            index_digest: Digest | None = None
            found = top
            if top.media_type in oci.INDEX_TYPES:
                index_digest = top.digest
                chosen = _pick_platform(client, repo, top)
                found = _fetch_manifest(client, repo, chosen.digest)
            if found.media_type not in oci.MANIFEST_TYPES:
                raise ImageError(
                    f"registry {client.host}: {reference} is {found.media_type!r}, not an image"
                )
            where = f"registry {client.host}: manifest {found.digest}"
            manifest = found.json(where)
            config = oci.manifest_config(manifest, where)
            layers = oci.manifest_layers(manifest, where)
            if config.size > oci.MAX_JSON_BYTES:
                raise ImageError(f"{where}: config of {config.size} bytes is too large")
            subject = oci.Descriptor(found.media_type, found.digest, len(found.data))
            todo = [(config, "config"), *((d, f"layer {i + 1}") for i, d in enumerate(layers))]
            reports = _download_all(client, store, repo, todo, options, observer, state, subject)
            oci.parse_json_object(store.read_blob(config.digest), f"{where}: config")
            store.put_bytes(found.data, found.digest, where)
            store.image(found.digest)
            state.publish()
            verified_by = None
            if keys:
                from castiron.images.sign import verify_image

                result = verify_image(store, found.digest, keys)
                if not result.ok:
                    raise PolicyRefusedError(
                        f"pull of {reference}: {result.message()}", rule="require_signature"
                    )
                verified_by = result.verified_by.source if result.verified_by else None
            if tag is not None:
                store.tag(subject, [tag], {})
            return PullResult(
                reference=str(reference.with_digest(found.digest)),
                digest=found.digest,
                config_digest=config.digest,
                index_digest=index_digest,
                blobs=tuple(reports),
                referrers=tuple(state.added),
                tag=tag,
                verified_by=verified_by,
            )
    except CastironError:
        state.take_back()
        store.discard_created(mark)
        raise
    finally:
        client.close()


def resolve(
    reference: Reference,
    *,
    environ: Mapping[str, str],
    options: TransferOptions | None = None,
) -> Digest:
    """The digest ``reference`` names right now (the manifest's, or the index's).

    Raises:
        NotFoundError, DigestMismatchError, RegistryAuthError, RegistryError: see :func:`pull`.
    """
    options = options or TransferOptions()
    client = client_for(reference, environ, options.transport)
    try:
        return _fetch_manifest(client, reference.repository, reference.selector).digest
    finally:
        client.close()


__all__ = [
    "BlobReport",
    "PullResult",
    "PushResult",
    "SilentObserver",
    "TransferObserver",
    "TransferOptions",
    "cosign_tag",
    "fallback_tag",
    "options_from",
    "pull",
    "push",
    "resolve",
]


def options_from(
    environ: Mapping[str, str],
    *,
    insecure: Sequence[str] = (),
    ca_file: Path | None = None,
) -> TransferOptions:
    """Transfer options from captured settings: ``insecure`` registries plus those listed in
    ``CASTIRON_REGISTRY_INSECURE`` (comma-separated ``host[:port]``), ``ca_file`` else
    ``CASTIRON_REGISTRY_CA_FILE``, and CA directories laid out as Docker's ``certs.d``
    (``CASTIRON_REGISTRY_CERTS_DIR``, ``~/.docker/certs.d``, ``/etc/docker/certs.d``)."""
    hosts = {h.strip() for h in environ.get("CASTIRON_REGISTRY_INSECURE", "").split(",")}
    hosts.update(insecure)
    hosts.discard("")
    if ca_file is None and environ.get("CASTIRON_REGISTRY_CA_FILE"):
        ca_file = Path(environ["CASTIRON_REGISTRY_CA_FILE"])
    dirs: list[Path] = []
    if environ.get("CASTIRON_REGISTRY_CERTS_DIR"):
        dirs.append(Path(environ["CASTIRON_REGISTRY_CERTS_DIR"]))
    if environ.get("HOME"):
        dirs.append(Path(environ["HOME"]) / ".docker" / "certs.d")
    dirs.append(Path("/etc/docker/certs.d"))
    return TransferOptions(
        transport=TransportOptions(
            insecure=frozenset(hosts), ca_file=ca_file, certs_dirs=tuple(dirs)
        )
    )
