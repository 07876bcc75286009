"""Hostile layers are refused, name the bad entry, and write nothing outside the target."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castiron.errors import ImageError, UnsafeArchiveError
from castiron.images.unpack import UnpackLimits, check_layers, unpack_layers, unpack_rootfs

from .malicious import CASE_IDS, build_case, directory, file, hardlink, layer, symlink

PASSWD = Path("/etc/passwd")


def snapshot(base: Path, skip: Path) -> dict[str, tuple[object, ...]]:
    """Every path below ``base`` except the ``skip`` subtree, with type, mode and content."""
    seen: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        current = Path(dirpath)
        if current == skip or skip in current.parents:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            path = current / name
            if path == skip:
                continue
            st_ = path.lstat()
            if path.is_symlink():
                seen[str(path)] = ("link", os.readlink(path))
            elif path.is_file():
                seen[str(path)] = ("file", st_.st_mode, path.read_bytes())
            else:
                seen[str(path)] = ("dir", st_.st_mode)
    return seen


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """``tmp/outside/secret`` is the sentinel; unpacks go to ``tmp/inner/root``."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    (tmp_path / "inner").mkdir()
    return tmp_path


@pytest.mark.parametrize("mode", ["layers", "rootfs"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_malicious_layer_is_refused(sandbox: Path, case_id: str, mode: str) -> None:
    canary = f"castiron-canary-{uuid.uuid4().hex}"
    case = build_case(case_id, sandbox / "outside", canary)
    root = sandbox / "inner" / "root"
    before = snapshot(sandbox, root)
    passwd = hashlib.sha256(PASSWD.read_bytes()).hexdigest()
    streams = [io.BytesIO(data) for data in case.layers]

    with pytest.raises(UnsafeArchiveError) as caught:
        if mode == "layers":
            unpack_layers(streams, root, limits=case.limits)
        else:
            unpack_rootfs(streams, root, limits=case.limits)

    assert caught.value.entry == case.entry
    assert repr(case.entry)[:60] in str(caught.value)
    assert snapshot(sandbox, root) == before
    assert not Path("/etc", canary).exists()
    assert hashlib.sha256(PASSWD.read_bytes()).hexdigest() == passwd
    if mode == "rootfs":
        assert not root.exists()
        assert sorted(p.name for p in (sandbox / "inner").iterdir()) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not a tar archive at all" * 40, "not a valid tar stream"),
        (b"", "not a valid tar stream"),
        (b"\x28\xb5\x2f\xfd" + bytes(600), "zstd"),
        (b"\x1f\x8b" + bytes(600), "not a valid tar stream"),
    ],
    ids=["garbage", "empty", "zstd", "bad-gzip"],
)
def test_invalid_streams_are_image_errors(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message) as caught:
        unpack_layers([io.BytesIO(data)], tmp_path / "root")
    assert not isinstance(caught.value, UnsafeArchiveError)


def test_corrupt_header_midway_is_an_error_not_the_end(tmp_path: Path) -> None:
    data = bytearray(layer(file("a", b"x" * 10), file("b", b"y" * 10)))
    data[1024 + 148 : 1024 + 156] = b"0000000\x00"  # the second header's checksum
    with pytest.raises(ImageError, match="corrupt tar header"):
        unpack_layers([io.BytesIO(bytes(data))], tmp_path / "root")


def test_truncated_data_is_an_error(tmp_path: Path) -> None:
    data = layer(file("a", b"x" * 5000))[:2048]
    with pytest.raises(ImageError, match="'a'"):
        unpack_layers([io.BytesIO(data)], tmp_path / "root")


def test_expected_gzip_that_is_plain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="expected to be gzip"):
        unpack_layers([io.BytesIO(layer(file("a")))], tmp_path / "root", compressed=True)


def test_limits_are_configurable(tmp_path: Path) -> None:
    data = layer(file("a", bytes(2000)))
    limits = UnpackLimits(max_total_bytes=1000)
    with pytest.raises(UnsafeArchiveError, match="exceeds the limit of 1000 bytes"):
        unpack_layers([io.BytesIO(data)], tmp_path / "r1", limits=limits)
    unpack_layers([io.BytesIO(data)], tmp_path / "r2", limits=UnpackLimits(max_total_bytes=2000))
    assert (tmp_path / "r2" / "a").stat().st_size == 2000


# --- random input ------------------------------------------------------------------------------

_SEED = layer(
    directory("d/"),
    file("d/f", b"hello", mode=0o4755),
    symlink("d/l", "/etc"),
    hardlink("d/h", "d/f"),
    file("d/.wh.gone"),
    file(".wh..wh..opq"),
)
_SEEDS = [_SEED, layer(file("a", b"x" * 700), compress=True)]


@st.composite
def tarish(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real layer with random bytes flipped, cut or appended."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=3000))
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data) + draw(st.binary(max_size=64))


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(layers=st.lists(tarish(), min_size=1, max_size=3))
def test_random_input_only_raises_image_errors(layers: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "outside").mkdir()
        (base / "outside" / "secret").write_bytes(b"secret")
        (base / "inner").mkdir()
        root = base / "inner" / "root"
        before = snapshot(base, root)
        limits = UnpackLimits(max_total_bytes=1 << 20, max_entries=1000)
        with contextlib.suppress(ImageError):
            unpack_layers([io.BytesIO(d) for d in layers], root, limits=limits)
        assert snapshot(base, root) == before


# --- the same rules without writing (import, bake bases) ----------------------------------------


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_check_layers_refuses_what_unpacking_refuses(sandbox: Path, case_id: str) -> None:
    case = build_case(case_id, sandbox / "outside", f"castiron-canary-{uuid.uuid4().hex}")
    with pytest.raises(UnsafeArchiveError) as unpacked:
        unpack_layers([io.BytesIO(d) for d in case.layers], sandbox / "root", limits=case.limits)
    before = snapshot(sandbox, sandbox / "nothing")

    with pytest.raises(UnsafeArchiveError) as checked:
        check_layers([io.BytesIO(d) for d in case.layers], limits=case.limits)

    assert (checked.value.message, checked.value.entry) == (
        unpacked.value.message,
        unpacked.value.entry,
    )
    assert snapshot(sandbox, sandbox / "nothing") == before


def _verdict(action: Callable[[], object]) -> str:
    try:
        return f"ok {action()}"
    except UnsafeArchiveError as exc:
        return f"refused {exc.message}"
    except ImageError:
        return "invalid"


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(layers=st.lists(tarish(), min_size=1, max_size=3))
def test_check_layers_agrees_with_unpacking(layers: list[bytes]) -> None:
    limits = UnpackLimits(max_total_bytes=1 << 20, max_entries=1000)
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = _verdict(
            lambda: unpack_layers([io.BytesIO(d) for d in layers], Path(tmp) / "r", limits=limits)
        )
    checked = _verdict(lambda: check_layers([io.BytesIO(d) for d in layers], limits=limits))
    assert checked == unpacked


def test_check_layers_follows_lower_layers() -> None:
    lower = layer(directory("usr/"), symlink("usr/lib64", "/lib"), file("usr/f", b"abc"))
    assert (
        check_layers([io.BytesIO(lower), io.BytesIO(layer(hardlink("h", "usr/f")))]).hardlinks == 1
    )
    with pytest.raises(UnsafeArchiveError) as caught:
        check_layers([io.BytesIO(lower), io.BytesIO(layer(file("usr/lib64/x", b"x")))])
    assert caught.value.message == (
        "layer entry 'usr/lib64/x': its parent 'usr/lib64' is a symlink; "
        "entries are never written through symlinks"
    )
    hidden = layer(file("usr/.wh.f"))
    with pytest.raises(UnsafeArchiveError, match="'usr/f', which does not exist"):
        check_layers([io.BytesIO(d) for d in (lower, hidden, layer(hardlink("h", "usr/f")))])
