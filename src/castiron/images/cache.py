"""The build cache: finished layers keyed by their input, and the stat cache of a context.

Owns the small JSON files under ``<store>/cache/`` (one per layer key, one per context).
Entries are only hints: a cached layer is used only while its blob is in the store with the
recorded size, and a damaged cache file is ignored. Knows nothing of the spec or of tar.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from castiron.images import oci
from castiron.images.layer import LayerBlob, LayerEntry, compressor_id
from castiron.images.store import ImageStore, write_atomic
from castiron.model import Digest, is_digest

CACHE_VERSION = 1


def layer_key(entries: list[LayerEntry], mtime: int) -> str:
    """The cache key of a layer: a hash of its sorted entries (path, type, mode, size, content
    hash, link target), the mtime and the compressor."""
    doc = {
        "v": CACHE_VERSION,
        "mtime": mtime,
        "compressor": compressor_id(),
        "entries": [e.key() for e in entries],
    }
    return hashlib.sha256(oci.canonical_json(doc)).hexdigest()


class BuildCache:
    """The cache of one store."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self._dir = store.cache_dir

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            obj = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def layer(self, key: str) -> LayerBlob | None:
        """The cached layer for ``key``, if its blob is still in the store."""
        obj = self._read(self._dir / "layers" / f"{key}.json")
        if obj is None:
            return None
        digest, diff_id, size = obj.get("digest"), obj.get("diff_id"), obj.get("size")
        if not (isinstance(digest, str) and is_digest(digest)):
            return None
        if not (isinstance(diff_id, str) and is_digest(diff_id) and isinstance(size, int)):
            return None
        if not self._store.has_blob(digest, size):
            return None
        media = obj.get("media_type")
        return LayerBlob(
            oci.Descriptor(
                media if isinstance(media, str) else oci.LAYER_GZIP, Digest(digest), size
            ),
            Digest(diff_id),
        )

    def save_layer(self, key: str, blob: LayerBlob) -> None:
        """Remember ``blob`` as the layer for ``key``."""
        doc = {
            "digest": blob.descriptor.digest,
            "size": blob.descriptor.size,
            "media_type": blob.descriptor.media_type,
            "diff_id": blob.diff_id,
        }
        write_atomic(self._dir / "layers" / f"{key}.json", oci.canonical_json(doc))

    def assembly(self, key: str) -> dict[str, Any] | None:
        """The finished image recorded for a bake key (a hash of every input), if any."""
        obj = self._read(self._dir / "bakes" / f"{key}.json")
        if obj is None or not all(k in obj for k in ("image", "config_digest", "layers", "inputs")):
            return None
        return obj

    def save_assembly(self, key: str, doc: dict[str, Any]) -> None:
        """Remember the finished image for a bake key."""
        write_atomic(self._dir / "bakes" / f"{key}.json", oci.canonical_json(doc))

    def baked(self, key: str) -> Digest | None:
        """The image last baked from a source key (see :func:`castiron.images.build.source_key`)."""
        obj = self._read(self._dir / "baked" / f"{key}.json")
        digest = obj.get("digest") if obj is not None else None
        return Digest(digest) if isinstance(digest, str) and is_digest(digest) else None

    def save_baked(self, key: str, digest: Digest) -> None:
        """Remember that the sources of ``key`` were baked into ``digest``."""
        write_atomic(self._dir / "baked" / f"{key}.json", oci.canonical_json({"digest": digest}))

    def _stat_path(self, context: Path) -> Path:
        name = hashlib.sha256(str(context.resolve()).encode()).hexdigest()[:24]
        return self._dir / "stat" / f"{name}.json"

    def stat_entries(self, context: Path) -> dict[str, list[int | str]]:
        """The stat cache recorded by the last bake of ``context`` (empty when none)."""
        obj = self._read(self._stat_path(context))
        files = obj.get("files") if obj is not None else None
        if not isinstance(files, dict):
            return {}
        return {str(k): v for k, v in files.items() if isinstance(v, list) and len(v) == 6}

    def save_stat_entries(self, context: Path, entries: dict[str, list[int | str]]) -> None:
        """Record the stat cache of ``context`` for the next bake."""
        doc = {"context": str(context.resolve()), "files": entries}
        write_atomic(self._stat_path(context), json.dumps(doc, separators=(",", ":")).encode())


__all__ = ["CACHE_VERSION", "BuildCache", "layer_key"]
