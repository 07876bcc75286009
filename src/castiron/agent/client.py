"""Client of the agent's control API over its Unix socket; the only way in for other layers.

Owns the control API's wire values (:class:`SpawnRequest`, :class:`InstanceRecord`,
:class:`AgentEvent`, :class:`AgentStatus`), their strict JSON codec (:func:`from_json`,
:func:`to_json`), the typed :class:`AgentClient`, and the life cycle helpers that find, start
and stop the agent of a ``CASTIRON_HOME`` (:func:`ensure_agent`, :func:`stop_agent`,
:func:`agent_pid`).

It sits low in the layers: it imports only :mod:`castiron.model`, :mod:`castiron.settings`,
:mod:`castiron.errors` and the standard library. It must not know the routers, the supervisor
or the daemon's internals; route configurations travel as JSON objects (a dataclass such as
``castiron.traffic.base.RouteConfig`` is turned into one by :func:`to_json`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

from castiron.errors import AgentError, AgentRefusedError, NotFoundError, UsageError
from castiron.filemodes import make_private_dir
from castiron.model import HealthCheck
from castiron.settings import Settings
from castiron.values import value

API_VERSION = "v1"
"""The path prefix of every control API endpoint."""

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
PID_NAME = "agent.pid"
LOG_NAME = "agent.log"

T = TypeVar("T")


# --- wire values ----------------------------------------------------------------------------------


@value
class SpawnRequest:
    """What the supervisor runs for one instance (``POST /v1/instances``).

    The supervisor runs exactly ``sandbox + argv`` with exactly ``env``; it decides nothing.
    ``env`` may hold resolved secrets: only its *names* are ever recorded.
    """

    id: str
    """Instance id, unique on the host: letters, digits, ``.``, ``_``, ``-`` (max 128)."""
    environment: str
    """The environment the instance serves."""
    release: str
    """The release id it runs."""
    argv: tuple[str, ...]
    """The command; ``argv[0]`` is looked up in ``env['PATH']`` when it has no slash."""
    env: Mapping[str, str] = field(default_factory=dict)
    """The whole process environment of the instance (nothing is inherited from the agent)."""
    cwd: str = "/"
    """Absolute working directory."""
    log_dir: str = ""
    """Absolute directory for ``<id>.log`` (stdout and stderr); empty: the agent's ``logs/``."""
    sandbox: tuple[str, ...] = ()
    """An argv prefix that isolates the command (e.g. a ``bwrap ...`` line); run as given."""
    app: str = ""
    """The app name, recorded for observers."""
    address: str = ""
    """``HOST:PORT`` where the instance will serve, recorded for observers."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Who the instance belongs to (app, environment, release, image, ...), recorded as given."""
    public_env: tuple[str, ...] = ()
    """Names in ``env`` whose *values* may be recorded (for drift detection); every other
    value is treated as a secret: kept in memory only, never written."""
    secret_env: tuple[str, ...] = ()
    """Names in ``env`` whose values are resolved secrets: the instance's output reaches its
    log through a pump that masks them (``***``), and the agent masks them in its own log and
    events."""
    instance_dir: str = ""
    """An absolute directory private to the instance, created (mode 0700) before it starts and
    removed when it is stopped; a replacement gets its own (see ``replace``)."""
    instance_subdirs: tuple[str, ...] = ()
    """Relative directories created inside ``instance_dir`` (bind sources, scratch space)."""
    replace: bool = False
    """When the process exits by itself, start a fresh instance of the same request (a new id
    and port; paths under ``instance_dir`` rebased to its own), with backoff, and swap it into
    the routes once healthy. Stopping the instance through the API never triggers this."""
    health: HealthCheck | None = None
    """The check a replacement must pass before it gets traffic (``tcp`` when absent)."""
    memory_bytes: int | None = None
    """Memory limit of the instance (cgroups; see :mod:`castiron.agent.cgroups`)."""
    cpus: float | None = None
    """CPU limit of the instance, in CPUs (cgroups)."""


InstanceStateName = Literal["running", "exited"]


@value
class InstanceRecord:
    """What the agent knows of one instance it supervises (never secret values)."""

    id: str
    environment: str
    release: str
    pid: int
    start_time: int
    """Process start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    argv: tuple[str, ...]
    """The full command run, sandbox prefix included."""
    env_names: tuple[str, ...]
    """Names of the environment variables given (values are never recorded)."""
    cwd: str
    log_path: str
    started_at: float
    """Wall-clock time of the spawn (seconds since the epoch)."""
    app: str = ""
    address: str = ""
    state: InstanceStateName = "running"
    exit_code: int | None = None
    """Exit status when known (only for a process the current agent started): ``-N`` means
    killed by signal ``N``. An adopted process's status cannot be read."""
    exited_at: float | None = None
    adopted: bool = False
    """True when the current agent took the instance over from a previous agent process."""
    labels: Mapping[str, str] = field(default_factory=dict)
    env_values: Mapping[str, str] = field(default_factory=dict)
    """Values of the request's ``public_env`` names only (never secrets)."""
    sandboxed: bool = False
    """True when started through a sandbox prefix: stop signals go to the sandboxed processes,
    not to the sandbox launcher (which would die at once and orphan them)."""
    replaces: str = ""
    """The id of the exited instance this one replaced (empty for a first instance)."""
    instance_dir: str = ""
    cgroups: tuple[str, ...] = ()
    """The control groups enforcing the instance's limits (removed when it exits)."""
    limits: str = ""
    """How its limits are enforced: ``memory 64 MiB (cgroup v1)``, ``not enforced: WHY``, or
    empty when it asked for none."""

    @property
    def handle(self) -> str:
        """``PID:STARTTIME``: identifies the process even after its pid is reused."""
        return f"{self.pid}:{self.start_time}"


EventKind = Literal[
    "agent-started",
    "agent-stopped",
    "instance-started",
    "instance-adopted",
    "instance-exited",
    "instance-lost",
    "instance-stopped",
    "instance-replaced",
    "instance-replace-failed",
    "instance-unreplaceable",
    "route-applied",
    "route-removed",
    "route-failed",
    "drift-found",
    "drift-fixed",
    "drift-check-failed",
]


@value
class DriftWatch:
    """A drift check the agent runs on a schedule (``PUT /v1/watches/<environment>``).

    The agent runs exactly ``argv`` in ``cwd`` with its own environment plus ``env`` every
    ``interval`` seconds, reads the one JSON object it prints, and records ``drift-found`` /
    ``drift-fixed`` events; the command writes the audit entries itself. ``env`` is persisted:
    it must hold no secret.
    """

    environment: str
    argv: tuple[str, ...]
    cwd: str = "/"
    interval: float = 60.0
    fix: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 600.0
    """Seconds one check may run before it is killed."""


@value
class AgentEvent:
    """One thing that happened on the host, numbered in order (``GET /v1/events?since=N``)."""

    seq: int
    at: float
    kind: EventKind
    instance: str = ""
    environment: str = ""
    release: str = ""
    pid: int | None = None
    exit_code: int | None = None
    detail: str = ""
    replaced_by: str = ""
    """For ``instance-replaced``: the id of the new instance (``instance`` is the old one)."""


@value
class AgentStatus:
    """The agent's own health and inventory (``GET /v1/status``)."""

    pid: int
    home: str
    version: str
    started_at: float
    uptime_s: float
    router: str
    routes: tuple[str, ...]
    """Environments with a listener."""
    instances: int
    running_instances: int
    adopted_instances: int
    inherited_listeners: tuple[str, ...]
    """Listen addresses taken over from the fd keeper at startup (kept across a restart)."""
    metrics: str | None
    """The Prometheus listener's address, when one runs."""
    last_event: int


# --- strict JSON codec ----------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _decode(tp: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _decode(arg, value, where)
            except UsageError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            choices = ", ".join(json.dumps(a) for a in args)
            raise UsageError(f"{where}: must be one of {choices}, got {json.dumps(value)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_json(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected boolean, got {_type_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: expected integer, got {_type_name(value)}")
        return value
    if tp is float:
        if value in _INFINITIES:
            return _INFINITIES[value]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{where}: expected number, got {_type_name(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{where}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{where}: expected string, got {_type_name(value)}")
        if "\x00" in value:
            raise UsageError(f"{where}: must not contain NUL")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise UsageError(f"{where}: expected array, got {_type_name(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UsageError(f"{where}: expected an array of {len(args)} items")
        return tuple(
            _decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected object, got {_type_name(value)}")
        key_tp, val_tp = args if args else (str, Any)
        return {
            _decode(key_tp, k, f"{where}"): _decode(val_tp, v, f"{where}.{k}")
            for k, v in value.items()
        }
    raise TypeError(f"cannot decode {tp!r}")  # a programming error, not bad input


def from_json(cls: type[T], data: object, where: str = "body") -> T:
    """Build the frozen dataclass ``cls`` from decoded JSON, strictly.

    Unknown fields, missing required fields and wrong types are refused; the message names the
    path of the bad value (``body.stable.backends[0].address: expected string, got integer``).
    Numbers must be finite, except the strings ``"Infinity"``/``"-Infinity"`` that
    :func:`to_json` writes for infinite floats.

    Raises:
        UsageError: when ``data`` does not fit ``cls``.
    """
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected object, got {_type_name(data)}")
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UsageError(f"{where}: missing field {name!r}")
            continue
        kwargs[name] = _decode(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def to_json(obj: object) -> dict[str, Any]:
    """The JSON object of a dataclass value (tuples become arrays, mappings objects).

    Raises:
        TypeError: when ``obj`` is not a dataclass instance.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"{obj!r} is not a dataclass instance")
    return _plain(dataclasses.asdict(obj))  # type: ignore[no-any-return]


_INFINITIES: dict[object, float] = {"Infinity": float("inf"), "-Infinity": float("-inf")}


def _plain(value: Any) -> Any:
    # Strict JSON has no infinities (histograms end in +Inf): they travel as strings.
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --- Unix socket HTTP -----------------------------------------------------------------------------


def unix_address(path: Path) -> tuple[str, int | None]:
    """A path ``bind``/``connect`` accept even beyond the 107-byte ``sun_path`` limit.

    Long paths go through ``/proc/self/fd/N/NAME`` of a directory fd; the caller closes the
    returned fd (``None`` for short paths) once the call is done.
    """
    text = os.fsdecode(path)
    if len(os.fsencode(text)) < 100:
        return text, None
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dir_fd}/{path.name}", dir_fd


def unix_connect(path: Path, timeout: float | None) -> socket.socket:
    """A stream socket connected to the Unix socket at ``path``.

    Raises:
        OSError: as ``connect`` does (``FileNotFoundError``, ``ConnectionRefusedError``, ...).
    """
    address, dir_fd = unix_address(path)  # may raise: no socket is open yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock


_MAX_HEAD = 64 * 1024


class _Response:
    """One HTTP/1.1 response read from a connected socket (the agent answers with
    ``Connection: close``: the body runs to ``Content-Length`` or, when streaming, to EOF)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the response head")
            buffer += chunk
            if len(buffer) > _MAX_HEAD:
                raise ConnectionError("response head too long")
        head, _, self._rest = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(f"bad status line {status_line[:80]!r}")
        self.status = int(parts[1])
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        length = self.headers.get("content-length")
        self.length = int(length) if length is not None and length.isdigit() else None

    def read(self) -> bytes:
        """The whole body."""
        data = bytearray(self._rest)
        self._rest = b""
        while self.length is None or len(data) < self.length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if self.length is not None:
            if len(data) < self.length:
                raise ConnectionError("body shorter than its Content-Length")
            del data[self.length :]
        return bytes(data)

    def read1(self, size: int) -> bytes:
        """The next piece of the body as it arrives (empty at its end)."""
        if self._rest:
            data, self._rest = self._rest, b""
            return data
        return self.sock.recv(size)


def _request_bytes(method: str, target: str, payload: bytes | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: castiron-agent", "Connection: close"]
    if payload is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    elif method in ("POST", "PUT"):
        lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b"")


class AgentClient:
    """Typed calls to one agent's control API (one HTTP/1.1 connection per call).

    Every method raises :class:`AgentError` when the agent cannot be reached or refuses the
    request (with the agent's reason), and :class:`NotFoundError` for an unknown instance or
    environment.
    """

    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- plumbing

    def _open(
        self, method: str, path: str, body: object | None = None, timeout: float | None = None
    ) -> _Response:
        # A plain HTTP/1.1 exchange over the socket: http.client would pull in ssl and email
        # (~25 ms of imports) for what is one request and one Connection: close response.
        payload = None if body is None else json.dumps(body).encode()
        target = f"/{API_VERSION}{path}"
        try:
            sock = unix_connect(self.socket_path, timeout or self.timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentError(f"agent not running at {self.socket_path}") from exc
        except OSError as exc:
            raise AgentError(f"agent at {self.socket_path} did not answer: {exc}") from exc
        try:
            sock.sendall(_request_bytes(method, target, payload))
            response = _Response(sock)
        except (OSError, ValueError) as exc:
            sock.close()
            raise AgentError(f"agent at {self.socket_path} did not answer: {exc}") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except OSError:
                raw = b""
            finally:
                sock.close()
            try:
                reason = str(json.loads(raw)["error"])
            except (ValueError, KeyError, TypeError):
                reason = raw.decode(errors="replace").strip() or response.reason
            if response.status == 404:
                raise NotFoundError(f"agent: {reason}")
            raise AgentRefusedError(f"agent refused {method} {target}: {reason}")
        return response

    def _call(
        self, method: str, path: str, body: object | None = None, timeout: float | None = None
    ) -> Any:
        response = self._open(method, path, body, timeout)
        try:
            raw = response.read()
        except OSError as exc:
            raise AgentError(f"agent at {self.socket_path} broke off: {exc}") from exc
        finally:
            response.sock.close()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise AgentError(f"agent at {self.socket_path} sent invalid JSON") from exc

    def _decode(self, cls: type[T], data: object) -> T:
        try:
            return from_json(cls, data, "response")
        except UsageError as exc:
            raise AgentError(
                f"agent at {self.socket_path} sent an unexpected answer: {exc}"
            ) from exc

    # -- agent

    def health(self) -> bool:
        """True when the agent answers ``GET /v1/health``."""
        try:
            return bool(self._call("GET", "/health", timeout=5.0).get("ok"))
        except AgentError:
            return False

    def status(self) -> AgentStatus:
        """The agent's status. Raises AgentError."""
        return self._decode(AgentStatus, self._call("GET", "/status"))

    def shutdown(self) -> None:
        """Ask the agent to stop gracefully (it answers first, then stops). Raises AgentError."""
        self._call("POST", "/shutdown", {})

    def events(self, since: int = 0) -> list[AgentEvent]:
        """Events with ``seq > since``, oldest first. Raises AgentError."""
        data = self._call("GET", f"/events?since={int(since)}")
        return [self._decode(AgentEvent, e) for e in data.get("events", [])]

    def set_metrics(self, listen: str | None) -> str | None:
        """Start (or move, or with ``None`` stop) the Prometheus listener; returns its address.

        Raises:
            AgentError: when the address is refused (not loopback, in use, ...).
        """
        data = self._call("PUT", "/metrics", {"listen": listen})
        value = data.get("listen")
        return str(value) if value is not None else None

    # -- routes

    def put_route(self, environment: str, config: object) -> None:
        """Apply a route configuration (a ``RouteConfig`` or its JSON object) atomically.

        Raises:
            AgentError: when the agent or its router refuses it.
        """
        body = config if isinstance(config, Mapping) else to_json(config)
        self._call("PUT", f"/routes/{_quote(environment)}", body)

    def flip_route(
        self,
        environment: str,
        config: object,
        *,
        expect: str | None,
        check: HealthCheck,
        env: Mapping[str, str],
    ) -> dict[str, Any]:
        """Switch to warm backends in one request (``POST /v1/routes/{env}/flip``): the agent
        checks that the route serves release ``expect`` (None: nothing), probes each backend of
        ``config``'s stable set once with ``check`` (``env`` is a command check's environment)
        and only then applies ``config``. Returns ``{"flipped": bool, "reason": str,
        "previous": route JSON or None}``; when ``flipped`` is false nothing changed.

        Raises:
            AgentError: when the agent cannot be reached or refuses the request.
        """
        body = {
            "route": config if isinstance(config, Mapping) else to_json(config),
            "expect": expect,
            "check": to_json(check),
            "env": dict(env),
        }
        data = self._call("POST", f"/routes/{_quote(environment)}/flip", body)
        if not isinstance(data, dict) or not isinstance(data.get("flipped"), bool):
            raise AgentError(f"agent at {self.socket_path} sent an unexpected flip answer")
        return data

    def route(self, environment: str) -> dict[str, Any]:
        """The environment's route configuration as JSON. Raises NotFoundError, AgentError."""
        return dict(self._call("GET", f"/routes/{_quote(environment)}"))

    def routes(self) -> dict[str, dict[str, Any]]:
        """Every route configuration by environment. Raises AgentError."""
        return dict(self._call("GET", "/routes").get("routes", {}))

    def delete_route(self, environment: str) -> None:
        """Drain and close the environment's listener. Raises NotFoundError, AgentError."""
        self._call("DELETE", f"/routes/{_quote(environment)}")

    def route_counters(self, environment: str) -> list[dict[str, Any]]:
        """Per-release counters (``ReleaseCounters`` as JSON). Raises NotFoundError, AgentError."""
        return list(self._call("GET", f"/routes/{_quote(environment)}/counters")["counters"])

    # -- drift watches

    def put_watch(self, watch: DriftWatch) -> None:
        """Register (or replace) the drift check of ``watch.environment``. Raises AgentError."""
        self._call("PUT", f"/watches/{_quote(watch.environment)}", to_json(watch))

    def delete_watch(self, environment: str) -> None:
        """Stop the drift check of ``environment``. Raises NotFoundError, AgentError."""
        self._call("DELETE", f"/watches/{_quote(environment)}")

    def watches(self) -> list[DriftWatch]:
        """Every registered drift check. Raises AgentError."""
        data = self._call("GET", "/watches").get("watches", [])
        return [self._decode(DriftWatch, w) for w in data]

    # -- instances

    def spawn(self, request: SpawnRequest) -> InstanceRecord:
        """Start an instance process. Raises AgentError (with the reason it could not start)."""
        return self._decode(InstanceRecord, self._call("POST", "/instances", to_json(request)))

    def instances(self, environment: str | None = None) -> list[InstanceRecord]:
        """Every supervised instance (of one environment when given). Raises AgentError."""
        query = f"?environment={_quote(environment)}" if environment else ""
        data = self._call("GET", f"/instances{query}")
        return [self._decode(InstanceRecord, r) for r in data.get("instances", [])]

    def instance(self, instance_id: str) -> InstanceRecord:
        """One instance's record. Raises NotFoundError, AgentError."""
        return self._decode(InstanceRecord, self._call("GET", f"/instances/{_quote(instance_id)}"))

    def stop_instance(self, instance_id: str, grace: float = 10.0) -> InstanceRecord:
        """SIGTERM the instance, SIGKILL it after ``grace`` s, forget it; returns its last record.

        Raises:
            NotFoundError: when the agent does not know the instance.
            AgentError: when the agent cannot be reached.
        """
        data = self._call(
            "DELETE",
            f"/instances/{_quote(instance_id)}?grace={float(grace)}",
            timeout=self.timeout + grace,
        )
        return self._decode(InstanceRecord, data)

    def instance_logs(self, instance_id: str, lines: int = 100) -> str:
        """The last ``lines`` lines of the instance's output. Raises NotFoundError, AgentError."""
        data = self._call("GET", f"/instances/{_quote(instance_id)}/logs?lines={int(lines)}")
        return str(data["text"])

    def follow_instance_logs(self, instance_id: str, lines: int = 10) -> Iterator[bytes]:
        """The last ``lines`` lines, then new output as it comes, until the instance exits.

        Raises:
            NotFoundError, AgentError: as :meth:`instance_logs`.
        """
        response = self._open(
            "GET", f"/instances/{_quote(instance_id)}/logs?lines={int(lines)}&follow=1"
        )
        response.sock.settimeout(None)
        try:
            while chunk := response.read1(65536):
                yield chunk
        except OSError as exc:
            raise AgentError(f"agent at {self.socket_path} broke off: {exc}") from exc
        finally:
            response.sock.close()


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


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
    "API_VERSION",
    "LOCK_NAME",
    "LOG_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "AgentClient",
    "AgentEvent",
    "AgentStatus",
    "DriftWatch",
    "EventKind",
    "InstanceRecord",
    "InstanceStateName",
    "SpawnRequest",
    "agent_pid",
    "daemon_argv",
    "ensure_agent",
    "from_json",
    "minimal_environ",
    "socket_path",
    "start_agent",
    "stop_agent",
    "to_json",
    "unix_address",
    "unix_connect",
]
