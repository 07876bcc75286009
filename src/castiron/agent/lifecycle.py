"""Finding, starting and stopping the agent process of a ``CASTIRON_HOME``.

Owns the agent directory's names (``agent.sock``, ``agent.lock``, ``agent.pid``,
``agent.log``), the agent's command line (``python -m castiron.agent.daemon --home H``), the
minimal environment agent processes run with, and the life cycle helpers
(:func:`ensure_agent`, :func:`start_agent`, :func:`stop_agent`, :func:`agent_pid`). It talks
to a running agent only through :class:`~castiron.agent.client.AgentClient`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from castiron.agent.client import AgentClient
from castiron.errors import AgentError
from castiron.filemodes import make_private_dir
from castiron.settings import Settings

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
PID_NAME = "agent.pid"
LOG_NAME = "agent.log"


# --- finding, starting and stopping the agent -----------------------------------------------------


def socket_path(settings: Settings) -> Path:
    """The control socket of the agent of ``settings.home``."""
    return settings.agent_path / SOCKET_NAME


def agent_pid(settings: Settings) -> int | None:
    """The pid of the agent that holds ``settings.home``'s lock, or None when none runs.

    The lock, not the pid file, is the truth: a crashed agent leaves a stale pid file but its
    lock dies with it.
    """
    lock_path = settings.agent_path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    try:
        return int((settings.agent_path / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return 0  # held by an agent that has not written its pid yet


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` of the agent when the deployer's environment has none."""

_KEPT_ENV = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TZ"})


def minimal_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the agent and the fd keeper run with: ``PATH``, locale, ``HOME``,
    ``TZ`` and ``CASTIRON_*`` of ``environ``, nothing else.

    The deployer's cloud credentials and tokens must not sit in a long-lived daemon's
    ``/proc/PID/environ``; instances get exactly the environment of their spawn request.
    """
    kept = {
        name: text
        for name, text in environ.items()
        if name in _KEPT_ENV or name.startswith("CASTIRON_")
    }
    kept.setdefault("PATH", DEFAULT_PATH)
    return kept


def daemon_argv(settings: Settings, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command that runs the agent of ``settings.home`` in the foreground."""
    return [
        sys.executable,
        "-m",
        "castiron.agent.daemon",
        "--home",
        str(settings.home),
        *extra_args,
    ]


def start_agent(
    settings: Settings, *, extra_args: tuple[str, ...] = (), timeout: float = 15.0
) -> int:
    """Start the agent detached (own session), logging to ``agent/agent.log``; return its pid.

    Waits until the control socket answers.

    Raises:
        AgentError: when an agent already runs, or the new one exits or does not answer in
            ``timeout`` seconds (the message quotes the end of its log).
    """
    running = agent_pid(settings)
    if running is not None:
        raise AgentError(f"an agent already runs for {settings.home} (pid {running})")
    agent_dir = settings.agent_path
    make_private_dir(agent_dir)
    log_path = agent_dir / LOG_NAME
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        process = subprocess.Popen(
            [*daemon_argv(settings, extra_args), "--log-file", str(log_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,
            close_fds=True,
            cwd="/",
            env=minimal_environ(settings.environ),
        )
    except OSError as exc:
        raise AgentError(f"cannot start the agent for {settings.home}: {exc}") from exc
    finally:
        os.close(log_fd)
    client = AgentClient(socket_path(settings))
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise AgentError(
                f"the agent for {settings.home} exited with status {code}: "
                f"{_log_tail(log_path)} (log: {log_path})"
            )
        if client.health():
            # The agent lives on in its own session; it is not ours to wait for.
            process.returncode = 0
            return process.pid
        if time.monotonic() > deadline:
            process.returncode = 0
            raise AgentError(
                f"the agent for {settings.home} (pid {process.pid}) did not answer within "
                f"{timeout:g}s (log: {log_path})"
            )
        time.sleep(0.02)


def ensure_agent(
    settings: Settings, *, extra_args: tuple[str, ...] = (), timeout: float = 15.0
) -> AgentClient:
    """A client of the agent of ``settings.home``, starting the agent when none runs.

    Raises:
        AgentError: when no agent runs and one cannot be started (see :func:`start_agent`).
    """
    client = AgentClient(socket_path(settings))
    if client.health():
        return client
    try:
        start_agent(settings, extra_args=extra_args, timeout=timeout)
    except AgentError:
        if client.health():  # another caller started it in the meantime
            return client
        raise
    return client


def stop_agent(settings: Settings, *, timeout: float = 30.0) -> int | None:
    """Stop the agent of ``settings.home``: ask it via the API, then SIGTERM; wait for it.

    Returns the pid that was stopped, or None when no agent was running. Supervised instances
    are not stopped: they outlive the agent.

    Raises:
        AgentError: when the agent is still running after ``timeout`` seconds.
    """
    pid = agent_pid(settings)
    if pid is None:
        return None
    with contextlib.suppress(AgentError):
        AgentClient(socket_path(settings), timeout=5.0).shutdown()
    if _wait_unlocked(settings, timeout / 2):
        _wait_gone(pid, timeout / 2)
        return pid
    if pid > 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if _wait_unlocked(settings, timeout / 2):
        _wait_gone(pid, timeout / 2)
        return pid
    raise AgentError(f"the agent for {settings.home} (pid {pid}) did not stop within {timeout:g}s")


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait until process ``pid`` has exited (its lock goes a moment before the process
    does), so nothing of the agent is left once ``agent stop`` returns."""
    deadline = time.monotonic() + timeout
    while pid > 0 and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return  # another user's process now holds the pid: ours is gone
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return
        if stat_line.rpartition(")")[2].split()[:1] == ["Z"]:
            return  # exited; only its parent's bookkeeping is left
        time.sleep(0.02)


def _wait_unlocked(settings: Settings, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while agent_pid(settings) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _log_tail(path: Path, limit: int = 600) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            text = fh.read().decode(errors="replace").strip()
    except OSError:
        return "(no log)"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


__all__ = [
    "DEFAULT_PATH",
    "LOCK_NAME",
    "LOG_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "agent_pid",
    "daemon_argv",
    "ensure_agent",
    "minimal_environ",
    "socket_path",
    "start_agent",
    "stop_agent",
]
