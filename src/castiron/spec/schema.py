"""The spec's schema: frozen pydantic models for every section of ``castiron.yaml``.

Owns field names, defaults and value rules (names, durations, ports, listen addresses). It must
not read files or the environment (that is :mod:`castiron.spec.load`) and knows no runtime.
Keys starting with ``x-`` are stripped by the loader before validation and kept in
:attr:`Spec.extensions`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_duration(value: object) -> float:
    """Parse ``500ms``, ``30s``, ``10m``, ``1h`` (or a bare number of seconds) into seconds.

    Raises:
        ValueError: for anything else, or a negative value.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 500ms, 30s or 10m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value.strip())
        if not m:
            raise ValueError(f"{value!r} is not a duration; use e.g. 500ms, 30s, 10m or 1h")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("must be a duration such as 500ms, 30s or 10m")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("must be a finite, non-negative duration")
    return seconds


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return value


def parse_listen(value: object) -> str:
    """Validate a listen address ``HOST:PORT`` (``[v6]:PORT`` for IPv6) and normalise it.

    Raises:
        ValueError: when the host is not an IP address or ``localhost``, or the port is bad.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"127.0.0.1:{value}"
    if not isinstance(value, str):
        raise ValueError("must be an address such as 127.0.0.1:8080")
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    if host.startswith("[") and host.endswith("]"):
        host_ip = host[1:-1]
        try:
            if ipaddress.ip_address(host_ip).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif host != "localhost":
        try:
            if ipaddress.ip_address(host).version != 4:
                raise ValueError(f"write IPv6 hosts in brackets: [{host}]:{port_s}")
        except ValueError as exc:
            if "brackets" in str(exc):
                raise
            raise ValueError(f"{host!r} is not an IP address or 'localhost'") from None
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"port {port_s!r} must be a number from 1 to 65535")
    return f"{host}:{int(port_s)}"


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _check_env(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _ENV_KEY_RE.match(key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
    return value


def _stringify_scalar(value: object) -> object:
    # YAML turns `LOG_LEVEL: 1` into an int; env values are strings, so accept scalars.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _stringify_env(value: object) -> object:
    if isinstance(value, dict):
        return {k: _stringify_scalar(v) for k, v in value.items()}
    return value


Name = Annotated[str, AfterValidator(_check_name)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Port = Annotated[int, Field(strict=True), AfterValidator(_check_port)]
Listen = Annotated[str, BeforeValidator(parse_listen)]
EnvMap = Annotated[dict[str, str], BeforeValidator(_stringify_env), AfterValidator(_check_env)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ImageSection(_Section):
    """How to bake the app's image (``image:``)."""

    base: str = "scratch"
    context: str = "."
    workdir: str = "/app"
    exclude: tuple[str, ...] = ()
    build: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: EnvMap = Field(default_factory=dict)
    user: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    dockerfile: str | None = None
    allow_secrets: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_workdir(self) -> ImageSection:
        if not self.workdir.startswith("/"):
            raise ValueError("workdir must be an absolute path inside the image")
        return self


class HealthCheck(_Section):
    """How to tell that an instance is ready for traffic (``service.health``)."""

    http: str | None = None
    tcp: bool = False
    command: tuple[str, ...] | None = None
    interval: Duration = 1.0
    timeout: Duration = 2.0
    healthy_after: int = Field(default=1, ge=1, le=100)
    start_period: Duration = 30.0

    @model_validator(mode="after")
    def _one_probe(self) -> HealthCheck:
        kinds = [
            k for k, on in (("http", self.http), ("tcp", self.tcp), ("command", self.command)) if on
        ]
        if len(kinds) > 1:
            raise ValueError(f"choose one of http, tcp or command (got {', '.join(kinds)})")
        if self.http is not None and not self.http.startswith("/"):
            raise ValueError("http must be a path starting with '/'")
        return self


class SecretRef(_Section):
    """Where a secret comes from at deploy time; the value itself never enters the spec."""

    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env or file")
        return self


class Service(_Section):
    """How instances run (``service:``); environments may override some fields."""

    port: Port = 8000
    health: HealthCheck = Field(default_factory=HealthCheck)
    replicas: int = Field(default=1, ge=1, le=1000)
    env: EnvMap = Field(default_factory=dict)
    secrets: dict[str, SecretRef] = Field(default_factory=dict)
    writable: tuple[str, ...] = ()
    memory: str | None = None
    cpus: float | None = Field(default=None, gt=0)


class CanaryStep(_Section):
    """One canary step: send ``weight`` percent to the new release, then wait."""

    weight: int = Field(ge=0, le=100)
    pause: Duration | Literal["manual"] = 60.0


class Analysis(_Section):
    """What a canary step must show before it may go on."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    min_requests: int = Field(default=20, ge=0)


class Strategy(_Section):
    """How a deployment moves traffic (``strategy:``)."""

    type: Literal["blue-green", "rolling", "canary"] = "blue-green"
    batch: int = Field(default=1, ge=1)
    steps: tuple[CanaryStep, ...] = ()
    analysis: Analysis | None = None


class Policy(_Section):
    """Gates a deployment must pass (``policy:``)."""

    soak: Duration | None = None
    require_signature: bool | tuple[str, ...] = False
    checks: tuple[tuple[str, ...], ...] = ()
    approvals: int = Field(default=0, ge=0)


class Environment(_Section):
    """A named deployment target (``environments.<name>``)."""

    runtime: Literal["local", "docker", "kubernetes"] = "local"
    listen: Listen
    replicas: int | None = Field(default=None, ge=1, le=1000)
    env: EnvMap = Field(default_factory=dict)
    strategy: Strategy = Field(default_factory=Strategy)
    promote_from: Name | None = None
    policy: Policy = Field(default_factory=Policy)
    router: Literal["builtin", "haproxy"] = "builtin"
    isolation: Literal["auto", "sandbox", "none"] = "auto"
    network: str = "host"
    metrics: Listen | None = None
    drain_timeout: Duration = 30.0
    keep_warm: Duration = 600.0
    deploy_timeout: Duration = 60.0


class Spec(_Section):
    """The whole of ``castiron.yaml``."""

    app: Name
    image: ImageSection = Field(default_factory=ImageSection)
    service: Service = Field(default_factory=Service)
    environments: dict[Name, Environment] = Field(default_factory=dict)
    extensions: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _check_references(self) -> Spec:
        for name, env in self.environments.items():
            if env.promote_from is not None and env.promote_from not in self.environments:
                raise ValueError(
                    f"environments.{name}.promote_from: no environment named {env.promote_from!r}"
                )
        return self


__all__ = [
    "Analysis",
    "CanaryStep",
    "Duration",
    "Environment",
    "HealthCheck",
    "ImageSection",
    "Listen",
    "Name",
    "Policy",
    "SecretRef",
    "Service",
    "Spec",
    "Strategy",
    "parse_duration",
    "parse_listen",
]
