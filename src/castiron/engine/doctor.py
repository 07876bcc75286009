"""``castiron doctor``: what this host offers each runtime and router, as a list of checks.

Owns the checks and their verdicts: Python's version, bubblewrap (the local runtime's
sandbox), the Docker engine and its SDK (the docker runtime), HAProxy (the haproxy router),
git (commit tags), the builtin router's fast path (compiled modules, uvloop, llhttp), the
spec's listen ports, the state directory's permissions and the agent.
A check is *required* when the spec in use needs it (its runtimes, routers, isolation and
ports) or castiron cannot run without it; every missing thing comes with the command that
installs or fixes it. It changes nothing and starts nothing.

It reads the host through small probes (``shutil.which``, a socket connect, ``find_spec``),
never imports a third-party SDK, and knows nothing of the CLI.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from castiron import compiled
from castiron.agent.lifecycle import agent_pid
from castiron.drivers.local import probe_bwrap
from castiron.model import Address
from castiron.settings import Settings
from castiron.spec.load import LoadedSpec, load_spec

Status = Literal["ok", "missing", "warning"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
MIN_PYTHON = (3, 11)


@dataclass(frozen=True)
class Check:
    """One verdict about the host."""

    name: str
    status: Status
    required: bool
    detail: str
    fix: str | None = None
    """The command (or edit) that fixes a missing or doubtful thing."""

    def to_json(self) -> dict[str, Any]:
        """The check as a JSON object."""
        return {
            "name": self.name,
            "status": self.status,
            "required": self.required,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Needs:
    """What the spec in use asks of the host (all false without a spec)."""

    docker: bool = False
    haproxy: bool = False
    sandbox: bool = False
    listens: tuple[tuple[str, str], ...] = ()
    """(environment, host:port) pairs."""


def needs_of(loaded: LoadedSpec | None) -> Needs:
    """What ``loaded``'s environments need of the host."""
    if loaded is None:
        return Needs()
    envs = loaded.spec.environments
    return Needs(
        docker=any(e.runtime == "docker" for e in envs.values()),
        haproxy=any(e.router.type == "haproxy" for e in envs.values()),
        sandbox=any(e.runtime == "local" and e.isolation == "sandbox" for e in envs.values()),
        listens=tuple((name, e.listen) for name, e in sorted(envs.items())),
    )


def _python(version: tuple[int, ...]) -> Check:
    shown = ".".join(str(p) for p in version[:3])
    if tuple(version[:2]) >= MIN_PYTHON:
        return Check("python", "ok", True, f"Python {shown}")
    return Check(
        "python",
        "missing",
        True,
        f"Python {shown}; castiron needs 3.11 or newer",
        "install Python 3.11 or newer (apt-get install python3)",
    )


def _bwrap(path_env: str, required: bool, probe: Callable[[str], str | None]) -> Check:
    bwrap = shutil.which("bwrap", path=path_env)
    fix = "apt-get install bubblewrap"
    if bwrap is None:
        why = (
            "needed: an environment sets isolation: sandbox"
            if required
            else ("local instances run without a sandbox")
        )
        return Check("bubblewrap", "missing", required, f"bwrap not found ({why})", fix)
    refused = probe(bwrap)
    if refused is not None:
        return Check(
            "bubblewrap",
            "missing" if required else "warning",
            required,
            f"{refused} (local instances run without a sandbox)",
            "allow user namespaces (sysctl kernel.unprivileged_userns_clone=1), or set "
            "isolation: none",
        )
    return Check("bubblewrap", "ok", required, f"{bwrap} can sandbox local instances")


def _limits(probe: Callable[[], str | None]) -> Check:
    """Whether ``memory:`` and ``cpus:`` of local instances are enforced (cgroups v1 or v2,
    with a trial group made and removed); ``probe`` says why not, or None when they are."""
    problem = probe()
    if problem is None:
        return Check("limits", "ok", False, "memory and cpus of local instances are enforced")
    return Check(
        "limits",
        "warning",
        False,
        f"memory and cpus of local instances are NOT enforced: {problem}",
        "run castiron's agent as root, or in a cgroup v2 subtree delegated to this user "
        "(systemd: Delegate=yes)",
    )


def probe_limits() -> str | None:
    """Why this host cannot enforce instance limits, or None when it can."""
    from castiron.agent import cgroups

    host = cgroups.probe(cgroups.find_host())
    return host.problem


def _docker_engine(docker_host: str, required: bool) -> Check:
    fix = "apt-get install docker.io && systemctl start docker"
    if not docker_host.startswith("unix://"):
        return Check("docker engine", "ok", required, f"DOCKER_HOST={docker_host} (not probed)")
    path = docker_host.removeprefix("unix://")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3.0)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = sock.recv(4096)
    except OSError as exc:
        why = exc.strerror or str(exc)
        return Check(
            "docker engine",
            "missing",
            required,
            f"no Docker engine at {path} ({why}); the docker runtime cannot run",
            fix,
        )
    if b" 200 " not in answer.split(b"\r\n", 1)[0]:
        first = answer.split(b"\r\n", 1)[0].decode("ascii", "replace")
        return Check(
            "docker engine", "missing", required, f"{path} answered {first!r} to a ping", fix
        )
    return Check("docker engine", "ok", required, f"answers on {path}")


def _docker_sdk(required: bool, find: Callable[[str], object]) -> Check:
    if find("docker") is None:
        return Check(
            "docker sdk",
            "missing",
            required,
            "the docker Python package is not installed (the docker runtime needs it)",
            "pip install 'castiron[docker]'",
        )
    return Check("docker sdk", "ok", required, "the docker Python package is installed")


def _haproxy(path_env: str, required: bool) -> Check:
    found = shutil.which("haproxy", path=path_env)
    if found is None:
        why = "an environment sets router: haproxy" if required else "the builtin router is used"
        return Check(
            "haproxy", "missing", required, f"haproxy not found ({why})", "apt-get install haproxy"
        )
    return Check("haproxy", "ok", required, f"{found}")


def _git(path_env: str) -> Check:
    found = shutil.which("git", path=path_env)
    if found is None:
        return Check(
            "git",
            "missing",
            False,
            "git not found: bake tags images by digest instead of commit",
            "apt-get install git",
        )
    return Check("git", "ok", False, found)


def _port(environment: str, listen: str, agent: int | None) -> Check:
    address = Address.parse(listen)
    name = f"port {listen}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in address.host else socket.AF_INET) as sock:
            sock.bind((address.host, address.port))
    except OSError as exc:
        if agent is not None:
            return Check(
                name,
                "ok",
                True,
                f"{environment}: in use, by this state directory's agent or "
                f"another process ({exc.strerror or exc})",
            )
        return Check(
            name,
            "missing",
            True,
            f"{environment}: {listen} is taken by another process ({exc.strerror or exc})",
            f"choose a free port for environments.{environment}.listen in the spec",
        )
    return Check(name, "ok", True, f"{environment}: free")


def _home(home: Path) -> Check:
    if not home.exists():
        parent = next((p for p in home.parents if p.exists()), None)
        if parent is not None and os.access(parent, os.W_OK | os.X_OK):
            return Check("state directory", "ok", True, f"{home} (created on first use)")
        return Check(
            "state directory",
            "missing",
            True,
            f"{home} cannot be created ({parent} is not writable)",
            "pass --home DIR or set CASTIRON_HOME to a writable directory",
        )
    if not home.is_dir():
        return Check(
            "state directory",
            "missing",
            True,
            f"{home} is not a directory",
            "pass --home DIR or set CASTIRON_HOME to a directory",
        )
    if not os.access(home, os.W_OK | os.X_OK):
        return Check(
            "state directory",
            "missing",
            True,
            f"{home} is not writable by you",
            f"chown -R {os.getuid()} {home}",
        )
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        return Check(
            "state directory",
            "warning",
            True,
            f"{home} is readable by others (mode {mode:04o}); castiron keeps it 0700",
            f"chmod 700 {home}",
        )
    return Check("state directory", "ok", True, f"{home} (mode {mode:04o})")


def _agent(pid: int | None) -> Check:
    if pid is not None:
        return Check("agent", "ok", False, f"running (pid {pid}); stop it with castiron agent stop")
    return Check("agent", "ok", False, "not running (the CLI starts it when a deploy needs it)")


def _router(speed: compiled.Status, find_module: Callable[[str], object]) -> Check:
    """The builtin router's fast path: its compiled modules, uvloop and llhttp (httptools)."""
    absent = [name for name in ("uvloop", "httptools") if find_module(name) is None]
    parts = [speed.reason]
    if absent:
        parts.append(f"{' and '.join(absent)} not installed")
    detail = "builtin router: " + "; ".join(parts)
    if speed.compiled and not absent:
        return Check("builtin router", "ok", False, detail)
    fixes = []
    if absent:
        fixes.append("pip install 'castiron[fast]'")
    if speed.turned_off:
        fixes.append(f"unset {compiled.ENV}")
    elif not speed.compiled:
        fixes.append(
            "reinstall where mypy and a C compiler are available (pip install --no-deps "
            "--force-reinstall . in a checkout; ./scripts/test rebuilds it there)"
        )
    return Check("builtin router", "warning", False, detail, "; ".join(fixes))


def diagnose(
    settings: Settings,
    *,
    version: tuple[int, ...] | None = None,
    bwrap_probe: Callable[[str], str | None] = probe_bwrap,
    find_module: Callable[[str], object] = importlib.util.find_spec,
    limits_probe: Callable[[], str | None] = probe_limits,
    router_speed: compiled.Status | None = None,
) -> tuple[LoadedSpec | None, list[Check]]:
    """Every check for ``settings`` (and its spec, when one exists and validates).

    Raises:
        SpecError: when the spec file exists but does not validate.
    """
    loaded: LoadedSpec | None = None
    if settings.spec_path.is_file():
        loaded = load_spec(settings.spec_path, settings.environ)
    needs = needs_of(loaded)
    path_env = settings.environ.get("PATH", os.defpath)
    docker_host = settings.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    pid = agent_pid(settings)
    checks = [
        _python(version if version is not None else tuple(sys.version_info[:3])),
        _home(settings.home),
        _agent(pid),
        _bwrap(path_env, needs.sandbox, bwrap_probe),
        _limits(limits_probe),
        _docker_engine(docker_host, needs.docker),
        _docker_sdk(needs.docker, find_module),
        _haproxy(path_env, needs.haproxy),
        _git(path_env),
        _router(router_speed or compiled.status(), find_module),
        *(_port(env, listen, pid) for env, listen in needs.listens),
    ]
    return loaded, checks


def failed(checks: list[Check]) -> list[Check]:
    """The required checks that found something missing."""
    return [c for c in checks if c.required and c.status == "missing"]


__all__ = ["Check", "Needs", "diagnose", "failed", "needs_of"]
