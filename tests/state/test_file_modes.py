"""State files are 0600 in 0700 directories whatever the umask, and another user gets one clean
``error: permission denied: ...`` line (exit 1), never a traceback."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from castiron.cli.main import main
from castiron.images.store import ImageStore
from castiron.state.base import AuditDraft
from castiron.state.sqlite import open_state

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The widest umask: every file created without an explicit mode is world-writable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_state_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "deep" / "home"
    with open_state(home / "state.db", actor="a@b") as store:
        store.mutate(AuditDraft("test.step", environment="staging"), lambda tx: None)
        names = {p.name for p in home.iterdir()}
        assert {"state.db", "state.db-wal", "state.db-shm", "audit.key", "audit.head"} <= names
        for name in ("state.db", "state.db-wal", "state.db-shm", "audit.key", "audit.head"):
            assert mode(home / name) == 0o600, name
    assert mode(home) == 0o700
    assert mode(home.parent) == 0o700  # created by castiron too
    assert all(mode(p) == 0o600 for p in home.iterdir() if p.is_file())


@pytest.mark.usefixtures("open_umask")
def test_the_image_store_is_private_whatever_the_umask(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "home" / "images")
    store.ensure()
    with store.using():
        pass
    for path in (store.root, store.root / "blobs", store.blobs_dir):
        assert mode(path) == 0o700, path
    assert mode(store.root / "gc.lock") == 0o600


def test_an_older_wider_home_is_narrowed_when_opened(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with open_state(home / "state.db", actor="a@b") as store:
        store.mutate(AuditDraft("test.step", environment="staging"), lambda tx: None)
    os.chmod(home, 0o755)
    os.chmod(home / "state.db", 0o644)
    with open_state(home / "state.db", actor="a@b"):
        assert mode(home) == 0o700
        assert mode(home / "state.db") == 0o600


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (unlike pytest's own tmp_path, 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="castiron-modes-"))
    try:
        os.chmod(path, 0o755)
        yield path
    finally:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def run_as(uid: int, home: Path, argv: list[str], out: Path) -> int:
    """Run ``castiron ARGV`` for ``home`` in a child process as ``uid``; its output goes to
    ``out``."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with warnings.catch_warnings():
        # The child only switches user and runs one command: no lock of another thread matters.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stdout = sys.stderr = open(fd, "w")  # noqa: SIM115
            os.environ["CASTIRON_HOME"] = str(home)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_another_user_gets_one_clean_permission_denied_line(tmp_path: Path) -> None:
    # Import what the command loads lazily first: the other user may not be able to read this
    # checkout or the interpreter's library.
    import castiron.cli.commands.status_cmd
    import castiron.compose  # noqa: F401

    with shared_dir() as shared:
        home = shared / "home"
        with open_state(home / "state.db", actor="root@host") as store:
            store.mutate(AuditDraft("test.step", environment="staging"), lambda tx: None)
        out = tmp_path / "stderr"
        code = run_as(NOBODY, home, ["history", "staging", "--json"], out)
        text = out.read_text()
    assert code == 1, text
    assert text == (
        f"error: permission denied: {home}/state.db "
        "(a castiron home is private to the user who created it)\n"
    )
