"""Archives: oci-archive and docker-archive export/import, bad archives, and the real Docker
engine loading what castiron exports."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from castiron.errors import DigestMismatchError, ImageError, UnsafeArchiveError, UsageError
from castiron.images import oci, provenance
from castiron.images.archive import ArchiveLimits, export_archive, import_archive
from castiron.images.build import BakeOptions, bake
from castiron.images.manifest import file_manifest
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, BUSYBOX, recipe, run_bake, write_tree

Members = list[tuple[tarfile.TarInfo, bytes]]


@pytest.fixture
def baked(tmp_path: Path) -> tuple[ImageStore, str]:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    result = run_bake(
        tmp_path / "src-store", ctx, recipe(layers=["deps/**"]), tags=("v1",), app="hello"
    )
    return ImageStore(tmp_path / "src-store"), result.digest


def _members(path: Path) -> Members:
    out: Members = []
    with tarfile.open(path) as tf:
        for info in tf.getmembers():
            fh = tf.extractfile(info) if info.isreg() else None
            out.append((info, fh.read() if fh else b""))
    return out


def _write(path: Path, members: Members) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _store_is_empty(store: ImageStore) -> bool:
    blobs = os.listdir(store.blobs_dir) if store.blobs_dir.exists() else []
    return blobs == [] and store.tags() == {} and store.index() == []


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive"])
def test_export_then_import_gives_the_same_digest(
    tmp_path: Path, baked: tuple[ImageStore, str], fmt: Any
) -> None:
    store, digest = baked
    archive = tmp_path / f"image-{fmt}.tar"
    result = export_archive(store, digest, fmt, archive)
    assert result.repo_tags == ("hello:v1",)
    again = export_archive(store, digest, fmt, tmp_path / "again.tar")
    assert archive.read_bytes() == (tmp_path / "again.tar").read_bytes()
    target = ImageStore(tmp_path / "dst")
    (imported,) = import_archive(target, archive)
    assert imported.digest == digest and imported.tags == ("v1",)
    assert imported.config_digest == again.config_digest
    assert target.image(digest).layers == store.image(digest).layers
    assert file_manifest(target, digest) == file_manifest(store, digest)
    assert [s["subject"] for s in provenance.read(target, digest)] == [
        s["subject"] for s in provenance.read(store, digest)
    ]
    (retag,) = import_archive(target, archive, tags=("imported",))
    assert retag.tags == ("imported",) and target.resolve("imported") == digest


def test_docker_archive_layout(tmp_path: Path, baked: tuple[ImageStore, str]) -> None:
    store, digest = baked
    archive = tmp_path / "d.tar"
    export_archive(store, digest, "docker-archive", archive)
    members = {info.name: data for info, data in _members(archive)}
    (entry,) = json.loads(members["manifest.json"])
    image = store.image(digest)
    assert entry["Config"] == "blobs/sha256/" + image.config_digest.split(":")[1]
    assert entry["Layers"] == ["blobs/sha256/" + x.digest.split(":")[1] for x in image.layers]
    assert entry["RepoTags"] == ["hello:v1"]
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    assert "index.json" in members


def test_plain_docker_save_format_is_imported(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    # The legacy `docker save` layout: <id>/layer.tar (uncompressed), <config>.json, manifest.json.
    import gzip

    store, digest = baked
    image = store.image(digest)
    config = store.read_blob(image.config_digest)
    members: Members = []

    def add(name: str, data: bytes) -> None:
        members.append((tarfile.TarInfo(name), data))

    layer_names = []
    for i, layer in enumerate(image.layers):
        raw = gzip.decompress(store.blob_path(layer.digest).read_bytes())
        add(f"l{i}/layer.tar", raw)
        layer_names.append(f"l{i}/layer.tar")
    add(image.config_digest.split(":")[1] + ".json", config)
    add(
        "manifest.json",
        json.dumps(
            [
                {
                    "Config": image.config_digest.split(":")[1] + ".json",
                    "RepoTags": ["hello:legacy"],
                    "Layers": layer_names,
                }
            ]
        ).encode(),
    )
    target = ImageStore(tmp_path / "dst")
    (imported,) = import_archive(target, _write(tmp_path / "legacy.tar", members))
    assert imported.config_digest == image.config_digest
    assert imported.tags == ("legacy",)
    assert [x.media_type for x in target.image(imported.digest).layers] == [oci.LAYER_TAR] * 2


def _mutated(
    tmp_path: Path, store: ImageStore, digest: str, mutate: Callable[[Members], Members]
) -> Path:
    good = tmp_path / "good.tar"
    export_archive(store, digest, "oci-archive", good)
    return _write(tmp_path / "bad.tar", mutate(_members(good)))


def _add(
    name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> Callable[[Members], Members]:
    def mutate(members: Members) -> Members:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = link
        return [*members, (info, data)]

    return mutate


def _corrupt_largest(members: Members) -> Members:
    out = list(members)
    idx = max(range(len(out)), key=lambda i: len(out[i][1]))
    info, data = out[idx]
    out[idx] = (info, data[:-1] + bytes([data[-1] ^ 1]))
    return out


def _drop_a_layer(members: Members) -> Members:
    blobs = {info.name: data for info, data in members}
    index = json.loads(blobs["index.json"])
    nested = json.loads(blobs["blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]])
    manifest_name = "blobs/sha256/" + nested["manifests"][0]["digest"].split(":")[1]
    layer = json.loads(blobs[manifest_name])["layers"][0]["digest"].split(":")[1]
    return [m for m in members if m[0].name != f"blobs/sha256/{layer}"]


def _duplicate_index(members: Members) -> Members:
    return [*members, next(m for m in members if m[0].name == "index.json")]


@pytest.mark.parametrize(
    ("mutate", "error", "entry"),
    [
        (_add("../evil"), UnsafeArchiveError, "../evil"),
        (_add("/etc/evil"), UnsafeArchiveError, "/etc/evil"),
        (_add("blobs/a/../../../evil"), UnsafeArchiveError, "blobs/a/../../../evil"),
        (_add("dev", kind=tarfile.CHRTYPE), UnsafeArchiveError, "dev"),
        (_add("fifo", kind=tarfile.FIFOTYPE), UnsafeArchiveError, "fifo"),
        (_add("hard", kind=tarfile.LNKTYPE, link="index.json"), UnsafeArchiveError, "hard"),
        (_duplicate_index, UnsafeArchiveError, "index.json"),
        (_corrupt_largest, DigestMismatchError, None),
        (_drop_a_layer, ImageError, None),
    ],
    ids=[
        "dotdot",
        "absolute",
        "inner-dotdot",
        "device",
        "fifo",
        "hardlink",
        "duplicate",
        "corrupt",
        "missing",
    ],
)
def test_bad_archives_are_refused_and_leave_nothing(
    tmp_path: Path,
    baked: tuple[ImageStore, str],
    mutate: Callable[[Members], Members],
    error: type[Exception],
    entry: str | None,
) -> None:
    store, digest = baked
    bad = _mutated(tmp_path, store, digest, mutate)
    target = ImageStore(tmp_path / "dst")
    with pytest.raises(error) as err:
        import_archive(target, bad)
    if entry is not None:
        assert isinstance(err.value, UnsafeArchiveError) and err.value.entry == entry
        assert repr(entry) in str(err.value)
    assert _store_is_empty(target)


def test_symlink_escaping_the_archive_is_refused(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    store, digest = baked
    layer = store.image(digest).layers[0].digest.split(":")[1]

    def swap(members: Members) -> Members:
        out = [m for m in members if m[0].name != f"blobs/sha256/{layer}"]
        info = tarfile.TarInfo(f"blobs/sha256/{layer}")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../../../etc/passwd"
        return [*out, (info, b"")]

    with pytest.raises(UnsafeArchiveError, match=r"contains '\.\.'"):
        import_archive(ImageStore(tmp_path / "dst"), _mutated(tmp_path, store, digest, swap))


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (ArchiveLimits(max_entries=3), "more than 3 entries"),
        (ArchiveLimits(max_member_bytes=100), "over the limit"),
        (ArchiveLimits(max_total_bytes=1000), "too large"),
    ],
)
def test_absurd_archives_are_refused(
    tmp_path: Path, baked: tuple[ImageStore, str], limits: ArchiveLimits, message: str
) -> None:
    store, digest = baked
    archive = tmp_path / "a.tar"
    export_archive(store, digest, "oci-archive", archive)
    target = ImageStore(tmp_path / "dst")
    with pytest.raises(UnsafeArchiveError, match=message):
        import_archive(target, archive, limits=limits)
    assert _store_is_empty(target)


def test_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ImageError, match=r"junk\.tar"):
        import_archive(ImageStore(tmp_path / "dst"), junk)
    empty = _write(tmp_path / "empty.tar", [(tarfile.TarInfo("hello.txt"), b"hi")])
    with pytest.raises(ImageError, match="neither an OCI archive"):
        import_archive(ImageStore(tmp_path / "dst"), empty)


def test_docker_archive_with_a_wrong_diff_id_is_refused(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    store, digest = baked
    good = tmp_path / "d.tar"
    export_archive(store, digest, "docker-archive", good)
    image = store.image(digest)
    cfg = dict(image.config)
    cfg["rootfs"] = {"type": "layers", "diff_ids": ["sha256:" + "0" * 64] * len(image.layers)}
    cfg_bytes = json.dumps(cfg).encode()
    members = [m for m in _members(good) if m[0].name not in ("index.json", "oci-layout")]
    members.append((tarfile.TarInfo("cfg.json"), cfg_bytes))
    for i, (info, data) in enumerate(members):
        if info.name == "manifest.json":
            entry = json.loads(data)
            entry[0]["Config"] = "cfg.json"
            members[i] = (info, json.dumps(entry).encode())
    target = ImageStore(tmp_path / "dst")
    with pytest.raises(DigestMismatchError, match="the config says sha256:0000"):
        import_archive(target, _write(tmp_path / "bad.tar", members))
    assert _store_is_empty(target)


def test_tag_with_several_images_is_a_usage_error(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    store, digest = baked
    archive = tmp_path / "a.tar"
    export_archive(store, digest, "docker-archive", archive)
    members = [m for m in _members(archive) if m[0].name not in ("index.json", "oci-layout")]
    for i, (info, data) in enumerate(members):
        if info.name == "manifest.json":
            members[i] = (info, json.dumps(json.loads(data) * 2).encode())
    with pytest.raises(UsageError, match="holds 2 images"):
        import_archive(
            ImageStore(tmp_path / "dst"), _write(tmp_path / "two.tar", members), tags=("x",)
        )


@pytest.fixture
def busybox_image(tmp_path: Path) -> tuple[ImageStore, str, str]:
    ctx = tmp_path / "bb"
    ctx.mkdir()
    (ctx / "busybox").write_bytes(BUSYBOX.read_bytes())
    os.chmod(ctx / "busybox", 0o755)
    section = recipe(workdir="/bin", entrypoint=["/bin/busybox", "echo", "hello"])
    app = f"castiron-test-{uuid.uuid4().hex[:8]}"
    result = run_bake(tmp_path / "store", ctx, section, tags=("v1",), app=app)
    return ImageStore(tmp_path / "store"), result.digest, app


@pytest.mark.docker
def test_docker_loads_the_export_and_runs_it(
    tmp_path: Path, docker_engine: Any, busybox_image: tuple[ImageStore, str, str]
) -> None:
    store, digest, app = busybox_image
    archive = tmp_path / "image.tar"
    export_archive(store, digest, "docker-archive", archive)
    with archive.open("rb") as fh:
        (loaded,) = docker_engine.images.load(fh)
    try:
        assert loaded.id == store.image(digest).config_digest
        assert f"{app}:v1" in loaded.tags
        out = docker_engine.containers.run(loaded.id, network_mode="host", remove=True)
        assert out == b"hello\n"
    finally:
        docker_engine.images.remove(loaded.id, force=True)


@pytest.mark.docker
def test_docker_ref_base(
    tmp_path: Path, docker_engine: Any, busybox_image: tuple[ImageStore, str, str]
) -> None:
    from castiron.images.dockerbuild import save_image

    store, digest, app = busybox_image
    archive = tmp_path / "image.tar"
    export_archive(store, digest, "docker-archive", archive)
    with archive.open("rb") as fh:
        (loaded,) = docker_engine.images.load(fh)
    try:
        ctx = write_tree(tmp_path / "app", {"hello.txt": "hi\n"})
        options = BakeOptions(
            context=ctx,
            base_dir=tmp_path,
            source_date_epoch=0,
            fetch_docker_base=lambda ref, where: save_image(ref, where / "base.tar").path,
        )
        section = recipe(base=f"docker:{app}:v1", cmd=["cat", "/app/hello.txt"])
        target = ImageStore(tmp_path / "app-store")
        result = bake(section, target, options)
        image = target.image(result.digest)
        base_layer_diff = store.image(digest).config["rootfs"]["diff_ids"][0]
        assert image.config["rootfs"]["diff_ids"][0] == base_layer_diff
        assert image.config["config"]["Entrypoint"] == ["/bin/busybox", "echo", "hello"]
        assert "/bin/busybox" in file_manifest(target, result.digest)
    finally:
        docker_engine.images.remove(loaded.id, force=True)


def test_oci_archive_lists_one_entry_holding_the_image_and_its_referrers(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    store, digest = baked
    archive = tmp_path / "one.tar"
    export_archive(store, digest, "oci-archive", archive)
    members = {info.name: data for info, data in _members(archive)}
    (entry,) = json.loads(members["index.json"])["manifests"]
    assert entry["mediaType"] == oci.INDEX
    assert entry["annotations"] == {oci.ANN_REF_NAME: "v1"}
    nested = json.loads(members["blobs/sha256/" + entry["digest"].split(":")[1]])
    image, *referrers = nested["manifests"]
    assert image["digest"] == digest and image["platform"]["os"] == "linux"
    assert image["annotations"] == {"dev.castiron.tags": "v1"}
    assert [r["annotations"][oci.ANN_SUBJECT] for r in referrers] == [digest] * len(referrers)
    assert referrers, "provenance travels with the archive"


@pytest.mark.registry
def test_skopeo_opens_an_oci_archive_without_a_ref(
    tmp_path: Path, baked: tuple[ImageStore, str]
) -> None:
    import shutil
    import subprocess

    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed (apt-get install skopeo)")
    store, digest = baked
    from castiron.images.sign import generate_keypair, load_signer, sign_image, verify_image

    pair = generate_keypair(tmp_path / "k")
    sign_image(store, digest, load_signer(pair.private_path), reference="hello:v1")
    archive = tmp_path / "signed.tar"
    export_archive(store, digest, "oci-archive", archive)
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True
    )
    assert inspect.returncode == 0, inspect.stderr
    # skopeo names the archive's one entry (the nested index) and shows the host's image
    assert json.loads(inspect.stdout)["Layers"] == [x.digest for x in store.image(digest).layers]
    copied = tmp_path / "copied"
    copy = subprocess.run(
        ["skopeo", "copy", f"oci-archive:{archive}", f"oci:{copied}:v1"],
        capture_output=True,
        text=True,
    )
    assert copy.returncode == 0, copy.stderr
    (entry,) = json.loads((copied / "index.json").read_text())["manifests"]
    assert entry["digest"] == digest
    # and the signature travels: importing the archive elsewhere still verifies
    target = ImageStore(tmp_path / "dst")
    (imported,) = import_archive(target, archive)
    assert imported.digest == digest and imported.tags == ("v1",)
    assert verify_image(target, digest, [pair.public_path]).ok
