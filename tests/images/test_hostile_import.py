"""Hostile layers are refused when an image enters the store (``castiron import``, a bake's
base image), with the safe unpacker's own message, and the store keeps nothing of them."""

from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from castiron.errors import UnsafeArchiveError
from castiron.images import oci
from castiron.images.archive import import_archive, import_layout
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, recipe, run_bake, write_tree
from .malicious import Member, directory, file, hardlink, layer, special, symlink

# (layers, the entry refused, the unpacker's message)
HOSTILE: dict[str, tuple[tuple[tuple[Member, ...], ...], str, str]] = {
    "dotdot": (
        ((file("../escape", b"x"),),),
        "../escape",
        "layer entry '../escape': name '../escape' has a '..' component",
    ),
    "absolute": (
        ((file("/etc/castiron-pwned", b"x"),),),
        "/etc/castiron-pwned",
        "layer entry '/etc/castiron-pwned': name '/etc/castiron-pwned' is absolute",
    ),
    "device": (
        ((special("dev/mem", tarfile.CHRTYPE),),),
        "dev/mem",
        "layer entry 'dev/mem' is a character device",
    ),
    "hardlink-out": (
        ((hardlink("passwd", "../../etc/passwd"),),),
        "passwd",
        "layer entry 'passwd': hard link target '../../etc/passwd' has a '..' component",
    ),
    "symlink-escape": (
        ((directory("a/"), symlink("a/out", "/etc")), (file("a/out/castiron-pwned", b"x"),)),
        "a/out/castiron-pwned",
        "layer entry 'a/out/castiron-pwned': its parent 'a/out' is a symlink; "
        "entries are never written through symlinks",
    ),
}


def _blob(root: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def oci_layout(root: Path, layers: tuple[bytes, ...], tag: str = "bad") -> Path:
    """An OCI image layout holding one image made of ``layers`` (tar bytes)."""
    root.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids = [f"sha256:{hashlib.sha256(raw).hexdigest()}" for raw in layers]
    descs = [
        {"mediaType": oci.LAYER_GZIP, **_blob(root, gzip.compress(raw, mtime=0))} for raw in layers
    ]
    config = {
        "architecture": oci.host_platform()["architecture"],
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": {"mediaType": oci.CONFIG, **_blob(root, json.dumps(config).encode())},
        "layers": descs,
    }
    mdesc = {"mediaType": oci.MANIFEST, **_blob(root, json.dumps(manifest).encode())}
    mdesc["annotations"] = {oci.ANN_REF_NAME: tag}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    return root


def oci_archive(path: Path, layers: tuple[bytes, ...]) -> Path:
    layout = oci_layout(path.with_suffix(".d"), layers)
    with tarfile.open(path, "w") as tar:
        for item in sorted(layout.rglob("*")):
            if item.is_file():
                tar.add(item, arcname=str(item.relative_to(layout)))
    return path


def _layers(case: str) -> tuple[bytes, ...]:
    return tuple(layer(*members) for members in HOSTILE[case][0])


def _blobs(store: ImageStore) -> set[str]:
    folder = store.root / "blobs" / "sha256"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_import_refuses_a_hostile_layer_and_keeps_nothing(tmp_path: Path, case: str) -> None:
    store = ImageStore(tmp_path / "store")
    store.ensure()
    before = _blobs(store)
    archive = oci_archive(tmp_path / "bad.tar", _layers(case))

    with pytest.raises(UnsafeArchiveError) as caught:
        import_archive(store, archive)

    _, entry, message = HOSTILE[case]
    assert caught.value.entry == entry
    assert caught.value.message.startswith(f"{archive}: image sha256:")
    assert caught.value.message.endswith(f": {message}")
    assert _blobs(store) == before
    assert store.tags() == {}


def test_import_cli_exits_2_with_one_line(run_cli: Any, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "bad.tar", _layers("dotdot"))

    result = run_cli("import", str(archive))

    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {archive}: image sha256:")
    assert lines[0].endswith(HOSTILE["dotdot"][2])
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_bake_refuses_a_hostile_base(tmp_path: Path, kind: str) -> None:
    context = write_tree(tmp_path / "app", APP_FILES)
    layers = _layers("symlink-escape")
    if kind == "oci":
        base = f"oci:{oci_layout(tmp_path / 'base', layers).name}:bad"
    else:
        base = f"oci-archive:{oci_archive(tmp_path / 'base.tar', layers).name}"
    store_root = tmp_path / "store"

    with pytest.raises(UnsafeArchiveError) as caught:
        run_bake(store_root, context, recipe(base=base, entrypoint=["/bin/sh"]))

    assert caught.value.entry == "a/out/castiron-pwned"
    assert caught.value.message.endswith(HOSTILE["symlink-escape"][2])
    assert ImageStore(store_root).images() == []


def test_a_clean_layout_still_imports(tmp_path: Path) -> None:
    layers = (layer(directory("a/"), symlink("a/out", "/etc"), file("a/f", b"x")),)
    store = ImageStore(tmp_path / "store")
    store.ensure()
    image = import_layout(store, oci_layout(tmp_path / "ok", layers), "bad")
    assert len(store.image(image.digest).layers) == 1


def test_layers_are_read_through(tmp_path: Path) -> None:
    # A hard link to a file of a lower layer is fine; the same link after a whiteout is not.
    lower = layer(directory("d/"), file("d/f", b"data"))
    ok = (lower, layer(hardlink("d/h", "d/f")))
    store = ImageStore(tmp_path / "store")
    store.ensure()
    import_archive(store, oci_archive(tmp_path / "ok.tar", ok))
    bad = (lower, layer(file("d/.wh.f")), layer(hardlink("d/h", "d/f")))
    with pytest.raises(UnsafeArchiveError, match="'d/f', which does not exist"):
        import_archive(store, oci_archive(tmp_path / "bad.tar", bad))
