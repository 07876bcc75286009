"""Well-formed layers unpack as the OCI layer rules say: whiteouts, links, modes, replacement."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from castiron.errors import ImageError
from castiron.images.unpack import UnpackStats, unpack_layer, unpack_layers, unpack_rootfs

from .malicious import Member, directory, file, hardlink, layer, symlink


def tree(root: Path) -> dict[str, str]:
    """``relative path -> kind[:content or target]`` for everything below ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "file:" + path.read_text()
    return out


def unpack(root: Path, *layers: bytes) -> UnpackStats:
    return unpack_layers([io.BytesIO(data) for data in layers], root)


def test_whiteouts_and_opaque_directories_across_three_layers(tmp_path: Path) -> None:
    root = tmp_path / "root"
    lower = layer(
        directory("a/"),
        file("a/keep", b"1"),
        file("a/gone", b"1"),
        directory("b/"),
        file("b/old", b"1"),
        file("b/sub/deep", b"1"),
        file("c", b"1"),
        directory("d/"),
        file("d/x", b"1"),
        directory("e/"),
        file("e/inner", b"1"),
    )
    middle = layer(
        file("a/.wh.gone"),
        # Same-layer entries survive the layer's own whiteouts, in either order.
        file("b/new", b"2"),
        file("b/.wh..wh..opq"),
        file(".wh.c"),
        file("d/x", b"2"),
        file("d/.wh.x"),
        file(".wh.e"),
        file(".wh.never-existed"),
        file("nowhere/.wh.x"),
        compress=True,
    )
    upper = layer(
        directory("a/"),
        file("a/.wh..wh..opq"),
        file("a/fresh", b"3"),
        file("b/.wh.new"),
        file("c", b"3"),
    )

    stats = unpack(root, lower, middle, upper)

    assert tree(root) == {
        "a": "dir",
        "a/fresh": "file:3",
        "b": "dir",
        "c": "file:3",
        "d": "dir",
        "d/x": "file:2",
    }
    assert stats.whiteouts == 9
    assert not (root / "nowhere").exists()


def test_opaque_keeps_same_layer_entries_in_subdirectories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    lower = layer(file("a/b/old", b"1"), file("a/other", b"1"))
    upper = layer(file("a/b/new", b"2"), file("a/.wh..wh..opq"))
    unpack(root, lower, upper)
    assert tree(root) == {"a": "dir", "a/b": "dir", "a/b/new": "file:2"}


def test_opaque_root_hides_every_lower_entry(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(root, layer(file("x", b"1"), file("d/y", b"1")), layer(file(".wh..wh..opq"), file("z")))
    assert tree(root) == {"z": "file:"}


def test_hard_links_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stats = unpack(
        root,
        layer(file("bin/tool", b"tool", mode=0o755), hardlink("bin/alias", "bin/tool")),
        layer(hardlink("usr/tool", "./bin/tool")),
    )
    inode = (root / "bin/tool").stat().st_ino
    assert (root / "bin/alias").stat().st_ino == inode
    assert (root / "usr/tool").stat().st_ino == inode
    assert (root / "bin/tool").stat().st_nlink == 3
    assert stats.hardlinks == 2


def test_replacing_a_hard_linked_file_does_not_change_its_twin(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(root, layer(file("a", b"old"), hardlink("b", "a")), layer(file("b", b"new")))
    assert (root / "a").read_bytes() == b"old"
    assert (root / "b").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (file("f", b"x", mode=0o6755), 0o755),
        (file("f", b"x", mode=0o1644), 0o644),
        (file("f", b"x", mode=0o600), 0o600),
        (directory("f/", mode=0o3777), 0o1777),
        (directory("f/", mode=0o6750), 0o750),
    ],
    ids=["setuid-setgid", "sticky-file", "plain", "sticky-dir", "setgid-dir"],
)
def test_modes_are_masked(tmp_path: Path, member: Member, expected: int) -> None:
    root = tmp_path / "root"
    unpack(root, layer(member))
    assert stat.S_IMODE((root / "f").lstat().st_mode) == expected


def test_read_only_directory_still_receives_its_entries(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(root, layer(directory("ro/", mode=0o555), file("ro/f", b"x")))
    assert stat.S_IMODE((root / "ro").stat().st_mode) == 0o555
    assert (root / "ro/f").read_bytes() == b"x"


def test_symlinks_are_stored_verbatim_and_never_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    unpack(
        root,
        layer(
            symlink("abs", "/etc/passwd"),
            symlink("rel", "../../../../outside"),
            symlink("dangling", "nope"),
            symlink("dir/self", "."),
        ),
    )
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "rel") == "../../../../outside"
    assert os.readlink(root / "dangling") == "nope"
    assert os.readlink(root / "dir/self") == "."


def test_later_entries_replace_earlier_ones_safely(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    unpack(
        root,
        layer(
            directory("dir-then-file/"),
            file("dir-then-file/child", b"1"),
            file("file-then-dir", b"1"),
            symlink("link-then-file", str(outside / "secret")),
            symlink("link-then-dir", str(outside)),
        ),
        layer(
            file("dir-then-file", b"2"),
            directory("file-then-dir/"),
            file("file-then-dir/child", b"2"),
            file("link-then-file", b"2"),
            directory("link-then-dir/"),
            file("link-then-dir/secret", b"2"),
        ),
    )
    assert tree(root) == {
        "dir-then-file": "file:2",
        "file-then-dir": "dir",
        "file-then-dir/child": "file:2",
        "link-then-file": "file:2",
        "link-then-dir": "dir",
        "link-then-dir/secret": "file:2",
    }
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"


@pytest.mark.parametrize("name", [".", "./", "./."])
def test_root_entries_are_ignored(tmp_path: Path, name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o711)
    stats = unpack(root, layer(directory(name, mode=0o777), file("./a", b"x")))
    assert stat.S_IMODE(root.stat().st_mode) == 0o711
    assert tree(root) == {"a": "file:x"}
    assert stats.entries == 2
    assert stats.directories == 0


@pytest.mark.parametrize("compressed", [None, True, False])
def test_compression_is_detected_or_declared(tmp_path: Path, compressed: bool | None) -> None:
    data = layer(file("f", b"hello"), compress=compressed is not False)
    stats = unpack_layer(io.BytesIO(data), tmp_path / "root", compressed=compressed)
    assert (tmp_path / "root/f").read_bytes() == b"hello"
    assert stats == UnpackStats(entries=1, files=1, bytes=5)


def test_files_keep_their_modification_time(tmp_path: Path) -> None:
    unpack(tmp_path / "root", layer(file("f", b"x"), directory("d/")))
    assert (tmp_path / "root/f").stat().st_mtime == 1_700_000_000
    assert (tmp_path / "root/d").stat().st_mtime == 1_700_000_000


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can chown")
@pytest.mark.parametrize("preserve", [True, False])
def test_owners_only_when_asked(tmp_path: Path, preserve: bool) -> None:
    data = layer(file("f", b"x", uid=1234, gid=4321), directory("d/"))
    unpack_layer(io.BytesIO(data), tmp_path / "root", preserve_owner=preserve)
    st = (tmp_path / "root/f").stat()
    assert (st.st_uid, st.st_gid) == ((1234, 4321) if preserve else (0, 0))


def test_rootfs_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    dest = tmp_path / "releases" / "abc" / "rootfs"
    stats = unpack_rootfs([io.BytesIO(layer(file("bin/sh", b"#!", mode=0o755)))], dest)
    assert stats.files == 1
    assert (dest / "bin/sh").read_bytes() == b"#!"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert sorted(os.listdir(dest.parent)) == ["rootfs"]
    with pytest.raises(ImageError, match="already exists"):
        unpack_rootfs([io.BytesIO(layer(file("x")))], dest)


def test_failed_rootfs_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "rootfs"
    good = layer(directory("ro/", mode=0o500), file("ro/f", b"x", mode=0o400))
    bad = layer(file("../escape"))
    with pytest.raises(ImageError):
        unpack_rootfs([io.BytesIO(good), io.BytesIO(bad)], dest)
    assert os.listdir(tmp_path) == []


def test_stats_count_every_kind(tmp_path: Path) -> None:
    stats = unpack(
        tmp_path / "root",
        layer(directory("d/"), file("d/f", b"abc"), symlink("l", "d"), hardlink("h", "d/f")),
        layer(file(".wh.l")),
    )
    assert stats == UnpackStats(
        entries=5, files=1, directories=1, symlinks=1, hardlinks=1, whiteouts=1, bytes=3
    )
