"""The store: atomic verified blobs, immutable tags, references, concurrent writers, prune."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from castiron.errors import DigestMismatchError, NotFoundError, TagConflictError, UsageError
from castiron.images import oci
from castiron.images.store import TMP_PREFIX, ImageStore, prune
from castiron.model import Digest

from .bakekit import APP_FILES, run_bake, write_tree


def _digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def test_blob_with_wrong_content_is_never_published(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    wanted = _digest(b"right")
    with store.writer() as w:
        w.write(b"wrong")
        with pytest.raises(DigestMismatchError, match="expected " + wanted):
            w.commit(wanted)
    assert not store.has_blob(wanted)
    assert not store.has_blob(_digest(b"wrong"))
    assert os.listdir(store.blobs_dir) == []


def test_put_bytes_refuses_a_mismatch(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    with pytest.raises(DigestMismatchError):
        store.put_bytes(b"data", _digest(b"other"))
    assert not store.blobs_dir.exists() or os.listdir(store.blobs_dir) == []


def test_truncated_temp_file_is_ignored_and_pruned(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    store.ensure()
    data = b"x" * 1000
    digest = _digest(data)
    (store.blobs_dir / f"{TMP_PREFIX}crash").write_bytes(data[:10])
    assert not store.has_blob(digest)
    assert store.put_bytes(data) == digest
    assert store.read_blob(digest) == data
    old = 1_000_000
    os.utime(store.blobs_dir / f"{TMP_PREFIX}crash", (old, old))
    report = prune(store, dry_run=False)
    assert report.temp_files == 1
    assert not (store.blobs_dir / f"{TMP_PREFIX}crash").exists()


def test_damaged_blob_is_detected_on_read(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store")
    digest = store.put_bytes(b'{"a": 1}')
    store.blob_path(digest).write_bytes(b'{"a": 2}')
    with pytest.raises(DigestMismatchError, match="damaged"):
        store.read_json(digest)


def test_layout_files_are_valid(tmp_path: Path) -> None:
    result = run_bake(tmp_path / "store", write_tree(tmp_path / "ctx", APP_FILES), tags=("v1",))
    root = tmp_path / "store"
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    assert index["schemaVersion"] == 2 and index["mediaType"] == oci.INDEX
    tagged = [m for m in index["manifests"] if oci.ANN_REF_NAME in m.get("annotations", {})]
    assert tagged == [
        {
            "mediaType": oci.MANIFEST,
            "digest": result.digest,
            "size": ImageStore(root).blob_path(result.digest).stat().st_size,
            "annotations": {oci.ANN_REF_NAME: "v1", oci.ANN_VERSION: "v1"},
        }
    ]
    for path in (root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name


def test_tags_never_move(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    first = run_bake(tmp_path / "store", ctx, tags=("v1",))
    again = run_bake(tmp_path / "store", ctx, tags=("v1",))
    assert again.digest == first.digest
    (ctx / "server.py").write_text("print('changed')\n")
    with pytest.raises(TagConflictError, match="'v1' is already bound to " + first.digest):
        run_bake(tmp_path / "store", ctx, tags=("v1",))
    assert ImageStore(tmp_path / "store").tags() == {"v1": first.digest}


def test_invalid_tag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid tag"):
        run_bake(tmp_path / "store", write_tree(tmp_path / "ctx", APP_FILES), tags=("-bad",))


def test_resolve_by_tag_digest_and_prefix(tmp_path: Path) -> None:
    result = run_bake(tmp_path / "store", write_tree(tmp_path / "ctx", APP_FILES), tags=("v1",))
    store = ImageStore(tmp_path / "store")
    hexd = result.digest.split(":")[1]
    assert store.resolve("v1") == result.digest
    assert store.resolve(result.digest) == result.digest
    assert store.resolve(hexd[:12]) == result.digest
    assert store.resolve("sha256:" + hexd[:20]) == result.digest
    with pytest.raises(UsageError, match="at least 12"):
        store.resolve(hexd[:8])
    with pytest.raises(NotFoundError):
        store.resolve("nope")
    with pytest.raises(NotFoundError):
        store.resolve("0" * 12 if not hexd.startswith("0" * 12) else "f" * 12)


def _tag_many(root: str, start: int) -> None:
    store = ImageStore(Path(root))
    data = f"manifest {start}".encode()
    digest = store.put_bytes(data)
    for i in range(start, start + 20):
        store.tag(oci.Descriptor(oci.MANIFEST, digest, len(data)), [f"t{i}"], {})


def test_concurrent_writers_lose_no_tag(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ImageStore(root).ensure()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_tag_many, args=(str(root), n * 100)) for n in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    tags = ImageStore(root).tags()
    assert len(tags) == 60


def test_prune_keeps_tagged_and_kept_images(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    tagged = run_bake(root, ctx, tags=("v1",))
    (ctx / "server.py").write_text("print('two')\n")
    kept = run_bake(root, ctx, tags=("v2",))
    store = ImageStore(root)
    # Untag v2 by rewriting the index (as if it were only a retained release now).
    store.update_index(lambda ds: [d for d in ds if d.annotations.get(oci.ANN_REF_NAME) != "v2"])
    orphan = store.put_bytes(b"orphan")
    dry = prune(store, keep={kept.digest})
    assert dry.dry_run and orphan in dry.removed_blobs
    assert store.has_blob(orphan)
    assert tagged.digest in dry.kept_images and kept.digest in dry.kept_images
    report = prune(store, keep={kept.digest}, dry_run=False)
    assert orphan in report.removed_blobs
    assert not store.has_blob(orphan)
    for digest in (tagged.digest, kept.digest):
        image = store.image(digest)
        assert all(store.has_blob(layer.digest) for layer in image.layers)
    # Without the keep root, the untagged image goes, and its provenance entry with it.
    final = prune(store, dry_run=False)
    assert kept.digest in final.removed_blobs
    assert kept.provenance in final.dropped_entries
    assert store.image(tagged.digest).digest == tagged.digest
    assert [d.digest for d in store.referrers(tagged.digest)] == [tagged.provenance]


def test_prune_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    report = prune(ImageStore(tmp_path / "none"), dry_run=False)
    assert report.removed_blobs == () and report.kept_images == ()


def test_images_listing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    result = run_bake(root, write_tree(tmp_path / "ctx", APP_FILES), tags=("v1", "latest-good"))
    (summary,) = ImageStore(root).images()
    assert summary.digest == result.digest
    assert summary.tags == ("v1", "latest-good")
    assert summary.layers == 1
    assert summary.size == sum(layer.size for layer in result.layers)
    assert summary.created == "2023-11-14T22:13:20Z"
