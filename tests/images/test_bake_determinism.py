"""Same spec + same inputs ⇒ same image digest, whatever the directory, umask, mtimes or
creation order; and the exact bytes of tar headers and gzip framing."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from castiron.images.layer import GZIP_HEADER, LayerEntry, with_parents, write_layer
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, recipe, run_bake, write_tree

SECTION = recipe(layers=["deps/**"], entrypoint=["/app/server.py"], env={"A": "1"})


def _make_context(root: Path, *, umask: int, reverse: bool, mtime_seed: int) -> Path:
    old = os.umask(umask)
    try:
        order = sorted(APP_FILES, reverse=reverse)
        write_tree(root, APP_FILES, order)
        (root / "run.sh").write_text("#!/bin/sh\necho run\n")
        os.chmod(root / "run.sh", 0o777 & ~umask)
        (root / "link").symlink_to("server.py")
        os.link(root / "lib" / "util.py", root / "lib" / "util_again.py")
    finally:
        os.umask(old)
    rng = random.Random(mtime_seed)
    for path in sorted(root.rglob("*")):
        when = rng.randint(1_000_000_000, 1_900_000_000)
        os.utime(path, (when, when), follow_symlinks=False)
    return root


def test_two_directories_two_umasks_two_orders_give_one_digest(tmp_path: Path) -> None:
    a = _make_context(tmp_path / "one" / "ctx", umask=0o022, reverse=False, mtime_seed=1)
    b = _make_context(tmp_path / "two" / "nested" / "ctx", umask=0o002, reverse=True, mtime_seed=2)
    assert (a / "server.py").stat().st_mode != (b / "server.py").stat().st_mode
    ra = run_bake(tmp_path / "store-a", a, SECTION)
    rb = run_bake(tmp_path / "store-b", b, SECTION)
    assert ra.digest == rb.digest
    assert ra.config_digest == rb.config_digest
    assert [layer.digest for layer in ra.layers] == [layer.digest for layer in rb.layers]


def test_touching_every_file_keeps_the_digest(tmp_path: Path) -> None:
    ctx = _make_context(tmp_path / "ctx", umask=0o022, reverse=False, mtime_seed=3)
    first = run_bake(tmp_path / "store", ctx, SECTION)
    for path in ctx.rglob("*"):
        os.utime(path, None, follow_symlinks=False)
    second = run_bake(tmp_path / "store", ctx, SECTION)
    assert second.files_hashed > 0
    assert second.digest == first.digest


def test_epoch_changes_the_digest(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    one = run_bake(tmp_path / "store", ctx, source_date_epoch=1)
    two = run_bake(tmp_path / "store", ctx, source_date_epoch=2)
    assert one.digest != two.digest


def _layer_bytes(tmp_path: Path, result_digest: str, index: int = -1) -> bytes:
    store = ImageStore(tmp_path / "store")
    image = store.image(result_digest)
    return store.blob_path(image.layers[index].digest).read_bytes()


def test_gzip_framing_is_fixed(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    result = run_bake(tmp_path / "store", ctx)
    blob = _layer_bytes(tmp_path, result.digest)
    assert blob[:10] == GZIP_HEADER == bytes.fromhex("1f8b08000000000000ff")
    raw = gzip.decompress(blob)  # checks the CRC-32 and size trailer
    assert int.from_bytes(blob[-4:], "little") == len(raw)


def test_tar_headers_are_normalised_and_sorted(tmp_path: Path) -> None:
    ctx = _make_context(tmp_path / "ctx", umask=0o002, reverse=True, mtime_seed=4)
    result = run_bake(tmp_path / "store", ctx, recipe(workdir="/srv/app"), source_date_epoch=1234)
    raw = gzip.decompress(_layer_bytes(tmp_path, result.digest))
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        members = tf.getmembers()
        assert tf.pax_headers == {}
    names = [m.name for m in members]
    assert names[:4] == ["srv", "srv/app", "srv/app/deps", "srv/app/deps/pkg"]
    assert names == sorted(names, key=lambda n: n.split("/"))
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
        assert m.mtime == 1234
        assert m.pax_headers == {}
        assert m.type not in (tarfile.XHDTYPE, tarfile.XGLTYPE)
        assert m.issym() or m.mode & 0o7022 == 0, m.name
    by_name = {m.name: m for m in members}
    assert by_name["srv/app/run.sh"].mode == 0o755
    assert by_name["srv/app/server.py"].mode == 0o644
    assert by_name["srv/app/link"].issym() and by_name["srv/app/link"].linkname == "server.py"
    again = by_name["srv/app/lib/util_again.py"]
    assert again.islnk() and again.linkname == "srv/app/lib/util.py"
    # Every header block is GNU (no PAX records), with the GNU magic.
    for m in members:
        header = raw[m.offset : m.offset + 512]
        assert header[156:157] not in (b"x", b"g")
        assert header[257:265] == b"ustar  \0"


def test_long_and_non_ascii_names_are_deterministic(tmp_path: Path) -> None:
    long_name = "/".join(["d" * 60] * 3) + "/" + "f" * 120 + ".txt"
    files = {long_name: "x", "caf\u00e9/\u00fcber.txt": "y"}
    a = run_bake(tmp_path / "sa", write_tree(tmp_path / "a", files))
    b = run_bake(tmp_path / "sb", write_tree(tmp_path / "b", files, reversed(list(files))))
    assert a.digest == b.digest
    raw = gzip.decompress(ImageStore(tmp_path / "sa").blob_path(a.layers[-1].digest).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:", encoding="utf-8") as tf:
        names = tf.getnames()
    assert "app/" + long_name in names
    assert "app/caf\u00e9/\u00fcber.txt" in names


@pytest.mark.parametrize("workers", [None, 1, 4])
def test_compressed_bytes_do_not_depend_on_threads(tmp_path: Path, workers: int | None) -> None:
    rng = random.Random(7)
    src = tmp_path / "big.bin"
    # Three and a half chunks: mixed random and repetitive content.
    src.write_bytes(rng.randbytes(1 << 20) + b"abc" * (700_000) + rng.randbytes(1 << 20))
    entry = LayerEntry(
        "big.bin",
        "file",
        0o644,
        src.stat().st_size,
        hashlib.sha256(src.read_bytes()).hexdigest(),
        source=src,
    )
    store = ImageStore(tmp_path / f"store-{workers}")
    if workers is None:
        blob = write_layer(store, with_parents([entry]), 0, None)
    else:
        with ThreadPoolExecutor(workers) as pool:
            blob = write_layer(store, with_parents([entry]), 0, pool)
    expected_store = ImageStore(tmp_path / "reference")
    reference = write_layer(expected_store, with_parents([entry]), 0, None)
    assert blob.descriptor.digest == reference.descriptor.digest
    data = gzip.decompress(store.blob_path(blob.descriptor.digest).read_bytes())
    assert data[512 : 512 + 16] == src.read_bytes()[:16]
