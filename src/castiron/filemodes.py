"""Private files: castiron's state is 0600 in 0700 directories, whatever the umask.

Owns the two modes and the helpers that create directories and files with them. The state
database, its WAL and shared-memory files, the audit key and head, private signing keys and the
agent's logs hold what one user did on one host; another local user must not read them. The
umask can only remove permission bits, so ``os.open(..., 0o600)`` alone would be enough for a
file castiron creates — but a directory made by ``mkdir -p`` gets the umask's default mode, and
a home made by an older castiron (or by hand) may be wider: both are set explicitly here.

It knows nothing of castiron; it imports only the standard library.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
"""Mode of the home and of every directory castiron makes in it."""

FILE_MODE = 0o600
"""Mode of every state file castiron makes."""


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and any missing parent) with mode 0700; an existing ``path`` of ours is
    set to 0700 too. Returns ``path``.

    Raises:
        OSError: when it cannot be created or is not a directory.
    """
    if not path.is_dir():
        parent = path.parent
        if parent != path and not parent.exists():
            make_private_dir(parent)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            if not path.is_dir():
                raise
    restrict(path, DIR_MODE)
    return path


def restrict(path: Path, mode: int = FILE_MODE) -> None:
    """Set ``path`` to ``mode`` when it is ours and its mode differs (a missing path is left).

    Raises:
        OSError: when the mode cannot be changed.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
        return
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def open_private(path: Path | str, flags: int) -> int:
    """``os.open(path, flags)`` creating the file with mode 0600, and setting it to 0600 when
    it existed with another mode (a file of ours). Returns the descriptor.

    Raises:
        OSError: as :func:`os.open` does.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        ours = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
        if ours and stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = ["DIR_MODE", "FILE_MODE", "make_private_dir", "open_private", "restrict"]
