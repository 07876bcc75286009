"""The local runtime: instances are supervised processes on this host, optionally sandboxed.

Owns how an :class:`InstanceSpec` becomes a spawn request for the host agent: the release's
read-only root filesystem (``releases/sha256/<hex>/rootfs``, unpacked once per digest under a
file lock), the command, environment, port and working directory, and the isolation:

* ``sandbox`` (bubblewrap): the rootfs mounted read-only — as ``/`` when the image has a base
  (its own ``/bin`` or ``/usr``), else beside the host's ``/usr``, ``/bin``, ``/lib*`` and
  ``/etc`` (read-only) for host-based images such as ``scratch`` + the host's python3 —, a
  private tmpfs ``/tmp``, new pid and ipc namespaces, no new privileges, the host network (so
  loopback works), and a private writable directory bound on each ``writable`` path;
* ``none``: the command runs on the host in the read-only tree, with a private writable
  scratch directory as ``TMPDIR``;
* ``auto``: ``sandbox`` when bubblewrap is installed and works here (probed once per driver),
  else ``none``.

It reaches the agent only through :mod:`castiron.agent.client` and is handed everything else
(the unpack function, the bubblewrap path, health checks) by the engine. It must not import
the spec, images, traffic, state or the engine, and decides no policy: replacing an exited
instance is done by the agent when the engine asks for it (``replace_on_exit``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from castiron.agent.client import AgentClient, InstanceRecord, SpawnRequest
from castiron.errors import AgentError, CastironError, NotFoundError, RuntimeDriverError
from castiron.filemodes import make_private_dir
from castiron.model import (
    Address,
    Digest,
    ImageRef,
    Instance,
    InstanceSpec,
    InstanceState,
    Observed,
    ReleaseId,
    parse_memory,
)
from castiron.ports import free_port

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""``PATH`` given to an instance whose image and release set none."""

HOST_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
"""Host directories a host-based image (no ``/bin`` or ``/usr`` of its own) sees read-only."""

LABELS = ("castiron.app", "castiron.environment", "castiron.release", "castiron.image")
"""Labels every instance castiron created carries; one missing marks a stray."""

_SANDBOX_FIX = (
    "install bubblewrap (apt-get install bubblewrap) and allow user namespaces, "
    "or set isolation: none for this environment"
)


def find_bwrap(path_env: str) -> str | None:
    """The bubblewrap executable on ``path_env`` (a ``PATH`` value), or None."""
    return shutil.which("bwrap", path=path_env)


def probe_bwrap(bwrap: str) -> str | None:
    """Why bubblewrap cannot sandbox here (None when it can): runs a minimal sandbox once.

    Some containers forbid the namespaces it needs; this tells before an instance fails.
    """
    argv = [bwrap, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    argv += ["--unshare-pid", "--unshare-ipc", "--", bwrap, "--version"]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{bwrap} cannot run: {exc}"
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return f"{bwrap} failed (status {proc.returncode}): {tail[0]}"
    return None


@dataclass(frozen=True)
class SandboxPolicy:
    """What the host offers for isolation; built at the edge from settings."""

    bwrap: str | None = None
    """The bubblewrap executable (see :func:`find_bwrap`); None when it is not installed."""


Unpacker = Callable[[ImageRef, Path], None]
"""Unpacks an image into a new, read-only rootfs directory (``images.rootfs.unpack_release``)."""

@dataclass
class LocalDriver:
    """Instances as processes supervised by the host agent."""

    agent: AgentClient
    releases_dir: Path
    """``CASTIRON_HOME/releases``: one read-only rootfs per image digest."""
    unpack: Unpacker
    sandbox: SandboxPolicy = field(default_factory=SandboxPolicy)
    instances_dir: Path | None = None
    """Private per-instance directories (scratch, writable paths); default
    ``releases_dir/../instances``."""
    replace_on_exit: bool = True
    """Ask the agent to replace an instance that exits by itself (with backoff, health-gated)."""
    notice: Callable[[str], None] | None = None
    """Hears, once per driver, when the host cannot enforce the limits an instance declares."""
    name: str = "local"
    _probe: dict[str, str | None] = field(default_factory=dict, repr=False)
    _limits_told: bool = field(default=False, repr=False)

    # -- images

    def rootfs(self, digest: Digest) -> Path:
        """Where the read-only tree of ``digest`` lives (whether or not it exists)."""
        algo, _, hexpart = digest.partition(":")
        return self.releases_dir / algo / hexpart / "rootfs"

    def ensure_image(self, image: ImageRef) -> None:
        """Unpack ``image`` once into its rootfs (concurrent callers wait on a file lock).

        Raises:
            RuntimeDriverError: when the releases directory cannot be used.
            DigestMismatchError, ImageError: as the unpacker raises them.
        """
        rootfs = self.rootfs(image.digest)
        if rootfs.is_dir():
            return
        try:
            make_private_dir(rootfs.parent)
            lock_fd = os.open(rootfs.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RuntimeDriverError(f"cannot prepare {rootfs.parent}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not rootfs.is_dir():
                self.unpack(image, rootfs)
        finally:
            os.close(lock_fd)

    def renew_rootfs(self, image: ImageRef) -> Path | None:
        """Move the tree of ``image`` aside and unpack a fresh one in its place (never repair
        in place): for a release tree found modified. Instances already running keep the old
        tree (their working directory and mounts follow it); new ones get the fresh one.
        Returns where the old tree went (None when there was none); remove it with
        :meth:`discard_rootfs` once no instance uses it.

        Raises:
            RuntimeDriverError: when the tree cannot be moved.
            DigestMismatchError, ImageError: as the unpacker raises them.
        """
        rootfs = self.rootfs(image.digest)
        try:
            make_private_dir(rootfs.parent)
            lock_fd = os.open(rootfs.parent / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RuntimeDriverError(f"cannot prepare {rootfs.parent}: {exc}") from exc
        aside: Path | None = None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if rootfs.is_dir():
                aside = rootfs.with_name(f"{rootfs.name}.drifted-{time.time_ns()}")
                try:
                    os.rename(rootfs, aside)
                except OSError as exc:
                    raise RuntimeDriverError(f"cannot move {rootfs} aside: {exc}") from exc
            self.unpack(image, rootfs)
        finally:
            os.close(lock_fd)
        return aside

    def discard_rootfs(self, path: Path) -> None:
        """Remove a tree :meth:`renew_rootfs` moved aside (read-only bits included); a tree
        that is gone already is not an error.

        Raises:
            RuntimeDriverError: when ``path`` is not a tree moved aside here.
        """
        if ".drifted-" not in path.name or path.parent.parent.parent != self.releases_dir:
            raise RuntimeDriverError(f"{path} is not a release tree moved aside")
        if not path.exists():
            return
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                sub = os.path.join(dirpath, name)
                if not os.path.islink(sub):
                    with contextlib.suppress(OSError):
                        os.chmod(sub, 0o755)
        with contextlib.suppress(OSError):
            os.chmod(path, 0o755)
        shutil.rmtree(path, ignore_errors=True)

    # -- instances

    def create(self, spec: InstanceSpec) -> Instance:
        """Start a NEW instance of ``spec`` through the agent; returns it with its address.

        Raises:
            RuntimeDriverError: when the image is not unpacked, the isolation asked for is not
                available, the id is taken, or the agent cannot start it.
        """
        where = f"{spec.environment}/{spec.id}"
        rootfs = self.rootfs(spec.image.digest)
        if not rootfs.is_dir():
            raise RuntimeDriverError(
                f"{where}: image {spec.image.digest} is not unpacked (ensure_image first)"
            )
        isolation = self._isolation(spec, where)
        memory_bytes = None
        if spec.memory is not None:
            try:
                memory_bytes = parse_memory(spec.memory)
            except ValueError as exc:
                raise RuntimeDriverError(f"{where}: memory: {exc}") from None
        if spec.cpus is not None and not (math.isfinite(spec.cpus) and spec.cpus > 0):
            raise RuntimeDriverError(f"{where}: cpus must be more than 0, not {spec.cpus}")
        port = spec.port or free_port(spec.host)
        address = f"[{spec.host}]:{port}" if ":" in spec.host else f"{spec.host}:{port}"
        instance_dir = (self.instances_dir or self.releases_dir.parent / "instances") / spec.id
        subdirs = ("tmp", *(f"w{i}" for i in range(len(spec.writable))))
        env = {"PATH": DEFAULT_PATH, **spec.env}
        env.update(
            PORT=str(port),
            HOST=spec.host,
            CASTIRON_APP=spec.app,
            CASTIRON_ENVIRONMENT=spec.environment,
        )
        if isolation == "sandbox":
            env["TMPDIR"] = "/tmp"
            prefix = self._bwrap_argv(spec, rootfs, instance_dir, where)
            argv, cwd = spec.command, "/"
        else:
            if spec.writable:
                raise RuntimeDriverError(
                    f"{where}: writable paths {', '.join(spec.writable)} need the sandbox; "
                    + _SANDBOX_FIX.replace(", or set isolation: none for this environment", "")
                )
            env["TMPDIR"] = str(instance_dir / "tmp")
            prefix = ()
            argv = _host_command(spec.command, rootfs)
            cwd = str(rootfs / spec.workdir.lstrip("/"))
        labels = {
            **spec.labels,
            "castiron.app": spec.app,
            "castiron.environment": spec.environment,
            "castiron.release": spec.release,
            "castiron.image": spec.image.digest,
            "castiron.runtime": self.name,
            "castiron.command": json.dumps(list(spec.command)),
            "castiron.workdir": spec.workdir,
            "castiron.isolation": isolation,
            "castiron.user": spec.user or "",
        }
        request = SpawnRequest(
            id=spec.id,
            environment=spec.environment,
            release=spec.release,
            argv=tuple(argv),
            env=env,
            cwd=cwd,
            sandbox=prefix,
            app=spec.app,
            address=address,
            labels=labels,
            public_env=tuple(sorted(k for k in env if k not in spec.secret_names)),
            secret_env=tuple(sorted(k for k in env if k in spec.secret_names)),
            instance_dir=str(instance_dir),
            instance_subdirs=subdirs,
            replace=self.replace_on_exit,
            health=spec.health,
            memory_bytes=memory_bytes,
            cpus=spec.cpus,
        )
        try:
            record = self.agent.spawn(request)
        except CastironError as exc:
            raise RuntimeDriverError(f"{where}: {exc}") from exc
        told = self._limits_told
        if record.limits.startswith("not enforced") and self.notice is not None and not told:
            self._limits_told = True
            self.notice(
                f"{spec.environment}: the limits declared ({_limits_text(spec)}) are "
                f"{record.limits}"
            )
        return self._instance(record)

    def destroy(self, instance: Instance, grace: float) -> None:
        """Stop ``instance`` through the agent (SIGTERM, SIGKILL after ``grace`` s).

        An instance the agent no longer knows is already gone: not an error.

        Raises:
            RuntimeDriverError: when the agent cannot be reached.
        """
        try:
            self.agent.stop_instance(instance.id, grace)
        except NotFoundError:
            return
        except AgentError as exc:
            raise RuntimeDriverError(
                f"{instance.environment}/{instance.id}: cannot stop: {exc}"
            ) from exc

    def observe(self, app: str, environment: str) -> list[Observed]:
        """Every instance the agent knows for ``environment`` of ``app`` (exited ones too);
        records without castiron's full label set are strays.

        Raises:
            RuntimeDriverError: when the agent cannot be reached.
        """
        try:
            records = self.agent.instances(environment)
        except AgentError as exc:
            raise RuntimeDriverError(f"{environment}: cannot list instances: {exc}") from exc
        return [
            self._observed(r)
            for r in records
            if r.environment == environment and (r.labels.get("castiron.app", r.app) or app) == app
        ]

    def inspect(self, instance: Instance) -> Observed:
        """What runs for ``instance``: state, image, config (``missing`` when gone).

        Raises:
            RuntimeDriverError: when the agent cannot be reached.
        """
        try:
            record = self.agent.instance(instance.id)
        except NotFoundError:
            return Observed(instance=instance, state="missing", image=None)
        except AgentError as exc:
            raise RuntimeDriverError(
                f"{instance.environment}/{instance.id}: cannot inspect: {exc}"
            ) from exc
        return self._observed(record)

    # -- internals

    def _isolation(self, spec: InstanceSpec, where: str) -> str:
        if spec.isolation == "none":
            return "none"
        reason = self._sandbox_problem()
        if reason is None:
            return "sandbox"
        if spec.isolation == "sandbox":
            raise RuntimeDriverError(f"{where}: isolation sandbox: {reason}; {_SANDBOX_FIX}")
        return "none"

    def _sandbox_problem(self) -> str | None:
        bwrap = self.sandbox.bwrap
        if bwrap is None:
            return "bubblewrap (bwrap) is not installed"
        if bwrap not in self._probe:
            self._probe[bwrap] = probe_bwrap(bwrap)
        return self._probe[bwrap]

    def _bwrap_argv(
        self, spec: InstanceSpec, rootfs: Path, instance_dir: Path, where: str
    ) -> tuple[str, ...]:
        assert self.sandbox.bwrap is not None
        argv: list[str] = [self.sandbox.bwrap]
        based = any(os.path.lexists(rootfs / d) for d in ("bin", "usr"))
        if based:
            argv += ["--ro-bind", str(rootfs), "/"]
            bound = {"/"}
        else:
            bound = set()
            for host_dir in HOST_DIRS:
                if os.path.islink(host_dir):
                    argv += ["--symlink", os.readlink(host_dir), host_dir]
                elif os.path.isdir(host_dir):
                    argv += ["--ro-bind", host_dir, host_dir]
                    bound.add(host_dir)
            for entry in sorted(os.listdir(rootfs)):
                target = "/" + entry
                if target in HOST_DIRS or entry in ("proc", "dev", "tmp"):
                    continue
                source = rootfs / entry
                if source.is_symlink():
                    argv += ["--symlink", os.readlink(source), target]
                else:
                    argv += ["--ro-bind", str(source), target]
                    bound.add(target)
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        argv += ["--unshare-pid", "--unshare-ipc", "--chdir", spec.workdir]
        for i, path in enumerate(spec.writable):
            under = max((b for b in bound if _is_under(path, b)), key=len, default=None)
            if under is not None:
                on_host = not based and under in HOST_DIRS
                source = Path(path) if on_host else rootfs / path.lstrip("/")
                if not source.is_dir():
                    raise RuntimeDriverError(
                        f"{where}: writable path {path} must exist as a directory in the "
                        "image (the image is mounted read-only)"
                    )
            argv += ["--bind", str(instance_dir / f"w{i}"), path]
        return (*argv, "--")

    def _instance(self, record: InstanceRecord) -> Instance:
        labels = record.labels
        return Instance(
            id=record.id,
            app=labels.get("castiron.app", record.app),
            environment=record.environment,
            release=ReleaseId(record.release),
            runtime=self.name,
            address=record.address,
            handle=record.handle,
            image=Digest(labels.get("castiron.image", "")),
        )

    def _observed(self, record: InstanceRecord) -> Observed:
        labels = record.labels
        state: InstanceState = "running" if record.state == "running" else "exited"
        secret_names = sorted(set(record.env_names) - set(record.env_values))
        try:
            command = json.loads(labels.get("castiron.command", "null"))
        except ValueError:
            command = None
        try:
            port: int | None = Address.parse(record.address).port
        except ValueError:
            port = None
        config: dict[str, object] = {
            "env": dict(record.env_values),
            "secrets": secret_names,
            "command": command if isinstance(command, list) else list(record.argv),
            "port": port,
            "user": labels.get("castiron.user") or None,
            "workdir": labels.get("castiron.workdir"),
            "isolation": labels.get("castiron.isolation"),
            "labels": dict(labels),
            "pid": record.pid,
        }
        if record.replaces:
            config["replaces"] = record.replaces
        image = labels.get("castiron.image")
        return Observed(
            instance=self._instance(record),
            state=state,
            image=Digest(image) if image else None,
            config=config,
            stray=any(not labels.get(name) for name in LABELS),
            exit_code=record.exit_code,
        )


def _limits_text(spec: InstanceSpec) -> str:
    parts = [f"memory {spec.memory}"] if spec.memory is not None else []
    if spec.cpus is not None:
        parts.append(f"cpus {spec.cpus:g}")
    return ", ".join(parts)


def _is_under(path: str, base: str) -> bool:
    return base == "/" or path == base or path.startswith(base.rstrip("/") + "/")


def _host_command(command: tuple[str, ...], rootfs: Path) -> tuple[str, ...]:
    """Without a sandbox, an absolute command that the image holds runs from the image."""
    if command and command[0].startswith("/"):
        inside = rootfs / command[0].lstrip("/")
        if inside.is_file():
            return (str(inside), *command[1:])
    return command


__all__ = [
    "DEFAULT_PATH",
    "LABELS",
    "LocalDriver",
    "SandboxPolicy",
    "find_bwrap",
    "probe_bwrap",
]
