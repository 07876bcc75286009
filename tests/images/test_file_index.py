"""The file manifest's index form and its cache in the image store."""

from __future__ import annotations

from pathlib import Path

import pytest

from castiron.errors import ImageError
from castiron.images import manifest as fm
from castiron.images import oci
from castiron.images.manifest import FileEntry, FileIndex, file_index, file_manifest
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, run_bake, write_tree

ENTRIES = {
    "/app": FileEntry("/app", "dir", 0o755),
    "/app/run": FileEntry("/app/run", "file", 0o755, 3, "ab" * 32),
    "/app/cur": FileEntry("/app/cur", "symlink", 0o777, target="run"),
    "/app/hard": FileEntry("/app/hard", "hardlink", 0o755, target="/app/run"),
}


def test_index_decodes_what_the_entries_decode() -> None:
    data = fm.encode(ENTRIES)
    index = fm.decode_index(data, "m.json")
    assert dict(index) == fm.decode(data, "m.json") == ENTRIES
    assert len(index) == 4 and "/app/cur" in index and "/nope" not in index
    assert index.get("/nope") is None
    assert FileIndex.of(ENTRIES).raw == index.raw
    assert FileIndex.of(index) is index


@pytest.mark.parametrize(
    ("files", "where"),
    [
        ({"/a": {"type": "fifo", "mode": 420}}, "'/a'"),
        ({"/a": {"type": "file", "mode": "644"}}, "'/a'"),
        ({"/a": {"type": "file", "mode": 420, "size": 1.5}}, "'/a'"),
        ({"/a": {"mode": 420}}, "'/a'"),
        ({"/a": ["file", 420]}, "'/a'"),
        ({"/a": None}, "'/a'"),
    ],
)
def test_a_bad_entry_is_named(files: object, where: str) -> None:
    data = oci.canonical_json({"mediaType": oci.FILES, "files": files})
    with pytest.raises(ImageError, match=rf"m\.json: file manifest: bad entry for {where}"):
        fm.decode_index(data, "m.json")
    with pytest.raises(ImageError, match=where):
        fm.decode(data, "m.json")


@pytest.mark.parametrize(
    "data",
    [b"[]", b"{}", b'{"mediaType": "x", "files": {}}', b"\xff", b'{"files": []}'],
)
def test_not_a_manifest(data: bytes) -> None:
    with pytest.raises(ImageError, match=r"m\.json"):
        fm.decode_index(data, "m.json")


def test_cache_round_trip_and_damage() -> None:
    index = FileIndex.of(ENTRIES)
    blob = fm.encode_index_cache(index)
    back = fm.decode_index_cache(blob)
    assert back is not None and back.raw == index.raw
    damaged = [
        b"",
        blob[:10],
        blob[:-1],
        blob[:60] + bytes([blob[60] ^ 1]) + blob[61:],
        b"castiron files-index 9\n" + blob[len(b"castiron files-index 1\n") :],
        blob + b"x",
    ]
    for data in damaged:
        assert fm.decode_index_cache(data) is None


def test_store_caches_the_index_and_heals_a_damaged_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    result = run_bake(tmp_path / "store", ctx)
    store = ImageStore(tmp_path / "store")
    first = file_index(store, result.digest)
    assert dict(first) == file_manifest(store, result.digest)
    (cached,) = (store.cache_dir / "files-index").iterdir()
    assert cached.name == result.digest.split(":", 1)[1] + ".idx"

    def no_json(data: bytes, where: str) -> FileIndex:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(fm, "decode_index", no_json)
    assert file_index(store, result.digest).raw == first.raw
    monkeypatch.undo()

    cached.write_bytes(cached.read_bytes()[:-3])  # damaged: recomputed and rewritten
    assert file_index(store, result.digest).raw == first.raw
    assert fm.decode_index_cache(cached.read_bytes()) is not None


def test_an_unwritable_cache_costs_only_time(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    result = run_bake(tmp_path / "store", ctx)
    store = ImageStore(tmp_path / "store")
    (store.cache_dir / "files-index").write_text("not a directory")
    assert dict(file_index(store, result.digest)) == file_manifest(store, result.digest)
