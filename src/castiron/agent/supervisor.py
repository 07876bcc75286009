"""Supervises local instance processes: starts, watches, stops; never restarts in place.

Owns the instance records (``agent/instances.json``, written atomically), process start and
stop, exit detection, re-adoption after an agent restart, and the instances' log files.

Design choices that let instances outlive the agent (even a SIGKILL of it):

* every instance runs in its own session (``start_new_session``), so signals to the agent's
  process group never reach it;
* its stdout and stderr go straight to ``<log_dir>/<id>.log``, opened ``O_APPEND`` — no pipe
  through the agent that would die with it. The agent rotates the file by *copy-truncate*
  (``.1`` … ``.N``); lines written between the copy and the truncate (microseconds) can be lost;
* a record holds the pid and the process start time (``/proc/<pid>/stat`` field 22). A new
  agent adopts a record only if that pid is alive *and* has the same start time; otherwise
  the instance is recorded as exited (``instance-lost``);
* exits are seen through ``os.pidfd_open`` on the event loop (polling where pidfds are not
  available); the exit status is known only for the agent's own children;
* an instance *is its session*: stopping signals every process of the session (for a
  sandboxed instance every one but the sandbox launcher, which would die at once and leave
  the sandbox orphaned), and once the session leader has exited, whatever is left of the
  session is killed, so an instance never leaves stray processes behind.

The supervisor emits events to a callback and decides no policy: replacing an exited instance
is the daemon's job (it is told through ``on_exit``). It must not know routers, images,
drivers, the spec or the state store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from castiron.agent import cgroups
from castiron.agent.lifecycle import minimal_environ
from castiron.agent.wire import (
    AgentEvent,
    EventKind,
    InstanceRecord,
    SpawnRequest,
    from_json,
    instance_event,
    to_json,
)
from castiron.errors import AgentError, NotFoundError, UsageError
from castiron.filemodes import make_private_dir, open_private
from castiron.model import is_name

log = logging.getLogger("castiron.agent.supervisor")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_RECORDS_VERSION = 1
_POLL_INTERVAL = 0.25


@dataclass(frozen=True)
class LogPolicy:
    """Size cap and rotation of instance log files."""

    max_bytes: int = 10 * 1024 * 1024
    """Rotate a log once it reaches this size."""
    backups: int = 3
    """How many rotated files (``.1`` newest … ``.N`` oldest) to keep."""


def process_start_time(pid: int, *, zombie_ok: bool = False) -> int | None:
    """Start time (clock ticks since boot) of a live process ``pid``; None if gone or a zombie
    (unless ``zombie_ok``: our own unreaped child still owns its pid)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    if not rest or rest[0] == b"X" or (rest[0] == b"Z" and not zombie_ok):
        return None
    return int(rest[19])


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``sid``, sorted by pid.

    A pid is never reused while it still names a session, so this is safe after the leader
    has exited.
    """
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2 :].split()
        if len(rest) > 3 and rest[0] not in (b"Z", b"X") and int(rest[3]) == sid:
            found.append(int(name))
    return sorted(found)


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file, fsync, rename), mode 0600.

    Raises:
        OSError: when the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = json.dumps(data, indent=1, sort_keys=True).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class _Watch:
    """How the supervisor learns of one running instance's exit."""

    pidfd: int | None
    popen: subprocess.Popen[bytes] | None
    exited: asyncio.Event


class Supervisor:
    """Runs instance processes for the agent; one per agent, used on its event loop.

    ``on_event`` receives every event (``seq`` 0: the caller numbers them); ``on_exit``
    receives the final record of every instance that exits by itself or is stopped.
    """

    def __init__(
        self,
        records_path: Path,
        default_log_dir: Path,
        *,
        on_event: Callable[[AgentEvent], None],
        on_exit: Callable[[InstanceRecord], None] | None = None,
        log_policy: LogPolicy = LogPolicy(),
        clock: Callable[[], float] = time.time,
        cgroup_host: Callable[[], cgroups.CgroupHost] = cgroups.find_host,
    ) -> None:
        self.records_path = records_path
        self._find_cgroups = cgroup_host
        self._cgroups: cgroups.CgroupHost | None = None
        self.default_log_dir = default_log_dir
        self.log_policy = log_policy
        self._on_event = on_event
        self._on_exit = on_exit
        self._clock = clock
        self._records: dict[str, InstanceRecord] = {}
        self._watches: dict[str, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._pumps: list[subprocess.Popen[bytes]] = []

    # -- life cycle

    async def open(self) -> None:
        """Load the records and adopt every instance whose process still runs.

        Raises:
            AgentError: when the records file is unreadable or invalid (it is left untouched).
        """
        self._loop = asyncio.get_running_loop()
        for record in self._load():
            self._records[record.id] = record
            if record.state != "running":
                continue
            pidfd = _pidfd_open(record.pid)
            if process_start_time(record.pid) != record.start_time:
                if pidfd is not None:
                    os.close(pidfd)
                if process_start_time(record.pid) is None:  # else the pid names another process
                    kill_session(record.pid)
                self._mark_exited(record.id, None, "instance-lost", "process gone while no agent")
                continue
            adopted = dataclasses.replace(record, adopted=True)
            self._records[record.id] = adopted
            self._watch(adopted, pidfd, None)
            self._emit("instance-adopted", adopted, detail=f"pid {record.pid}")
        self._save()

    async def close(self) -> None:
        """Stop watching. Running instances are left running: they outlive the agent."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for watch in self._watches.values():
            self._unwatch(watch)
            if watch.popen is not None and watch.popen.returncode is None:
                # Deliberately not waited for: it lives on in its own session.
                watch.popen.returncode = 0
        self._watches.clear()
        for pump in self._pumps:
            if pump.poll() is None:
                pump.returncode = 0  # lives on with its instance, like it
        self._pumps.clear()

    # -- queries

    def records(self, environment: str | None = None) -> list[InstanceRecord]:
        """Every record (of one environment when given), sorted by id."""
        return [
            r
            for _, r in sorted(self._records.items())
            if environment is None or r.environment == environment
        ]

    def get(self, instance_id: str) -> InstanceRecord:
        """The record of ``instance_id``.

        Raises:
            NotFoundError: when there is no such instance.
        """
        try:
            return self._records[instance_id]
        except KeyError:
            raise NotFoundError(f"no instance {instance_id!r}") from None

    # -- spawn and stop

    def spawn(self, request: SpawnRequest, *, replaces: str = "") -> InstanceRecord:
        """Start ``request.sandbox + request.argv`` in its own session, output to its log file.

        ``replaces`` names the exited instance this one replaces (recorded for observers).

        Raises:
            UsageError: when the request is invalid, the id is taken, or the command cannot be
                started (not found, not executable, bad working directory).
        """
        self._validate(request)
        log_dir = Path(request.log_dir) if request.log_dir else self.default_log_dir
        argv = [*request.sandbox, *request.argv]
        if request.instance_dir:
            try:
                base = Path(request.instance_dir)
                make_private_dir(base)
                for sub in request.instance_subdirs:
                    make_private_dir(base / sub)
            except OSError as exc:
                raise UsageError(
                    f"instance {request.id}: cannot create {request.instance_dir}: {exc}"
                ) from None
        try:
            make_private_dir(log_dir)
            log_path = log_dir / f"{request.id}.log"
            log_fd = open_private(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise UsageError(
                f"instance {request.id}: cannot open its log in {log_dir}: {exc}"
            ) from None
        secrets = [request.env[k] for k in request.secret_env if k in request.env]
        out_fd = err_fd = log_fd
        groups, limits_text = self._limit(request)
        try:
            if secrets:
                out_fd, err_fd = self._start_pump(request.id, log_fd, secrets)
            popen = subprocess.Popen(
                argv,
                env=dict(request.env),
                cwd=request.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out_fd,
                stderr=err_fd,
                start_new_session=True,
                close_fds=True,
                preexec_fn=cgroups.joiner(groups) if groups else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            cgroups.remove_groups(groups)
            raise UsageError(f"instance {request.id}: cannot start {argv[0]!r}: {exc}") from None
        finally:
            os.close(log_fd)
            if out_fd != log_fd:
                os.close(out_fd)
                os.close(err_fd)
        pidfd = _pidfd_open(popen.pid)
        start_time = process_start_time(popen.pid, zombie_ok=True)  # it may exit at once
        record = InstanceRecord(
            id=request.id,
            environment=request.environment,
            release=request.release,
            pid=popen.pid,
            start_time=start_time if start_time is not None else 0,
            argv=tuple(argv),
            env_names=tuple(sorted(request.env)),
            cwd=request.cwd,
            log_path=str(log_path),
            started_at=self._clock(),
            app=request.app,
            address=request.address,
            labels=dict(request.labels),
            env_values={k: request.env[k] for k in request.public_env if k in request.env},
            sandboxed=bool(request.sandbox),
            replaces=replaces,
            instance_dir=request.instance_dir,
            cgroups=groups,
            limits=limits_text,
        )
        self._records[record.id] = record
        self._save()
        self._emit("instance-started", record, detail=f"pid {popen.pid}")
        self._watch(record, pidfd, popen)
        return record

    def cgroup_host(self) -> cgroups.CgroupHost:
        """How this host enforces instance limits (found, and prepared, on first use)."""
        if self._cgroups is None:
            self._cgroups = cgroups.prepare(self._find_cgroups())
        return self._cgroups

    def _limit(self, request: SpawnRequest) -> tuple[tuple[str, ...], str]:
        """The groups enforcing ``request``'s limits, and how they are enforced (in words)."""
        limits = cgroups.Limits(request.memory_bytes, request.cpus)
        if not limits:
            return (), ""
        host = self.cgroup_host()
        why = host.cannot(limits)
        if why is None:
            try:
                groups = cgroups.create_groups(host, request.id, limits)
            except cgroups.CgroupError as exc:
                why = str(exc)
            else:
                return groups, f"{limits.describe()} (cgroup {host.version})"
        log.warning("instance %s: %s not enforced: %s", request.id, limits.describe(), why)
        return (), f"not enforced: {why}"

    async def stop(self, instance_id: str, grace: float = 10.0) -> InstanceRecord:
        """SIGTERM the instance's process group, SIGKILL it after ``grace`` s, forget it.

        Returns the last record (state ``exited``).

        Raises:
            NotFoundError: when there is no such instance.
        """
        record = self.get(instance_id)
        watch = self._watches.get(instance_id)
        if record.state == "running" and watch is not None:
            _signal_instance(record, signal.SIGTERM)
            try:
                await asyncio.wait_for(watch.exited.wait(), timeout=max(grace, 0.0))
            except TimeoutError:
                log.warning("instance %s did not stop in %.1fs: SIGKILL", instance_id, grace)
                _signal_group(record.pid, signal.SIGKILL)
                kill_session(record.pid)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.exited.wait(), timeout=10.0)
        final = self._records.get(instance_id, record)
        if final.state == "running":  # not seen to exit (should not happen): record it anyway
            final = dataclasses.replace(final, state="exited", exited_at=self._clock())
        self._records.pop(instance_id, None)
        self._save()
        if final.instance_dir:
            shutil.rmtree(final.instance_dir, ignore_errors=True)
        self._emit("instance-stopped", final, detail="stopped on request")
        return final

    # -- logs

    def _start_pump(self, instance_id: str, log_fd: int, secrets: list[str]) -> tuple[int, int]:
        """Start the log pump of an instance with secrets; returns the write ends of its two
        pipes (the instance's stdout and stderr, masked as separate streams).

        Raises:
            OSError: when the pipes or the pump cannot be made.
        """
        self._reap_pumps()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        values_read, values_write = os.pipe()
        kept = (out_read, err_read, values_read)
        try:
            pump = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "castiron.agent.logpump",
                    "--secrets-fd",
                    str(values_read),
                    "--source-fd",
                    str(out_read),
                    "--source-fd",
                    str(err_read),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=kept,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env=minimal_environ(os.environ),
            )
        except BaseException:
            for fd in (out_write, err_write, values_write):
                os.close(fd)
            raise
        finally:
            for fd in kept:
                os.close(fd)
        self._pumps.append(pump)
        with os.fdopen(values_write, "wb") as out:
            out.write(json.dumps(secrets).encode())
        log.debug("instance %s: log pump pid %d", instance_id, pump.pid)
        return out_write, err_write

    def _reap_pumps(self) -> None:
        self._pumps = [p for p in self._pumps if p.poll() is None]

    def log_path(self, instance_id: str) -> Path:
        """The current log file of ``instance_id``. Raises NotFoundError."""
        return Path(self.get(instance_id).log_path)

    def rotate_logs(self) -> list[Path]:
        """Copy-truncate every running instance's log that reached the size cap.

        Returns the rotated files. Errors are logged, never raised: rotation must not stop the
        agent.
        """
        self._reap_pumps()
        rotated: list[Path] = []
        for record in self._records.values():
            if record.state != "running":
                continue
            path = Path(record.log_path)
            try:
                if path.stat().st_size < self.log_policy.max_bytes:
                    continue
                rotate_file(path, self.log_policy.backups)
                rotated.append(path)
            except OSError as exc:
                log.warning("cannot rotate %s: %s", path, exc)
        return rotated

    # -- internals

    def _validate(self, request: SpawnRequest) -> None:
        if not _ID_RE.match(request.id):
            raise UsageError(
                f"body.id: {request.id!r} is not a valid instance id (letters, digits, '.', "
                "'_', '-'; at most 128)"
            )
        if request.id in self._records:
            raise UsageError(f"body.id: instance {request.id!r} already exists")
        if not is_name(request.environment):
            raise UsageError(f"body.environment: {request.environment!r} is not a valid name")
        if not request.argv or not request.argv[0]:
            raise UsageError("body.argv: must not be empty")
        if not os.path.isabs(request.cwd):
            raise UsageError(f"body.cwd: {request.cwd!r} must be an absolute path")
        if request.log_dir and not os.path.isabs(request.log_dir):
            raise UsageError(f"body.log_dir: {request.log_dir!r} must be an absolute path")
        for name in request.env:
            if not name or "=" in name:
                raise UsageError(f"body.env: {name!r} is not a valid variable name")

    def _watch(
        self,
        record: InstanceRecord,
        pidfd: int | None,
        popen: subprocess.Popen[bytes] | None,
    ) -> None:
        assert self._loop is not None, "Supervisor.open() was not awaited"
        watch = _Watch(pidfd=pidfd, popen=popen, exited=asyncio.Event())
        self._watches[record.id] = watch
        if pidfd is not None:
            self._loop.add_reader(pidfd, self._on_exited, record.id)
        elif self._poller is None:
            self._poller = self._loop.create_task(self._poll())

    def _unwatch(self, watch: _Watch) -> None:
        if watch.pidfd is not None:
            if self._loop is not None:
                self._loop.remove_reader(watch.pidfd)
            os.close(watch.pidfd)
            watch.pidfd = None

    def _on_exited(self, instance_id: str) -> None:
        watch = self._watches.pop(instance_id, None)
        if watch is None:
            return
        self._unwatch(watch)
        record = self._records.get(instance_id)
        if record is not None:
            # What the leader left behind (an orphaned sandbox, a background child). Before
            # reaping: the zombie still holds the pid, so the session id cannot be reused.
            kill_session(record.pid)
        code: int | None = None
        if watch.popen is not None:
            code = watch.popen.wait()
        detail = _describe(code)
        if record is not None and record.cgroups and cgroups.oom_kills(record.cgroups):
            detail += f"; out of memory: killed at its limit ({record.limits})"
        self._mark_exited(instance_id, code, "instance-exited", detail)
        watch.exited.set()

    async def _poll(self) -> None:
        # Fallback for kernels without pidfd: look at every watched process periodically.
        while True:
            await asyncio.sleep(_POLL_INTERVAL)
            for instance_id, watch in list(self._watches.items()):
                record = self._records.get(instance_id)
                if watch.pidfd is not None or record is None:
                    continue
                gone = (
                    watch.popen.poll() is not None
                    if watch.popen is not None
                    else process_start_time(record.pid) != record.start_time
                )
                if gone:
                    self._on_exited(instance_id)

    def _mark_exited(
        self, instance_id: str, code: int | None, kind: EventKind, detail: str
    ) -> None:
        record = self._records.get(instance_id)
        if record is None:
            return
        final = dataclasses.replace(record, state="exited", exit_code=code, exited_at=self._clock())
        cgroups.remove_groups(record.cgroups)
        self._records[instance_id] = final
        self._save()
        self._emit(kind, final, detail=detail)
        if self._on_exit is not None:
            self._on_exit(final)

    def _emit(self, kind: EventKind, record: InstanceRecord, *, detail: str = "") -> None:
        self._on_event(instance_event(kind, record, self._clock(), detail=detail))

    def _load(self) -> list[InstanceRecord]:
        try:
            raw = self.records_path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AgentError(f"{self.records_path}: cannot read: {exc}") from exc
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != _RECORDS_VERSION:
                raise UsageError(f"version: expected {_RECORDS_VERSION}")
            items = data.get("instances")
            if not isinstance(items, list):
                raise UsageError("instances: expected array")
            return [from_json(InstanceRecord, r, f"instances[{i}]") for i, r in enumerate(items)]
        except (ValueError, UsageError) as exc:
            raise AgentError(
                f"{self.records_path}: not a valid instance record file: {exc}"
            ) from exc

    def _save(self) -> None:
        try:
            write_json_atomic(
                self.records_path,
                {
                    "version": _RECORDS_VERSION,
                    "instances": [to_json(r) for _, r in sorted(self._records.items())],
                },
            )
        except OSError as exc:
            # Keep running: the in-memory records are right; the next save may succeed.
            log.error("cannot write %s: %s", self.records_path, exc)


def rotate_file(path: Path, backups: int) -> None:
    """Copy-truncate ``path``: shift ``.1``…``.N-1`` up, copy it to ``.1``, truncate it.

    The writer keeps its ``O_APPEND`` descriptor, so it goes on at the new end of the file.

    Raises:
        OSError: when a file cannot be copied or truncated.
    """
    if backups <= 0:
        os.truncate(path, 0)
        return
    for n in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.truncate(path, 0)


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError as exc:
        log.warning("cannot signal process group %d: %s", pid, exc)


def _signal_instance(record: InstanceRecord, sig: signal.Signals) -> None:
    """Ask an instance to stop: its process group, and every process of its session.

    For a sandboxed instance the launcher (the session leader) is spared: it exits by itself,
    with the sandboxed command's status, once the sandbox is empty.
    """
    members = [p for p in session_members(record.pid) if p != record.pid]
    if not record.sandboxed or not members:
        _signal_group(record.pid, sig)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_session(sid: int) -> None:
    """SIGKILL every live process of session ``sid`` (nothing when there is none)."""
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _describe(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: adopted process)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


__all__ = [
    "LogPolicy",
    "Supervisor",
    "kill_session",
    "process_start_time",
    "rotate_file",
    "session_members",
    "write_json_atomic",
]
