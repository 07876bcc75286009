"""The fd keeper: a tiny process that keeps the routers' listening sockets across agent restarts.

The agent hands the keeper a duplicate of every listening socket it opens (``SCM_RIGHTS`` over
``agent/fdkeeper.sock``). The keeper runs in its own session, so it survives an agent that is
killed, even with SIGKILL. While no agent runs, the kernel goes on accepting connections into
the sockets' backlog; the next agent fetches the same sockets from the keeper and serves them,
so clients see a delay, never a refusal.

Protocol: one request per connection, one line of ASCII, optionally with one fd attached;
one line back (``OK`` / ``NONE`` / ``ERR reason``), with an fd for ``GET``::

    PUT <name>   (+fd)  keep this socket under <name>, replacing and closing any older one
    GET <name>          a duplicate of the kept socket (reply OK + fd), or NONE
    DEL <name>          close and forget it
    LIST                OK name name ...
    QUIT                close everything and exit

The keeper exits by itself after ``DEL`` of its last socket, on ``QUIT``, on SIGTERM, or when
its socket file disappears (its home was removed). It imports only the standard library and
knows nothing of routes, routers or the control API.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from castiron.agent.client import unix_address, unix_connect
from castiron.agent.lifecycle import minimal_environ
from castiron.errors import AgentError

SOCKET_NAME = "fdkeeper.sock"
PID_NAME = "fdkeeper.pid"
_MAX_LINE = 4096


# --- the keeper process -------------------------------------------------------------------------


def serve(sock_path: Path, pid_path: Path | None = None) -> int:
    """Run the keeper on ``sock_path`` until told to quit; returns the exit status."""
    kept: dict[str, socket.socket] = {}
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    tmp = sock_path.with_name(f".{sock_path.name}.{os.getpid()}")
    address, dir_fd = unix_address(tmp)
    try:
        server.bind(address)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, sock_path)
    server.listen(16)
    server.settimeout(2.0)
    if pid_path is not None:
        fd = os.open(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as out:
            out.write(f"{os.getpid()}\n")
    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C meant for the agent is not for us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ino = sock_path.stat().st_ino
    try:
        while not stopping:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                try:
                    if sock_path.stat().st_ino != ino:
                        break
                except FileNotFoundError:
                    break
                continue
            except InterruptedError:
                continue
            with conn:
                conn.settimeout(5.0)
                try:
                    verb = _handle(conn, kept)
                except OSError:
                    continue
                if verb == "QUIT" or (verb == "DEL" and not kept):
                    break
    finally:
        for held in kept.values():
            held.close()
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if sock_path.stat().st_ino == ino:
                sock_path.unlink()
        if pid_path is not None:
            with contextlib.suppress(OSError):
                if pid_path.read_text().strip() == str(os.getpid()):
                    pid_path.unlink()
    return 0


def _handle(conn: socket.socket, kept: dict[str, socket.socket]) -> str:
    """Serve one request; returns its verb (``ERR`` for a bad one)."""
    msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_LINE, 1)
    try:
        line = msg.decode("ascii", errors="replace").strip()
        verb, _, name = line.partition(" ")
        if verb == "PUT" and name and len(fds) == 1:
            old = kept.pop(name, None)
            if old is not None:
                old.close()
            kept[name] = socket.socket(fileno=fds.pop())
            conn.sendall(b"OK\n")
        elif verb == "GET" and name:
            held = kept.get(name)
            if held is None:
                conn.sendall(b"NONE\n")
            else:
                socket.send_fds(conn, [b"OK\n"], [held.fileno()])
        elif verb == "DEL" and name:
            old = kept.pop(name, None)
            if old is not None:
                old.close()
            conn.sendall(b"OK\n")
        elif verb == "LIST":
            conn.sendall(("OK " + " ".join(sorted(kept))).strip().encode() + b"\n")
        elif verb == "QUIT":
            conn.sendall(b"OK\n")
        else:
            conn.sendall(b"ERR bad request\n")
            return "ERR"
    finally:
        for fd in fds:
            os.close(fd)
    return verb


def main(argv: list[str] | None = None) -> int:
    """``python -m castiron.agent.fdkeeper --socket PATH [--pid-file PATH]``."""
    parser = argparse.ArgumentParser(prog="castiron-fdkeeper", description=__doc__)
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on.")
    parser.add_argument("--pid-file", type=Path, default=None, help="Where to write the pid.")
    args = parser.parse_args(argv)
    return serve(args.socket, args.pid_file)


# --- the agent's side -----------------------------------------------------------------------------


class FdKeeperClient:
    """The agent's handle on its fd keeper (started on first use when none runs)."""

    def __init__(self, agent_dir: Path, *, log_fd: int | None = None) -> None:
        self.socket_path = agent_dir / SOCKET_NAME
        self.pid_path = agent_dir / PID_NAME
        self._log_fd = log_fd
        self._process: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        """True when a keeper answers on the socket."""
        try:
            self._request("LIST")
        except AgentError:
            return False
        return True

    def names(self) -> list[str]:
        """Names of the sockets kept (empty when no keeper runs)."""
        try:
            reply, _ = self._request("LIST")
        except AgentError:
            return []
        return reply.split()[1:]

    def get(self, name: str) -> socket.socket | None:
        """The kept socket called ``name`` (a duplicate), or None (also when no keeper runs)."""
        try:
            reply, fd = self._request(f"GET {name}", want_fd=True)
        except AgentError:
            return None
        if reply != "OK" or fd is None:
            return None
        return socket.socket(fileno=fd)

    def put(self, name: str, sock: socket.socket) -> None:
        """Give the keeper a duplicate of ``sock`` under ``name``, starting it when needed.

        Raises:
            AgentError: when no keeper can be started or it refuses.
        """
        if not self.running():
            self._start()
        reply, _ = self._request(f"PUT {name}", fd=sock.fileno())
        if reply != "OK":
            raise AgentError(f"fd keeper at {self.socket_path} refused {name}: {reply}")

    def delete(self, name: str) -> None:
        """Close the kept socket ``name`` (nothing when it or the keeper is gone)."""
        with contextlib.suppress(AgentError):
            self._request(f"DEL {name}")
        self._reap()

    def quit(self) -> None:
        """Close every kept socket and stop the keeper (nothing when none runs)."""
        with contextlib.suppress(AgentError):
            self._request("QUIT")
        self._reap(wait=2.0)

    def _reap(self, wait: float = 0.0) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=wait) if wait else None
            if self._process.poll() is not None:
                self._process = None

    def _start(self) -> None:
        self._reap()
        out = self._log_fd if self._log_fd is not None else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "castiron.agent.fdkeeper",
                    "--socket",
                    str(self.socket_path),
                    "--pid-file",
                    str(self.pid_path),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env=minimal_environ(os.environ),
            )
        except OSError as exc:
            raise AgentError(f"cannot start the fd keeper: {exc}") from exc
        deadline = time.monotonic() + 10.0
        while not self.running():
            if self._process.poll() is not None:
                raise AgentError(
                    f"the fd keeper exited with status {self._process.returncode} "
                    f"(socket {self.socket_path})"
                )
            if time.monotonic() > deadline:
                raise AgentError(f"the fd keeper did not answer on {self.socket_path}")
            time.sleep(0.01)

    def detach(self) -> None:
        """Leave a running keeper to live on (the agent exits without waiting for it)."""
        if self._process is not None and self._process.poll() is None:
            self._process.returncode = 0
        self._process = None

    def _request(
        self, line: str, *, fd: int | None = None, want_fd: bool = False
    ) -> tuple[str, int | None]:
        try:
            conn = unix_connect(self.socket_path, 5.0)
        except OSError as exc:
            raise AgentError(f"no fd keeper at {self.socket_path}: {exc}") from exc
        with conn:
            try:
                socket.send_fds(conn, [line.encode() + b"\n"], [fd] if fd is not None else [])
                msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_LINE, 1)
            except OSError as exc:
                raise AgentError(f"fd keeper at {self.socket_path} failed: {exc}") from exc
        got = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if got is not None and not want_fd:
            os.close(got)
            got = None
        return msg.decode("ascii", errors="replace").strip(), got


__all__ = ["FdKeeperClient", "main", "serve"]

if __name__ == "__main__":
    raise SystemExit(main())
