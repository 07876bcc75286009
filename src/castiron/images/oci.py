"""OCI vocabulary: media types, annotation keys, descriptors and the canonical JSON encoding.

Owns the shapes of OCI documents (manifest, config, index) as plain dicts and the
:class:`Descriptor` value that points at a blob. It must not touch the filesystem (that is
:mod:`castiron.images.store`) and knows nothing of the spec or of any runtime.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from castiron.errors import ImageError
from castiron.model import Digest, is_digest

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
IN_TOTO = "application/vnd.in-toto+json"
FILES = "application/vnd.castiron.files.v1+json"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = frozenset({MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({INDEX, DOCKER_LIST})
LAYER_TYPES = frozenset({LAYER_TAR, LAYER_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR})

ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"
ANN_REVISION = "org.opencontainers.image.revision"
ANN_SOURCE = "org.opencontainers.image.source"
ANN_VERSION = "org.opencontainers.image.version"
ANN_TITLE = "org.opencontainers.image.title"
ANN_BASE_DIGEST = "org.opencontainers.image.base.digest"
ANN_BASE_NAME = "org.opencontainers.image.base.name"
ANN_FILES = "dev.castiron.files"
ANN_COMPRESSOR = "dev.castiron.compressor"
ANN_SUBJECT = "dev.castiron.subject"

SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
"""``artifactType`` of a signature artifact (cosign's)."""
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
"""Media type of a signed simple-signing payload layer (cosign's)."""
ANN_SIGNATURE = "dev.cosignproject.cosign/signature"
"""Layer annotation holding the base64 DER ECDSA signature (cosign's)."""
ANN_KEYID = "dev.castiron.keyid"
"""Which key claims to have signed (a hint for error messages, never trusted)."""
DSSE = "application/vnd.dsse.envelope.v1+json"
"""``artifactType`` and layer media type of a DSSE envelope."""
ANN_PREDICATE_TYPE = "in-toto.io/predicate-type"

MAX_JSON_BYTES = 16 * 1024 * 1024
"""The largest manifest, config, index or statement castiron will parse."""


def canonical_json(obj: Any) -> bytes:
    """Encode ``obj`` the one way castiron always does: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_json_object(data: bytes, where: str) -> dict[str, Any]:
    """Parse ``data`` as a JSON object.

    Raises:
        ImageError: naming ``where`` when the bytes are not a JSON object or are too large.
    """
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{where}: {len(data)} bytes is too large for a JSON document")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{where}: expected a JSON object")
    return obj


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: its media type, digest and size (plus optional annotations)."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    artifact_type: str | None = None
    platform: dict[str, str] | None = field(default=None, compare=False, hash=False)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as an OCI JSON object."""
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        """Read a descriptor from parsed JSON.

        Raises:
            ImageError: naming ``where`` when a field is missing or malformed.
        """
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: a descriptor must be an object")
        media = obj.get("mediaType")
        digest = obj.get("digest")
        size = obj.get("size")
        if not isinstance(media, str) or not media:
            raise ImageError(f"{where}: descriptor has no mediaType")
        if not isinstance(digest, str) or not is_digest(digest):
            raise ImageError(f"{where}: descriptor digest {digest!r} is not a sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        ann = obj.get("annotations") or {}
        if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
        ):
            raise ImageError(f"{where}: descriptor annotations must map strings to strings")
        artifact = obj.get("artifactType")
        plat = obj.get("platform")
        return cls(
            media_type=media,
            digest=Digest(digest),
            size=size,
            annotations=dict(ann),
            artifact_type=artifact if isinstance(artifact, str) else None,
            platform={str(k): str(v) for k, v in plat.items()} if isinstance(plat, dict) else None,
        )


def manifest_layers(manifest: dict[str, Any], where: str) -> list[Descriptor]:
    """The layer descriptors of an image manifest.

    Raises:
        ImageError: when ``layers`` is missing or malformed.
    """
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{where}: manifest has no layers list")
    return [Descriptor.from_json(item, f"{where}: layers[{i}]") for i, item in enumerate(layers)]


def manifest_config(manifest: dict[str, Any], where: str) -> Descriptor:
    """The config descriptor of an image manifest.

    Raises:
        ImageError: when ``config`` is missing or malformed.
    """
    return Descriptor.from_json(manifest.get("config"), f"{where}: config")


def config_diff_ids(config: dict[str, Any], where: str) -> list[Digest]:
    """The uncompressed layer digests (``rootfs.diff_ids``) of an image config.

    Raises:
        ImageError: when ``rootfs.diff_ids`` is missing or malformed.
    """
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and is_digest(i) for i in ids):
        raise ImageError(f"{where}: config has no valid rootfs.diff_ids")
    return [Digest(i) for i in ids]


def host_platform() -> dict[str, str]:
    """This machine's platform in OCI terms (``linux``/``amd64``, ``arm64``, ...)."""
    machine = platform.machine().lower()
    arch = {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "i686": "386",
        "i386": "386",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)
    return {"os": "linux", "architecture": arch}


def rfc3339(epoch: int) -> str:
    """``epoch`` seconds as an RFC 3339 UTC timestamp with a ``Z`` suffix."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short(digest: str, n: int = 12) -> str:
    """The first ``n`` hex digits of a digest (for display)."""
    return digest.split(":", 1)[-1][:n]


__all__ = [
    "Descriptor",
    "canonical_json",
    "config_diff_ids",
    "host_platform",
    "manifest_config",
    "manifest_layers",
    "parse_json_object",
    "rfc3339",
    "short",
]
