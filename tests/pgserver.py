"""A throwaway PostgreSQL server for tests and benchmarks: Debian's ``postgresql`` binaries,
its own data directory (initdb'd here), listening on 127.0.0.1 at a free port and on a Unix
socket in that directory, with password (scram) authentication.

The server refuses to run as root, so as root it runs as the ``postgres`` user (the data
directory is made theirs). One database per test: :meth:`PostgresServer.create_database`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from castiron.ports import free_port

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
USER = "castiron"
TLS_ONLY_DATABASE = "tls_only"
"""A database the server only serves over TLS (which it does not offer): connecting to it
without TLS is refused the way a TLS-only server refuses."""


def find_bin() -> Path | None:
    """The newest installed PostgreSQL ``bin`` directory (with ``initdb`` and ``postgres``)."""
    for directory in BIN_DIRS:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    return None


class PostgresServer:
    """One running server; :meth:`stop` kills it and removes its directory."""

    def __init__(self, bin_dir: Path, *, durable: bool = False) -> None:
        self.bin_dir = bin_dir
        self.durable = durable
        """Keep PostgreSQL's default durability (benchmarks); tests turn fsync off."""
        self.password = secrets.token_hex(12)
        self.port = free_port()
        # Under /tmp, not the test's tmp_path: the postgres user must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="castiron-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.getuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                        "--clear-groups", "--"]  # fmt: skip

    def start(self) -> PostgresServer:
        """initdb, configure and start the server; wait until it accepts connections."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as:
            shutil.chown(pwfile, "postgres")
        subprocess.run(
            [*self._as, str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", USER,
             "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C",
             "--no-sync", "--no-instructions"],
            check=True, capture_output=True, cwd=self.root,
        )  # fmt: skip
        pwfile.unlink()
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "local all all scram-sha-256\n"
            f"hostnossl {TLS_ONLY_DATABASE} all 127.0.0.1/32 reject\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        # A free port can be taken by another process before the server binds it (other
        # suites run beside this one): start again on a fresh port, a few times.
        for attempt in range(3):
            try:
                self._run_server()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                self.port = free_port()
        self.create_database(TLS_ONLY_DATABASE)
        return self

    def _run_server(self) -> None:
        """Start ``postgres`` on :attr:`port` and wait until it accepts connections.

        Raises:
            RuntimeError: when it exits or does not answer within 60 s (its log's tail).
        """
        fast = [] if self.durable else [
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [*self._as, str(self.bin_dir / "postgres"), "-D", str(self.data),
                 "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root), *fast,
                 "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True, check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                self._proc.kill()
                self._proc.wait()
                raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def url(self, database: str, *, password: bool = True, **options: str) -> str:
        """The URL of ``database`` over TCP (with the password unless told otherwise)."""
        auth = f"{USER}:{self.password}" if password else USER
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; returns its URL."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then kill) and remove its directory."""
        if self._proc is not None and self._proc.poll() is None:
            # SIGINT: fast shutdown; then SIGQUIT: immediate shutdown; then SIGKILL.
            for signum, wait in ((signal.SIGINT, 10), (signal.SIGQUIT, 5), (signal.SIGKILL, 10)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signum)
                try:
                    self._proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.root, ignore_errors=True)
