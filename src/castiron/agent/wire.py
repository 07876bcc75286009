"""The control API's wire: its values and their strict JSON codec.

Owns the values that travel between the agent and its callers (:class:`SpawnRequest`,
:class:`InstanceRecord`, :class:`DriftWatch`, :class:`AgentEvent`, :class:`AgentStatus`),
the API's version prefix, and the strict codec (:func:`from_json`, :func:`to_json`) that
checks every field of an answer or a request body and names the bad one.

It sits at the bottom of the agent: it imports only :mod:`castiron.model`,
:mod:`castiron.values`, :mod:`castiron.errors` and the standard library, and knows nothing
of sockets, processes or the daemon.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal, TypeVar

from castiron.errors import UsageError
from castiron.model import HealthCheck
from castiron.values import value

API_VERSION = "v1"
"""The path prefix of every control API endpoint."""

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


def instance_event(
    kind: EventKind,
    record: InstanceRecord,
    at: float,
    *,
    detail: str = "",
    replaced_by: str = "",
) -> AgentEvent:
    """An event about the instance ``record`` (the event log numbers it when recorded)."""
    return AgentEvent(
        seq=0,
        at=at,
        kind=kind,
        instance=record.id,
        environment=record.environment,
        release=record.release,
        pid=record.pid,
        exit_code=record.exit_code,
        detail=detail,
        replaced_by=replaced_by,
    )


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


__all__ = [
    "API_VERSION",
    "AgentEvent",
    "AgentStatus",
    "DriftWatch",
    "EventKind",
    "InstanceRecord",
    "InstanceStateName",
    "SpawnRequest",
    "from_json",
    "instance_event",
    "to_json",
]
