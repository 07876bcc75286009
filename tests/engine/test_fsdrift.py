"""Filesystem drift: full and fast scans of a real unpacked, read-only root filesystem.

Each test bakes a small tree into a layer tar, takes the image's file manifest from that tar
(``castiron.images.manifest``), unpacks it with the safe unpacker and makes it read-only as the
local runtime does, then changes the tree the way an intruder or a careless operator would.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import io
import os
import random
import stat
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from castiron.engine import fsdrift
from castiron.engine.fsdrift import (
    FINDING_KIND,
    Finding,
    PathFilter,
    ScanResult,
    scan_fast,
    scan_full,
    take_baseline,
)
from castiron.errors import ImageError, NotFoundError, StateCorruptError
from castiron.images.manifest import FileEntry, merge, read_layer_entries
from castiron.images.rootfs import make_read_only
from castiron.images.unpack import unpack_rootfs

INSTANCE = "hello-staging-1"


@dataclass(frozen=True)
class Rootfs:
    root: Path
    manifest: Mapping[str, FileEntry]
    baseline: Path


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


@contextmanager
def unlocked(path: Path) -> Iterator[Path]:
    """Let a non-root user change ``path`` in the read-only tree; modes are put back after."""
    targets = [p for p in (path.parent, path) if p.exists() and not p.is_symlink()]
    modes = [(p, stat.S_IMODE(p.stat().st_mode)) for p in targets]
    for p, mode in modes:
        p.chmod(mode | 0o200)
    try:
        yield path
    finally:
        for p, mode in modes:
            if p.exists() and not p.is_symlink():
                p.chmod(mode)


def build_rootfs(tmp_path: Path, files: Mapping[str, bytes] | None = None) -> Rootfs:
    """Bake ``src/`` into a layer, read its manifest, unpack it read-only into ``rootfs/``."""
    src = tmp_path / "src"
    _write(src / "app/server.py", b"print('hello')\n" * 10)
    _write(src / "app/run.sh", b"#!/bin/sh\nexec python3 server.py\n", 0o755)
    _write(src / "app/lib/a.py", b"A = 1\n")
    _write(src / "app/lib/b.py", b"B = 2\n" * 100)
    _write(src / "app/static/logo.bin", os.urandom(300_000))
    _write(src / "data/seed.txt", b"seed\n")
    _write(src / "etc/app.conf", b"level=info\n")
    for rel, data in (files or {}).items():
        _write(src / rel, data)
    (src / "app/current").symlink_to("server.py")
    os.link(src / "app/lib/a.py", src / "app/lib/a-link.py")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for top in sorted(p.name for p in src.iterdir()):
            tar.add(src / top, arcname=top)
    layer.seek(0)
    manifest = merge([read_layer_entries(layer, "test layer")])
    assert "hardlink" in {manifest["/app/lib/a.py"].type, manifest["/app/lib/a-link.py"].type}
    layer.seek(0)
    root = tmp_path / "rootfs"
    unpack_rootfs([layer], root)
    make_read_only(root)  # as the local runtime leaves a release
    return Rootfs(root, manifest, tmp_path / "state" / "fs.baseline")


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Rootfs]:
    fs = build_rootfs(tmp_path)
    yield fs
    for dirpath, dirnames, _ in os.walk(fs.root):  # let pytest clean tmp_path as non-root
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
    os.chmod(fs.root, 0o755)


def full(fs: Rootfs, threads: int = 1, paths: PathFilter | None = None) -> ScanResult:
    return scan_full(fs.root, fs.manifest, instance=INSTANCE, threads=threads, paths=paths)


def fast(fs: Rootfs, paths: PathFilter | None = None) -> ScanResult:
    return scan_fast(fs.root, fs.manifest, fs.baseline, instance=INSTANCE, paths=paths)


def changes(result: ScanResult) -> list[tuple[str, str]]:
    return [(f.path, f.change) for f in result.findings]


def test_a_clean_tree_has_no_findings(rootfs: Rootfs) -> None:
    assert take_baseline(rootfs.root, rootfs.baseline) == len(rootfs.manifest)
    for result in (full(rootfs), full(rootfs, threads=2), fast(rootfs)):
        assert result.clean, result.findings
    result = full(rootfs)
    assert result.stats.entries == result.stats.checked == len(rootfs.manifest)
    regular = [e for e in rootfs.manifest.values() if e.type in ("file", "hardlink")]
    assert result.stats.hashed_files == len(regular)


def test_a_fast_scan_of_an_unchanged_tree_reads_no_manifest_and_hashes_nothing(
    rootfs: Rootfs,
) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    calls: list[int] = []

    def manifest() -> Mapping[str, FileEntry]:
        calls.append(1)
        return rootfs.manifest

    result = scan_fast(rootfs.root, manifest, rootfs.baseline, instance=INSTANCE)
    assert result.clean
    assert calls == []
    assert (result.stats.checked, result.stats.hashed_files) == (0, 0)
    assert result.stats.entries == len(rootfs.manifest)


def test_an_added_file_is_found(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "app/lib/evil.py") as path:
        path.write_bytes(b"import os\n")
    expected = Finding(FINDING_KIND, INSTANCE, "/app/lib/evil.py", None, "file", "added")
    assert full(rootfs).findings == (expected,)
    result = fast(rootfs)
    assert result.findings == (expected,)
    assert result.stats.hashed_files == 0  # the directory changed too, but holds no content


def test_changed_content_with_the_same_size_and_a_restored_mtime_is_found(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    path = rootfs.root / "app/server.py"
    before = path.stat()
    with unlocked(path):
        path.write_bytes(b"print('HELLO')\n" * 10)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    want = "sha256:" + (rootfs.manifest["/app/server.py"].sha256 or "")
    for result in (full(rootfs), fast(rootfs)):
        [finding] = result.findings
        assert (finding.path, finding.change, finding.expected) == (
            "/app/server.py",
            "content",
            want,
        )
        assert finding.actual is not None and finding.actual.startswith("sha256:")
        assert finding.actual != want


def test_a_file_changed_right_after_the_baseline_is_still_found(tmp_path: Path) -> None:
    fs = build_rootfs(tmp_path)
    path = fs.root / "etc/app.conf"
    with unlocked(path):
        path.write_bytes(b"level=info\n")  # a ctime in the very tick the baseline starts
    take_baseline(fs.root, fs.baseline)
    before = path.stat()
    with unlocked(path):
        path.write_bytes(b"level=dbug\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert changes(fast(fs)) == [("/etc/app.conf", "content")]


def test_fast_scan_rehashes_only_what_changed(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    path = rootfs.root / "app/lib/b.py"
    with unlocked(path):
        path.write_bytes(b"B = 3\n" * 100)
    result = fast(rootfs)
    assert changes(result) == [("/app/lib/b.py", "content")]
    assert result.stats.hashed_files == 1
    assert result.stats.hashed_bytes == 600
    assert full(rootfs).stats.hashed_files > 5


def test_a_removed_file_is_found(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "etc/app.conf") as path:
        path.unlink()
    expected = Finding(FINDING_KIND, INSTANCE, "/etc/app.conf", "file", None, "removed")
    assert full(rootfs).findings == (expected,)
    assert fast(rootfs).findings == (expected,)


def test_a_removed_directory_is_one_finding(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    lib = rootfs.root / "app/lib"
    for child in list(lib.iterdir()):
        with unlocked(child):
            child.unlink()
    with unlocked(lib):
        lib.rmdir()
    expected = Finding(
        FINDING_KIND, INSTANCE, "/app/lib", "dir (3 entries inside)", None, "removed"
    )
    assert full(rootfs).findings == (expected,)
    assert fast(rootfs).findings == (expected,)


def test_a_changed_mode_is_found(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    (rootfs.root / "app/server.py").chmod(0o755)
    expected = Finding(FINDING_KIND, INSTANCE, "/app/server.py", "0444", "0755", "mode")
    assert full(rootfs).findings == (expected,)
    result = fast(rootfs)
    assert result.findings == (expected,)
    assert result.stats.hashed_files == 1  # ctime moved: content is checked too


def test_a_retargeted_symlink_is_found(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "app/current") as link:
        link.unlink()
        link.symlink_to("run.sh")
    expected = Finding(FINDING_KIND, INSTANCE, "/app/current", "server.py", "run.sh", "target")
    assert full(rootfs).findings == (expected,)
    assert fast(rootfs).findings == (expected,)


def test_a_file_replaced_by_a_directory_is_one_type_finding(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "etc/app.conf") as path:
        path.unlink()
        path.mkdir()
        (path / "override.conf").write_bytes(b"level=debug\n")
    expected = Finding(
        FINDING_KIND, INSTANCE, "/etc/app.conf", "file", "dir (1 entries inside)", "type"
    )
    assert full(rootfs).findings == (expected,)
    assert fast(rootfs).findings == (expected,)


def test_a_changed_hard_link_target_shows_on_both_names(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "app/lib/a.py") as path, path.open("r+b") as fh:
        fh.write(b"A = 9\n")
    expected = [("/app/lib/a-link.py", "content"), ("/app/lib/a.py", "content")]
    assert changes(full(rootfs)) == expected
    assert changes(fast(rootfs)) == expected


def test_writable_paths_are_skipped(rootfs: Rootfs) -> None:
    paths = PathFilter.of(writable=["/data", "/etc/app.conf"])
    take_baseline(rootfs.root, rootfs.baseline, paths=paths)
    with unlocked(rootfs.root / "data/cache.db") as path:
        path.write_bytes(b"rows")
    with unlocked(rootfs.root / "data/seed.txt") as path:
        path.unlink()
    with unlocked(rootfs.root / "etc/app.conf") as path:
        path.write_bytes(b"level=debug\n")
    with unlocked(rootfs.root / "app/new.txt") as path:
        path.write_bytes(b"new")
    assert changes(full(rootfs, paths=paths)) == [("/app/new.txt", "added")]
    assert changes(fast(rootfs, paths=paths)) == [("/app/new.txt", "added")]
    assert ("/data/cache.db", "added") in changes(full(rootfs))


@pytest.mark.parametrize(
    ("patterns", "reported"),
    [
        (["*.pyc"], ["/app/static/keep.txt", "/app/static/tmp"]),
        (["/app/static/"], ["/app/lib/a.cpython-311.pyc"]),
        (["**/static/tmp/", "*.pyc"], ["/app/static/keep.txt"]),
        (["static/tmp/", "*.pyc"], ["/app/static/keep.txt", "/app/static/tmp"]),  # anchored
        (["/app/static/*", "!keep.txt"], ["/app/lib/a.cpython-311.pyc", "/app/static/keep.txt"]),
        (["**/tmp/**", "*.pyc", "*.txt"], ["/app/static/tmp"]),
    ],
)
def test_ignore_patterns_are_skipped(
    rootfs: Rootfs, patterns: list[str], reported: list[str]
) -> None:
    paths = PathFilter.of(ignore=patterns)
    take_baseline(rootfs.root, rootfs.baseline, paths=paths)
    with unlocked(rootfs.root / "app/lib/a.cpython-311.pyc") as path:
        path.write_bytes(b"\x00bytecode")
    with unlocked(rootfs.root / "app/static/tmp") as path:
        path.mkdir()
        (path / "upload.bin").write_bytes(b"x")
    with unlocked(rootfs.root / "app/static/keep.txt") as path:
        path.write_bytes(b"k")
    assert [p for p, _ in changes(full(rootfs, paths=paths))] == reported
    assert [p for p, _ in changes(fast(rootfs, paths=paths))] == reported


def test_ignored_manifest_paths_are_not_reported_removed(rootfs: Rootfs) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    with unlocked(rootfs.root / "app/static/logo.bin") as path:
        path.unlink()
    paths = PathFilter.of(ignore=["/app/static/"])
    assert full(rootfs, paths=paths).clean
    assert fast(rootfs, paths=paths).clean
    assert changes(fast(rootfs)) == [("/app/static/logo.bin", "removed")]


def test_threads_find_what_one_thread_finds(tmp_path: Path) -> None:
    rng = random.Random(7)
    files = {f"app/blob/{i:03}.bin": rng.randbytes(1000 * (i % 37) + i) for i in range(120)}
    fs = build_rootfs(tmp_path, files)
    for i in range(0, 120, 7):
        # Every damaged file really changes: the first byte is flipped (or one is added).
        data = files[f"app/blob/{i:03}.bin"]
        damaged = bytes([data[0] ^ 0xFF]) + data[1:] if data else b"!"
        with unlocked(fs.root / f"app/blob/{i:03}.bin") as path:
            path.write_bytes(damaged)
    (fs.root / "app/blob/001.bin").chmod(0o600)
    one = full(fs, threads=1)
    assert len(one.findings) == 19
    for threads in (2, 3, 8):
        many = full(fs, threads=threads)
        assert many == one


def test_a_missing_baseline_is_not_found(rootfs: Rootfs) -> None:
    with pytest.raises(NotFoundError, match="no filesystem baseline"):
        fast(rootfs)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"not a baseline" + data,
        lambda data: data[:-1],
        lambda data: data[:40] + bytes([data[40] ^ 1]) + data[41:],
        lambda data: b"",
    ],
)
def test_a_damaged_baseline_is_refused(rootfs: Rootfs, damage: object) -> None:
    take_baseline(rootfs.root, rootfs.baseline)
    assert callable(damage)
    rootfs.baseline.write_bytes(damage(rootfs.baseline.read_bytes()))
    with pytest.raises(StateCorruptError, match=str(rootfs.baseline)):
        fast(rootfs)


def test_a_missing_root_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such root filesystem"):
        scan_full(tmp_path / "nope", {}, instance=INSTANCE)


def test_a_bad_ignore_pattern_names_itself() -> None:
    with pytest.raises(ImageError, match=r"drift ignore\[1\]"):
        PathFilter.of(ignore=["*.pyc", "/"])


def test_recorded_modes_are_compared_as_they_are_when_not_read_only(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _write(root / "bin/tool", b"x", 0o750)
    manifest = {
        "/bin": FileEntry("/bin", "dir", stat.S_IMODE((root / "bin").stat().st_mode)),
        "/bin/tool": FileEntry(
            "/bin/tool",
            "file",
            0o750,
            1,
            "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
        ),
    }
    assert scan_full(root, manifest, instance=INSTANCE, read_only=False).clean
    (root / "bin/tool").chmod(0o755)
    result = scan_full(root, manifest, instance=INSTANCE, read_only=False)
    assert changes(result) == [("/bin/tool", "mode")]


def test_the_scanner_knows_no_runtime_router_agent_or_state() -> None:
    import castiron.engine.fsdrift as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    forbidden = ("castiron.drivers", "castiron.traffic", "castiron.agent", "castiron.state")
    assert not [name for name in imported if name.startswith(forbidden)]
    assert "castiron.images.manifest" in imported


def test_worker_processes_agree_when_files_vanish_or_change_type(tmp_path: Path) -> None:
    files = {f"app/blob/{i:03}.bin": os.urandom(2000 + i) for i in range(60)}
    fs = build_rootfs(tmp_path, files)
    with unlocked(fs.root / "app/blob/010.bin") as path:
        path.unlink()
    with unlocked(fs.root / "app/blob/020.bin") as path:
        path.unlink()
        path.symlink_to("011.bin")
    with unlocked(fs.root / "app/blob/030.bin") as path:
        path.unlink()
        path.mkdir()
    one = full(fs, threads=1)
    assert sorted(changes(one)) == [
        ("/app/blob/010.bin", "removed"),
        ("/app/blob/020.bin", "type"),
        ("/app/blob/030.bin", "type"),
    ]
    assert full(fs, threads=2) == one
    assert full(fs, threads=4) == one


def _damaged_tree(tmp_path: Path) -> Rootfs:
    rng = random.Random(11)
    files = {f"app/blob/{i:03}.bin": rng.randbytes(3000 + 97 * i) for i in range(80)}
    fs = build_rootfs(tmp_path, files)
    for i in (3, 40, 77):
        with unlocked(fs.root / f"app/blob/{i:03}.bin") as path:
            data = path.read_bytes()
            path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    return fs


def _children() -> set[int]:
    """This process's child processes, zombies included (Linux)."""
    out: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            out.update(int(pid) for pid in (task / "children").read_text().split())
    return out


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    """Every scan reaps the workers it forked (other tests' children may come and go)."""
    before = _children()
    yield
    assert _children() <= before


@pytest.mark.parametrize(
    "limits",
    [
        {"_MAX_FILES": 10},  # past the pool's room: this process hashes the rest
        {"_ARENA_BYTES": 4096},  # paths that do not fit: batches kept here
        {"_BATCH_FILES": 1, "_BATCH_BYTES": 1},  # one file per batch
    ],
)
def test_worker_pool_limits_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limits: dict[str, int]
) -> None:
    fs = _damaged_tree(tmp_path)
    one = full(fs, threads=1)
    assert sorted(changes(one))[:3] == [
        ("/app/blob/003.bin", "content"),
        ("/app/blob/040.bin", "content"),
        ("/app/blob/077.bin", "content"),
    ]
    for name, value in limits.items():
        monkeypatch.setattr(fsdrift, name, value)
    assert full(fs, threads=2) == one
    assert full(fs, threads=3) == one


def test_a_worker_that_dies_costs_only_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _damaged_tree(tmp_path)
    one = full(fs, threads=1)
    parent = os.getpid()
    hash_into = fsdrift._hash_into

    def dying(*args: Any) -> None:
        if os.getpid() != parent:
            os._exit(9)  # a worker killed with a batch taken from the queue
        hash_into(*args)

    monkeypatch.setattr(fsdrift, "_hash_into", dying)
    monkeypatch.setattr(fsdrift, "_BATCH_FILES", 4)
    assert full(fs, threads=2) == one


def test_unreadable_files_are_reported_alike_by_every_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _damaged_tree(tmp_path)
    real_open = os.open

    def failing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(("/005.bin", "/060.bin")):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(fsdrift.os, "open", failing_open)
    one = full(fs, threads=1)
    unreadable = [(f.path, f.actual) for f in one.findings if "unreadable" in (f.actual or "")]
    assert unreadable == [
        ("/app/blob/005.bin", "unreadable (Input/output error)"),
        ("/app/blob/060.bin", "unreadable (Input/output error)"),
    ]
    assert full(fs, threads=2) == one


def test_an_interrupted_scan_leaves_no_worker(tmp_path: Path) -> None:
    fs = _damaged_tree(tmp_path)

    def broken() -> Mapping[str, FileEntry]:
        raise ImageError("manifest unreadable")

    with pytest.raises(ImageError, match="manifest unreadable"):
        scan_full(fs.root, broken, instance=INSTANCE, threads=2)


def test_threads_hash_where_there_is_no_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _damaged_tree(tmp_path)
    one = full(fs, threads=1)
    monkeypatch.delattr(fsdrift.os, "fork")
    assert full(fs, threads=3) == one


def test_a_refused_fork_falls_back_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = _damaged_tree(tmp_path)
    one = full(fs, threads=1)
    forks: list[int] = []
    real_fork = os.fork

    def refusing_fork() -> int:
        if forks:  # the second worker cannot be started
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(fsdrift.os, "fork", refusing_fork)
    assert full(fs, threads=3) == one  # the first worker was stopped again; threads did it
