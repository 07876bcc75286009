"""The agent's systemd service unit: a pure text builder (``castiron agent unit`` prints it).

Owns :func:`service_unit`: given the settings, the user and the agent's arguments, the text of
a hardened ``Type=notify`` unit — the agent reports readiness and pings the watchdog over
``$NOTIFY_SOCKET`` (:mod:`castiron.agent.notify`); only the agent's own process is signalled on
stop (``KillMode=process``: instances and the fd keeper outlive it); the file system is
read-only but for the home (``ProtectSystem=strict``, ``ReadWritePaths=``), with a private
``/tmp``, no new privileges and a 077 umask.

It reads nothing and writes nothing; it knows nothing of the routers or the supervisor.
"""

from __future__ import annotations

from pathlib import Path

from castiron.agent.lifecycle import daemon_argv
from castiron.settings import Settings

UNIT_NAME = "castiron-agent.service"
"""The file name the unit is meant to be installed under (``/etc/systemd/system/``)."""

_HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))
_TMP_TREES = (Path("/tmp"), Path("/var/tmp"))


def _quote(word: str) -> str:
    """``word`` as one systemd command-line word (``%`` doubled, quoted when needed)."""
    word = word.replace("%", "%%")
    if word and not any(c in word for c in " \t\n\"'\\;$"):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _under_home_trees(path: Path) -> bool:
    return any(path == tree or tree in path.parents for tree in _HOME_TREES)


def service_unit(
    settings: Settings,
    *,
    user: str,
    extra_args: tuple[str, ...] = (),
    watchdog: int = 30,
    executable: str | None = None,
) -> str:
    """The unit that runs the agent of ``settings.home`` as ``user``.

    ``extra_args`` go to the agent (``--router``, ``--metrics``); ``watchdog`` is
    ``WatchdogSec`` in seconds (the agent pings every half of it); ``executable`` replaces the
    Python that runs castiron now (for tests).
    """
    argv = daemon_argv(settings, extra_args)
    if executable is not None:
        argv[0] = executable
    home = settings.home
    # ProtectHome=yes would hide a home (or an interpreter) under /home, /root or /run/user
    # entirely; read-only keeps them visible and ReadWritePaths= makes the home writable.
    python = Path(argv[0])
    hidden = any(_under_home_trees(p) for p in (home, python, python.resolve()))
    protect_home = "read-only" if hidden else "yes"
    # A private /tmp would hide a home that lives under the real one.
    in_tmp = any(tree == home or tree in home.parents for tree in _TMP_TREES)
    lines = [
        f"# castiron host agent for {home}",
        f"# Install as /etc/systemd/system/{UNIT_NAME}, then: systemctl daemon-reload &&",
        f"# systemctl enable --now {UNIT_NAME}",
        "[Unit]",
        f"Description=castiron host agent ({home})",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"User={_quote(user)}",
        f"Environment={_quote(f'CASTIRON_HOME={home}')}",
        f"ExecStart={' '.join(_quote(word) for word in argv)}",
        f"WatchdogSec={watchdog}s",
        "TimeoutStartSec=60s",
        "TimeoutStopSec=60s",
        "Restart=always",
        "RestartSec=1s",
        "# Instances and the fd keeper live in their own sessions and must outlive the agent:",
        "# only the agent's own process gets the stop signal.",
        "KillMode=process",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        f"ProtectHome={protect_home}",
        *(
            ["# The home is under /tmp: a private /tmp would hide it.", "PrivateTmp=no"]
            if in_tmp
            else ["PrivateTmp=yes"]
        ),
        f"ReadWritePaths={_quote(str(home))}",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["UNIT_NAME", "service_unit"]
