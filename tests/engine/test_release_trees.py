"""Release trees are checked before they are trusted: the baseline is taken when a tree is
unpacked, a reuse re-hashes what moved since (or everything with ``verify``), and a tree that
differs from its image is unpacked again from the verified image, never used as it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from castiron.agent.client import AgentClient
from castiron.drivers.local import LocalDriver
from castiron.engine.baselines import (
    BaselineDriver,
    certify_tree,
    check_tree,
    tree_baseline_path,
)
from castiron.images.build import BakeOptions, bake
from castiron.images.manifest import file_index
from castiron.images.rootfs import unpack_release
from castiron.images.store import ImageStore
from castiron.model import ImageRef
from castiron.spec.schema import ImageSection

APP_FILES = {"app/server.py": "print('hello')\n", "app/lib/util.py": "X = 1\n"}


@pytest.fixture
def image(tmp_path: Path) -> ImageRef:
    for rel, text in APP_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    options = BakeOptions(
        context=tmp_path / "app",
        base_dir=tmp_path,
        source_date_epoch=1_700_000_000,
        environ={"PATH": os.defpath},
    )
    section = ImageSection.model_validate({"context": "./app", "workdir": "/app"})
    result = bake(section, ImageStore(tmp_path / "store"), options)
    return ImageRef(result.digest, result.config_digest, tmp_path / "store")


def _unpack(image: ImageRef, target: Path) -> None:
    # What the engine hands the local runtime (castiron.compose.local_driver).
    unpack_release(image.store, image.digest, target)
    certify_tree(target)


@pytest.fixture
def driver(tmp_path: Path) -> tuple[BaselineDriver, list[str]]:
    local = LocalDriver(
        agent=AgentClient(tmp_path / "no-agent.sock"),
        releases_dir=tmp_path / "releases",
        unpack=_unpack,
    )
    notices: list[str] = []
    return BaselineDriver(local, tmp_path / "drift", notice=notices.append), notices


def _edit(path: Path, text: str = "# changed by hand\n") -> None:
    """Append to a read-only file and put its mode and mtime back (root writes anyway)."""
    st = path.stat()
    path.chmod(0o644)
    with path.open("a") as fh:
        fh.write(text)
    path.chmod(st.st_mode & 0o7777)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_first_use_unpacks_and_certifies(
    driver: tuple[BaselineDriver, list[str]], image: ImageRef
) -> None:
    wrapped, notices = driver
    wrapped.ensure_image(image)
    rootfs = wrapped.rootfs(image.digest)
    assert (rootfs / "app" / "server.py").is_file()
    assert tree_baseline_path(rootfs).is_file()
    wrapped.ensure_image(image)  # a clean reuse: nothing to say
    assert notices == []


def test_an_edited_tree_is_unpacked_again_before_reuse(
    driver: tuple[BaselineDriver, list[str]], image: ImageRef
) -> None:
    wrapped, notices = driver
    wrapped.ensure_image(image)
    rootfs = wrapped.rootfs(image.digest)
    _edit(rootfs / "app" / "server.py")
    (rootfs / "app" / "lib").chmod(0o755)
    (rootfs / "app" / "lib" / "backdoor.py").write_text("import os\n")
    (rootfs / "app" / "lib").chmod(0o555)

    wrapped.ensure_image(image)

    assert notices == [
        f"the release tree of {image.digest[:19]} differs from the image "
        "(/app/lib/backdoor.py (added), /app/server.py (content)): "
        "unpacking it again from the image"
    ]
    assert (rootfs / "app" / "server.py").read_text() == APP_FILES["app/server.py"]
    assert not (rootfs / "app" / "lib" / "backdoor.py").exists()
    (aside,) = rootfs.parent.glob("rootfs.drifted-*")  # instances still on it keep it
    assert "changed by hand" in (aside / "app" / "server.py").read_text()
    result = check_tree(rootfs, file_index(ImageStore(image.store), image.digest), label="x")
    assert result.clean


def test_verify_rehashes_what_the_stat_check_cannot_see(
    driver: tuple[BaselineDriver, list[str]], image: ImageRef
) -> None:
    wrapped, notices = driver
    wrapped.ensure_image(image)
    rootfs = wrapped.rootfs(image.digest)
    _edit(rootfs / "app" / "server.py")
    certify_tree(rootfs)  # someone who can rewrite the baseline too

    wrapped.ensure_image(image)
    assert notices == []  # the fast check trusts the baseline

    wrapped.verify = True
    wrapped.ensure_image(image)
    assert len(notices) == 1 and "(/app/server.py (content))" in notices[0]
    assert (rootfs / "app" / "server.py").read_text() == APP_FILES["app/server.py"]


def test_a_tree_without_baseline_is_checked_in_full_and_certified_when_clean(
    tmp_path: Path, image: ImageRef
) -> None:
    rootfs = tmp_path / "rootfs"
    unpack_release(image.store, image.digest, rootfs)
    manifest = file_index(ImageStore(image.store), image.digest)

    first = check_tree(rootfs, manifest, label="t")
    assert first.clean and first.stats.hashed_files > 0
    assert tree_baseline_path(rootfs).is_file()
    again = check_tree(rootfs, manifest, label="t")
    assert again.clean and again.stats.hashed_files == 0  # fast: nothing moved

    tree_baseline_path(rootfs).unlink()
    _edit(rootfs / "app" / "server.py")
    dirty = check_tree(rootfs, manifest, label="t")
    assert [f.path for f in dirty.findings] == ["/app/server.py"]
    assert not tree_baseline_path(rootfs).exists()  # a differing tree is never certified
    assert [p.name for p in rootfs.parent.iterdir() if p.name.startswith(".")] == []


def test_a_damaged_baseline_means_a_full_check(tmp_path: Path, image: ImageRef) -> None:
    rootfs = tmp_path / "rootfs"
    unpack_release(image.store, image.digest, rootfs)
    certify_tree(rootfs)
    tree_baseline_path(rootfs).write_bytes(b"garbage")
    _edit(rootfs / "app" / "server.py")
    manifest = file_index(ImageStore(image.store), image.digest)
    result = check_tree(rootfs, manifest, label="t")
    assert [f.path for f in result.findings] == ["/app/server.py"]
