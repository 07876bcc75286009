"""Resource limits of local instances, enforced with Linux control groups (v1 or v2, whichever
the host has).

Owns how the host's cgroup layout is found (:func:`find_host`: the mounts in
``/proc/self/mountinfo`` and this process's own groups in ``/proc/self/cgroup``), where an
instance's groups go (below the agent's own group: a delegated subtree when the agent does not
run as root), how limits are written (:func:`create_groups`), how a new process joins them
before it runs a single instruction of its own (:func:`joiner`, run between fork and exec), what
they saw (:func:`oom_kills`) and their removal (:func:`remove_groups`).

- **v2** (one unified hierarchy with the ``memory`` and ``cpu`` controllers): ``memory.max``
  (and ``memory.swap.max`` 0), ``cpu.max``. The agent's own group must hand those controllers
  to its children (``cgroup.subtree_control``); a group that holds processes cannot, so the
  agent first moves itself into a leaf ``castiron-agent`` when it is alone there.
- **v1** (one hierarchy per controller): ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``, so swap is no way out) in the memory hierarchy,
  ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` in the cpu hierarchy.

Where none of this is possible (no cgroup mounts, no permission, controllers not delegated) the
reason is a plain sentence (:attr:`CgroupHost.problem`), so ``deploy`` and ``castiron doctor``
can say limits are *not* enforced instead of implying they are.

It knows nothing of instances beyond an id and limits, and nothing of the engine or the CLI.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CgroupVersion = Literal["v1", "v2"]

CPU_PERIOD_US = 100_000
"""The CFS period limits are expressed over (100 ms, the kernel's default)."""

GROUP_PREFIX = "castiron."
"""Instance groups are named ``castiron.<instance id>`` below the agent's own group."""

AGENT_LEAF = "castiron-agent"
"""v2: the leaf the agent moves itself into so that its group may delegate controllers."""


@dataclass(frozen=True)
class Limits:
    """What one instance may use; None: unlimited."""

    memory_bytes: int | None = None
    """Memory (resident + swap), in bytes."""
    cpus: float | None = None
    """CPU time, in CPUs (``0.5``: half of one CPU)."""

    def __bool__(self) -> bool:
        return self.memory_bytes is not None or self.cpus is not None

    def describe(self) -> str:
        """``memory 64 MiB, cpus 0.5`` (the limits set)."""
        parts = []
        if self.memory_bytes is not None:
            parts.append(f"memory {_size(self.memory_bytes)}")
        if self.cpus is not None:
            parts.append(f"cpus {self.cpus:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class CgroupHost:
    """Where instance groups go on this host, or why limits cannot be enforced."""

    version: CgroupVersion | None
    """The cgroup version used (None: none usable)."""
    memory: Path | None = None
    """The group below which instance groups get their memory limit (v2: the unified one)."""
    cpu: Path | None = None
    """The group below which instance groups get their CPU limit (v2: same as ``memory``)."""
    problem: str | None = None
    """Why limits cannot be enforced here (None: they can)."""

    def cannot(self, limits: Limits) -> str | None:
        """Why ``limits`` cannot be enforced here (None when they can)."""
        if self.problem is not None:
            return self.problem
        if limits.memory_bytes is not None and self.memory is None:
            return "the memory controller is not available"
        if limits.cpus is not None and self.cpu is None:
            return "the cpu controller is not available"
        return None

    def describe(self) -> str:
        """One line for ``castiron doctor``."""
        if self.problem is not None:
            return f"not enforced: {self.problem}"
        where = sorted({str(p) for p in (self.memory, self.cpu) if p is not None})
        return f"cgroup {self.version}, instance groups below {', '.join(where)}"


class CgroupError(Exception):
    """A group could not be created or written (the message says which and why)."""


@dataclass(frozen=True)
class _Mount:
    root: str
    point: Path
    fstype: str
    options: frozenset[str]


def _mounts(mountinfo: str) -> list[_Mount]:
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        out.append(_Mount(fields[3], Path(point), tail[0], frozenset(tail[2].split(","))))
    return out


def _own_groups(cgroup: str) -> dict[str, str]:
    """Controller (``""`` for the v2 hierarchy) -> this process's group path."""
    out: dict[str, str] = {}
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def _under(mount: _Mount, path: str) -> Path:
    """Where group ``path`` (as /proc/self/cgroup names it) lives below ``mount``."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return mount.point / path.lstrip("/")


def find_host(proc_self: Path = Path("/proc/self")) -> CgroupHost:
    """How instance limits can be enforced on this host (see the module); reads only."""
    try:
        mounts = _mounts((proc_self / "mountinfo").read_text())
        groups = _own_groups((proc_self / "cgroup").read_text())
    except OSError as exc:
        return CgroupHost(None, problem=f"cannot read {proc_self}: {exc.strerror or exc}")
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is not None and "" in groups:
        base = _under(unified, groups[""])
        try:
            available = set((base / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()
        if {"memory", "cpu"} <= available:
            return _v2(base)
    memory = cpu = None
    for mount in mounts:
        if mount.fstype != "cgroup":
            continue
        if "memory" in mount.options and "memory" in groups:
            memory = _under(mount, groups["memory"])
        if "cpu" in mount.options and "cpu" in groups:
            cpu = _under(mount, groups["cpu"])
    if memory is None and cpu is None:
        return CgroupHost(
            None,
            problem="no cgroup hierarchy with the memory or cpu controller is mounted "
            "(/sys/fs/cgroup)",
        )
    for path in (memory, cpu):
        if path is not None and not os.access(path, os.W_OK):
            return CgroupHost(
                "v1",
                memory,
                cpu,
                problem=f"{path} is not writable by this user (run the agent as root, or "
                "delegate that group to it)",
            )
    return CgroupHost("v1", memory, cpu)


def _v2(base: Path) -> CgroupHost:
    try:
        delegated = set((base / "cgroup.subtree_control").read_text().split())
    except OSError as exc:
        return CgroupHost("v2", problem=f"cannot read {base}/cgroup.subtree_control: {exc}")
    if not os.access(base, os.W_OK):
        return CgroupHost(
            "v2",
            problem=f"{base} is not writable by this user (run the agent as root, or as a "
            "systemd service with Delegate=yes)",
        )
    if {"memory", "cpu"} <= delegated or os.access(base / "cgroup.subtree_control", os.W_OK):
        return CgroupHost("v2", base, base)
    return CgroupHost("v2", problem=f"{base} does not delegate the memory and cpu controllers")


def prepare(host: CgroupHost, pid: int | None = None) -> CgroupHost:
    """Make ``host``'s groups able to hold instance groups (v2: the agent's group hands the
    memory and cpu controllers down, the agent moving itself (``pid``) into a leaf when it is
    alone there). Returns ``host``, or a copy saying why it cannot.
    """
    if host.version != "v2" or host.problem is not None or host.memory is None:
        return host
    base = host.memory
    control = base / "cgroup.subtree_control"
    try:
        if {"memory", "cpu"} <= set(control.read_text().split()):
            return host
    except OSError as exc:
        return CgroupHost("v2", problem=f"cannot read {control}: {exc.strerror or exc}")
    if _enable(control) is None:
        return host
    # "No internal processes": a group that holds processes cannot delegate. Move the agent
    # into a leaf when it is alone; never move anyone else.
    pid = os.getpid() if pid is None else pid
    try:
        members = {int(p) for p in (base / "cgroup.procs").read_text().split()}
    except (OSError, ValueError) as exc:
        return CgroupHost("v2", problem=f"cannot read {base}/cgroup.procs: {exc}")
    if members - {pid}:
        return CgroupHost(
            "v2",
            problem=f"{base} holds other processes than the agent, so it cannot hand the "
            "memory and cpu controllers to instance groups (run the agent as a systemd "
            "service with Delegate=yes)",
        )
    try:
        leaf = base / AGENT_LEAF
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        return CgroupHost("v2", problem=f"cannot move the agent into {leaf}: {exc}")
    why = _enable(control)
    return host if why is None else CgroupHost("v2", problem=why)


def _enable(control: Path) -> str | None:
    try:
        control.write_text("+memory +cpu")
        if {"memory", "cpu"} <= set(control.read_text().split()):
            return None
        why = "they stay disabled"
    except OSError as exc:
        why = exc.strerror or str(exc)
    return f"cannot enable the memory and cpu controllers in {control}: {why}"


def create_groups(host: CgroupHost, instance_id: str, limits: Limits) -> tuple[str, ...]:
    """Create the groups of ``instance_id`` with ``limits`` written; returns their paths
    (what :func:`joiner` and :func:`remove_groups` take). Call only when
    ``host.cannot(limits)`` is None.

    Raises:
        CgroupError: when a group cannot be created or a limit written (nothing is left).
    """
    name = GROUP_PREFIX + instance_id
    made: list[Path] = []
    try:
        if host.version == "v2":
            assert host.memory is not None
            group = host.memory / name
            _mkdir(group, made)
            if limits.memory_bytes is not None:
                _write(group / "memory.max", str(limits.memory_bytes))
                _write_optional(group / "memory.swap.max", "0")
            if limits.cpus is not None:
                _write(group / "cpu.max", f"{_quota(limits.cpus)} {CPU_PERIOD_US}")
        else:
            if limits.memory_bytes is not None:
                assert host.memory is not None
                group = host.memory / name
                _mkdir(group, made)
                _write(group / "memory.limit_in_bytes", str(limits.memory_bytes))
                _write_optional(group / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            if limits.cpus is not None:
                assert host.cpu is not None
                group = host.cpu / name
                if group not in made:
                    _mkdir(group, made)
                _write(group / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(group / "cpu.cfs_quota_us", str(_quota(limits.cpus)))
    except CgroupError:
        remove_groups(tuple(str(p) for p in made))
        raise
    return tuple(str(p) for p in made)


def _quota(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))


def _mkdir(path: Path, made: list[Path]) -> None:
    try:
        path.mkdir()
    except FileExistsError:
        pass  # left by an instance of the same id that could not be cleaned: reuse it
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror or exc}") from exc
    made.append(path)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value} to {path}: {exc.strerror or exc}") from exc


def _write_optional(path: Path, value: str) -> None:
    # Swap accounting may be off (no memsw / swap.max file, or EINVAL): memory still holds.
    with contextlib.suppress(OSError):
        if path.exists():
            path.write_text(value)


def joiner(groups: tuple[str, ...]) -> Callable[[], None]:
    """A function run in the child between fork and exec that moves it into ``groups``.

    It uses only ``os.open``/``os.write`` (no Python-level locks, which a forked child of a
    threaded agent could find held); a failure makes the spawn fail rather than run unlimited.
    """
    targets = [os.path.join(g, "cgroup.procs") for g in groups]

    def join() -> None:
        pid = str(os.getpid()).encode()
        for target in targets:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return join


def oom_kills(groups: tuple[str, ...]) -> int:
    """How many processes the kernel killed for exceeding the groups' memory limit."""
    total = 0
    for group in groups:
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(group, name).read_text().splitlines():
                    field, _, count = line.partition(" ")
                    if field == key:
                        total += int(count)
    return total


def remove_groups(groups: tuple[str, ...]) -> None:
    """Remove the groups (once their processes are gone); a group still busy or already gone
    is left alone."""
    for group in groups:
        with contextlib.suppress(OSError):
            os.rmdir(group)


def probe(host: CgroupHost) -> CgroupHost:
    """``host`` after a trial: a throw-away group is created with a limit and removed, so a
    problem that only shows when writing (read-only mount, no delegation) is reported."""
    if host.problem is not None:
        return host
    trial = f"doctor-{os.getpid()}"
    try:
        groups = create_groups(host, trial, Limits(memory_bytes=1 << 30, cpus=1.0))
    except CgroupError as exc:
        return CgroupHost(host.version, host.memory, host.cpu, problem=str(exc))
    remove_groups(groups)
    return host


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


__all__ = [
    "AGENT_LEAF",
    "CPU_PERIOD_US",
    "GROUP_PREFIX",
    "CgroupError",
    "CgroupHost",
    "CgroupVersion",
    "Limits",
    "create_groups",
    "find_host",
    "joiner",
    "oom_kills",
    "prepare",
    "probe",
    "remove_groups",
]
