"""Build provenance: an in-toto Statement v1 with an SLSA v1 provenance predicate, stored as an
OCI artifact whose ``subject`` is the image.

Owns the statement's shape and where it lives (an artifact manifest listed in ``index.json``
without a tag). The statement holds only inputs and castiron's version, never wall-clock
times, so rebuilding the same inputs yields the same statement. Knows nothing of the spec
format (callers pass the values) or of runtimes.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from castiron import __version__
from castiron.errors import ImageError
from castiron.images import oci
from castiron.images.layer import compressor_id
from castiron.images.store import ImageStore
from castiron.model import Digest

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://castiron.dev/bake/v1"
BUILDER_ID = "https://castiron.dev/builder/castiron"


@dataclass(frozen=True)
class BuildRecord:
    """What went into a bake."""

    app: str | None
    spec_digest: str | None
    image_section: dict[str, Any]
    build_commands: tuple[str, ...]
    source_date_epoch: int
    base: str
    base_digest: Digest | None
    context_digests: dict[str, str]
    """Input digest of each layer castiron built (name → sha256 hex of its sorted entries)."""
    revision: str | None
    source: str | None
    dirty: bool


def statement(subject: Digest, name: str, record: BuildRecord) -> dict[str, Any]:
    """The in-toto statement for image ``subject``."""
    deps: list[dict[str, Any]] = []
    if record.revision:
        uri = f"git+{record.source}" if record.source else "git"
        deps.append({"uri": uri, "digest": {"gitCommit": record.revision}})
    if record.base_digest:
        deps.append({"uri": record.base, "digest": {"sha256": record.base_digest.split(":", 1)[1]}})
    for layer, digest in sorted(record.context_digests.items()):
        deps.append({"name": f"layer:{layer}", "digest": {"sha256": digest}})
    external: dict[str, Any] = {
        "image": record.image_section,
        "source_date_epoch": record.source_date_epoch,
    }
    if record.app:
        external["app"] = record.app
    if record.spec_digest:
        external["spec_digest"] = record.spec_digest
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": subject.split(":", 1)[1]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": {
                    "build_commands": list(record.build_commands),
                    "dirty": record.dirty,
                    "compressor": compressor_id(),
                },
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {"castiron": __version__, "python": platform.python_version()},
                },
                "metadata": {},
            },
        },
    }


def attach(store: ImageStore, subject: oci.Descriptor, doc: dict[str, Any]) -> Digest:
    """Store ``doc`` as an artifact referring to ``subject`` and list it in the index.

    Raises:
        ImageError: when the store cannot be written.
    """
    data = oci.canonical_json(doc)
    layer = oci.Descriptor(oci.IN_TOTO, store.put_bytes(data), len(data))
    annotations = {"in-toto.io/predicate-type": PREDICATE_TYPE}
    return store.attach(subject, oci.IN_TOTO, layer, annotations)


def read(store: ImageStore, subject: Digest) -> list[dict[str, Any]]:
    """Every provenance statement stored for image ``subject``.

    Raises:
        ImageError: when an artifact is damaged.
    """
    out: list[dict[str, Any]] = []
    for ref in store.referrers(subject):
        if ref.artifact_type != oci.IN_TOTO:
            continue
        art = store.read_json(ref.digest)
        for layer in oci.manifest_layers(art, f"artifact {ref.digest}"):
            if layer.media_type == oci.IN_TOTO:
                doc = store.read_json(layer.digest)
                if doc.get("_type") != STATEMENT_TYPE:
                    raise ImageError(f"artifact {ref.digest}: not an in-toto statement")
                out.append(doc)
    return out


__all__ = ["BuildRecord", "attach", "read", "statement"]
