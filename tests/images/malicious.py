"""A corpus of hostile image layers, built in memory with :mod:`tarfile`.

Each :class:`Case` is a list of layers (tar bytes, some gzip-compressed) that the safe unpacker
must refuse with an ``UnsafeArchiveError`` naming ``entry``. Cases that aim outside the target
directory point at ``outside`` (a sentinel directory beside it, holding a file ``secret``) or
at ``/etc/<canary>``, so a test can prove nothing was written there.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from castiron.images.unpack import UnpackLimits

MiB = 1024 * 1024


@dataclass(frozen=True)
class Member:
    """One tar member to write: its header and, for regular files, its data."""

    info: tarfile.TarInfo
    data: bytes = b""
    header_only: bool = False
    """Write the header but no data (a size the archive does not back)."""


def file(name: str, data: bytes = b"", mode: int = 0o644, **attrs: object) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return Member(info, data)


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.mtime = 1_700_000_000
    return Member(info)


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return Member(info)


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return Member(info)


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return Member(info)


def declared(name: str, size: int) -> Member:
    """A regular file header claiming ``size`` bytes, with no data behind it."""
    info = tarfile.TarInfo(name)
    info.size = size
    return Member(info, header_only=True)


def pax(name: str, headers: dict[str, str], kind: bytes = tarfile.REGTYPE) -> Member:
    """A member whose name or other fields come from explicit PAX headers."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.pax_headers = headers
    return Member(info)


def layer(*members: Member, compress: bool = False) -> bytes:
    """The tar (or tar+gzip) bytes of ``members``, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if member.header_only:
                assert tar.fileobj is not None
                tar.fileobj.write(member.info.tobuf(tarfile.GNU_FORMAT))
                tar.offset += tarfile.BLOCKSIZE
            else:
                tar.addfile(member.info, io.BytesIO(member.data) if member.data else None)
    raw = out.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def gnu_layer(*members: Member) -> bytes:
    """Like :func:`layer`, in GNU format (sparse and long-name headers)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            tar.addfile(member.info, io.BytesIO(member.data) if member.data else None)
    return out.getvalue()


@dataclass(frozen=True)
class Case:
    """Layers the unpacker must refuse, and the entry the error must name."""

    layers: tuple[bytes, ...]
    entry: str
    limits: UnpackLimits = field(default_factory=UnpackLimits)


def _cases(outside: Path, canary: str) -> dict[str, Callable[[], Case]]:
    out = str(outside)
    small = UnpackLimits(max_total_bytes=1 * MiB, max_entries=50)
    return {
        # --- names ---------------------------------------------------------------------------
        "absolute": lambda: Case((layer(file(f"{out}/pwned", b"x")),), f"{out}/pwned"),
        "absolute-etc": lambda: Case((layer(file(f"/etc/{canary}", b"x")),), f"/etc/{canary}"),
        "dotdot": lambda: Case((layer(file("../pwned", b"x")),), "../pwned"),
        "dotdot-inner": lambda: Case((layer(file("a/../../x", b"x")),), "a/../../x"),
        "dotdot-deep": lambda: Case(
            (layer(directory("a/"), directory("a/b/"), file("a/b/../../../x", b"x")),),
            "a/b/../../../x",
        ),
        "dotdot-dir": lambda: Case((layer(directory("../up")),), "../up"),
        "empty-name": lambda: Case((layer(file("", b"x")),), ""),
        "nul-in-name": lambda: Case((layer(pax("x", {"path": "a\x00b"})),), "a\x00b"),
        "long-component": lambda: Case((layer(file("a" * 300, b"x")),), "a" * 300),
        "long-name": lambda: Case(
            (layer(file("/".join(["d" * 100] * 50), b"x")),), "/".join(["d" * 100] * 50)
        ),
        "too-deep": lambda: Case((layer(file("a/" * 300 + "f", b"x")),), "a/" * 300 + "f"),
        "root-as-file": lambda: Case((layer(file(".", b"x")),), "."),
        "root-as-symlink": lambda: Case((layer(symlink(".", out)),), "."),
        "whiteout-as-dir": lambda: Case((layer(file(".wh.x/y", b"x")),), ".wh.x/y"),
        "huge-pax-header": lambda: Case(
            (layer(pax("f", {"comment": "c" * (2 * MiB)})),), "././@PaxHeader"
        ),
        # --- symlinks in the parent path ---------------------------------------------------------
        "symlink-etc-then-file": lambda: Case(
            (layer(symlink("etc", "/etc"), file(f"etc/{canary}", b"pwned")),), f"etc/{canary}"
        ),
        "symlink-out-then-file": lambda: Case(
            (layer(symlink("l", out), file("l/pwned", b"pwned")),), "l/pwned"
        ),
        "symlink-out-then-overwrite": lambda: Case(
            (layer(symlink("l", out), file("l/secret", b"pwned")),), "l/secret"
        ),
        "symlink-out-then-dir": lambda: Case(
            (layer(symlink("l", out), directory("l/sub")),), "l/sub"
        ),
        "symlink-out-then-symlink": lambda: Case(
            (layer(symlink("l", out), symlink("l/evil", "/")),), "l/evil"
        ),
        "symlink-chain": lambda: Case(
            (
                layer(
                    directory("d/"),
                    directory("d/e/"),
                    symlink("d/e/up", "../.."),
                    symlink("d/up2", "e/up/.."),
                    file("d/up2/pwned", b"x"),
                ),
            ),
            "d/up2/pwned",
        ),
        "symlink-chain-steps": lambda: Case(
            (layer(symlink("s1", "."), symlink("s1/s2", ".."), file("s1/s2/pwned", b"x")),),
            "s1/s2",
        ),
        "symlink-lower-layer": lambda: Case(
            (layer(symlink("etc", "/etc")), layer(file(f"etc/{canary}", b"x"))),
            f"etc/{canary}",
        ),
        "symlink-relative-escape": lambda: Case(
            (layer(symlink("up", "../../.."), file("up/pwned", b"x")),), "up/pwned"
        ),
        "dir-replaced-by-symlink": lambda: Case(
            (layer(directory("a/"), file("a/x", b"1"), symlink("a", out), file("a/y", b"x")),),
            "a/y",
        ),
        "dir-replaced-by-symlink-across-layers": lambda: Case(
            (layer(file("a/x", b"1")), layer(symlink("a", out), file("a/secret", b"x"))),
            "a/secret",
        ),
        "file-as-parent": lambda: Case((layer(file("f", b"x"), file("f/g", b"x")),), "f/g"),
        # --- hard links ------------------------------------------------------------------------
        "hardlink-etc-passwd": lambda: Case((layer(hardlink("pw", "/etc/passwd")),), "pw"),
        "hardlink-dotdot": lambda: Case(
            (layer(hardlink("pw", "../../../../../../etc/passwd")),), "pw"
        ),
        "hardlink-outside": lambda: Case((layer(hardlink("s", f"{out}/secret")),), "s"),
        "hardlink-to-symlink-out": lambda: Case(
            (layer(symlink("out", f"{out}/secret"), hardlink("hl", "out"), file("hl", b"x")),),
            "hl",
        ),
        "hardlink-through-symlink": lambda: Case(
            (layer(symlink("l", out), hardlink("hl", "l/secret")),), "hl"
        ),
        "hardlink-missing": lambda: Case((layer(hardlink("hl", "nope")),), "hl"),
        "hardlink-to-dir": lambda: Case((layer(directory("d/"), hardlink("hl", "d")),), "hl"),
        "hardlink-to-itself": lambda: Case((layer(file("f", b"x"), hardlink("f", "f")),), "f"),
        "hardlink-to-root": lambda: Case((layer(hardlink("hl", ".")),), "hl"),
        # --- whiteouts ---------------------------------------------------------------------------
        "whiteout-dotdot": lambda: Case(
            (layer(file("x", b"x")), layer(file("../.wh.x"))), "../.wh.x"
        ),
        "whiteout-of-root": lambda: Case((layer(file(".wh.")),), ".wh."),
        "whiteout-of-dot": lambda: Case((layer(file(".wh..")),), ".wh.."),
        "whiteout-of-dotdot": lambda: Case((layer(file("a/.wh...")),), "a/.wh..."),
        "whiteout-through-symlink": lambda: Case(
            (layer(symlink("l", out)), layer(file("l/.wh.secret"))), "l/.wh.secret"
        ),
        "opaque-through-symlink": lambda: Case(
            (layer(symlink("l", out)), layer(file("l/.wh..wh..opq"))), "l/.wh..wh..opq"
        ),
        # --- entry types ----------------------------------------------------------------------
        "char-device": lambda: Case((layer(special("dev/null", tarfile.CHRTYPE)),), "dev/null"),
        "block-device": lambda: Case((layer(special("dev/sda", tarfile.BLKTYPE)),), "dev/sda"),
        "fifo": lambda: Case((layer(special("fifo", tarfile.FIFOTYPE)),), "fifo"),
        "contiguous": lambda: Case((layer(special("cont", tarfile.CONTTYPE)),), "cont"),
        "unknown-type": lambda: Case((layer(special("odd", b"Z")),), "odd"),
        "device-whiteout": lambda: Case(
            (layer(file("x", b"x")), layer(special(".wh.x", tarfile.CHRTYPE))), ".wh.x"
        ),
        "gnu-sparse": lambda: Case(
            (gnu_layer(Member(_typed("sparse", tarfile.GNUTYPE_SPARSE))),), "sparse"
        ),
        "pax-sparse": lambda: Case(
            (
                layer(
                    pax(
                        "sp",
                        {
                            "GNU.sparse.major": "0",
                            "GNU.sparse.minor": "1",
                            "GNU.sparse.map": "0,0",
                            "GNU.sparse.name": "sp",
                            "GNU.sparse.realsize": "1024",
                        },
                    )
                ),
            ),
            "sp",
        ),
        "sparse-size-bomb": lambda: Case(
            (
                layer(
                    pax(
                        "sp",
                        {
                            "GNU.sparse.major": "0",
                            "GNU.sparse.minor": "1",
                            "GNU.sparse.map": "0,0",
                            "GNU.sparse.name": "sp",
                            "GNU.sparse.realsize": str(1 << 50),
                        },
                    )
                ),
            ),
            "sp",
        ),
        # --- limits ----------------------------------------------------------------------------
        "declared-size-bomb": lambda: Case((layer(declared("big", 1 << 40)),), "big"),
        "gzip-bomb": lambda: Case(
            (layer(file("bomb", bytes(16 * MiB)), compress=True),), "bomb", small
        ),
        "size-over-layers": lambda: Case(
            (layer(file("a", bytes(600 * 1024))), layer(file("b", bytes(600 * 1024)))),
            "b",
            small,
        ),
        "entry-count": lambda: Case((layer(*(file(f"f{i}") for i in range(60))),), "f50", small),
        "entry-count-whiteouts": lambda: Case(
            (layer(*(file(f".wh.w{i}") for i in range(60)), compress=True),), ".wh.w50", small
        ),
    }


def _typed(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


CASE_IDS: tuple[str, ...] = tuple(_cases(Path("/nowhere"), "canary"))


def build_case(case_id: str, outside: Path, canary: str) -> Case:
    """The case ``case_id``, aimed at the sentinel directory ``outside`` and ``/etc/<canary>``."""
    return _cases(outside, canary)[case_id]()
