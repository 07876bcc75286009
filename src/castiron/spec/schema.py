"""The spec's schema: frozen pydantic models for every section of ``castiron.yaml``.

Owns field names, defaults and value rules (names, durations, ports, listen addresses). It must
not read files or the environment (that is :mod:`castiron.spec.load`) and knows no runtime.
Keys starting with ``x-`` are stripped by the loader before validation and kept in
:attr:`Spec.extensions`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from castiron.model import Address

NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
_NAME_RE = re.compile(NAME_PATTERN)
DURATION_PATTERN = r"^(\d+(?:\.\d+)?)(ms|s|m|h)$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_ENV_KEY_RE = re.compile(ENV_NAME_PATTERN)


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


SIZE_PATTERN = r"^(\d+)(B|KiB|MiB|GiB)?$"
_SIZE_RE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(value: object) -> int:
    """Parse ``512KiB``, ``10MiB``, ``1GiB`` (or a bare number of bytes) into bytes.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512KiB, 10MiB or 1GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2) or "B"]
        raise ValueError(f"{value!r} is not a size; use e.g. 512KiB, 10MiB or 1GiB")
    raise ValueError("must be a size such as 512KiB, 10MiB or 1GiB")


def _router_from_text(value: object) -> object:
    # ``router: haproxy`` is short for ``router: {type: haproxy}``
    return {"type": value} if isinstance(value, str) else value


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return value


def parse_listen(value: object) -> str:
    """Validate a listen address ``HOST:PORT`` (``[v6]:PORT`` for IPv6) and normalise it
    (see :meth:`castiron.model.Address.parse_listen`).

    Raises:
        ValueError: when the host is not an IP address or ``localhost``, or the port is bad.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"127.0.0.1:{value}"
    if not isinstance(value, str):
        raise ValueError("must be an address such as 127.0.0.1:8080")
    return str(Address.parse_listen(value))


def _port_from_text(value: object) -> object:
    # A quoted `"${PORT}"` arrives as text; digits are a port, anything else stays an error.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return value


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_KEY_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid environment variable name: use letters, digits and '_', "
            "not starting with a digit"
        )
    return value


def _check_pause(value: object) -> object:
    if value == "manual":
        return value
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError("must be a duration such as 30s or 5m, or 'manual'") from None


def _check_require_signature(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("must be true, false or a list of key names")


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


_DURATION_JSON: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": DURATION_PATTERN},
        {"type": "number", "minimum": 0},
    ],
    "description": "A duration: 500ms, 30s, 10m, 1h, or a number of seconds.",
}
_LISTEN_JSON: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[0-9.]+|localhost):[0-9]{1,5}$"},
        {"type": "integer", "minimum": 1, "maximum": 65535},
    ],
    "description": "HOST:PORT ([v6]:PORT for IPv6); a bare port means 127.0.0.1:PORT.",
}
_ENV_JSON: dict[str, Any] = {
    "type": "object",
    "propertyNames": {"pattern": ENV_NAME_PATTERN},
    "additionalProperties": {"type": ["string", "number", "boolean"]},
}

Name = Annotated[
    str, AfterValidator(_check_name), WithJsonSchema({"type": "string", "pattern": NAME_PATTERN})
]
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_JSON)]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": SIZE_PATTERN},
                {"type": "integer", "minimum": 0},
            ],
            "description": "bytes, or a size such as 512KiB, 10MiB or 1GiB",
        }
    ),
]
Port = Annotated[
    int, Field(strict=True), BeforeValidator(_port_from_text), AfterValidator(_check_port)
]
Listen = Annotated[str, BeforeValidator(parse_listen), WithJsonSchema(_LISTEN_JSON)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
EnvMap = Annotated[dict[EnvName, str], BeforeValidator(_stringify_env), WithJsonSchema(_ENV_JSON)]


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True
    )


class ImageSection(_Section):
    """How to bake the app's image (``image:``)."""

    base: str = "scratch"
    """The base: scratch, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, docker:REF, or a
    registry reference (host[:port]/repo[:tag] or @sha256:…, pulled and pinned by digest)."""
    context: str = "."
    """The directory copied into the image, relative to the spec file."""
    workdir: str = "/app"
    """Where the context lands inside the image (an absolute path); the working directory."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of context files to leave out (e.g. .git, **/__pycache__)."""
    build: tuple[str, ...] = ()
    """Shell commands run on the host in a clean temporary copy of the context before packing."""
    layers: tuple[str, ...] = ()
    """Glob patterns split into their own layer, first, for cache-friendly rebuilds."""
    entrypoint: tuple[str, ...] = ()
    """The command an instance runs, as a list of arguments."""
    cmd: tuple[str, ...] = ()
    """Default arguments appended to the entrypoint."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables baked into the image (never secrets)."""
    user: str | None = None
    """The user (name or UID[:GID]) instances run as."""
    labels: dict[str, str] = Field(default_factory=dict)
    """OCI labels added to the image configuration."""
    dockerfile: str | None = None
    """Build with the Docker engine from this Dockerfile instead, then import the result."""
    allow_secrets: tuple[str, ...] = ()
    """Context paths that look like secrets but are allowed into the image on purpose."""

    @field_validator("workdir")
    @classmethod
    def _check_workdir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path inside the image (starting with '/')")
        return value


class HealthCheck(_Section):
    """How to tell that an instance is ready for traffic (``service.health``)."""

    http: str | None = None
    """Probe with an HTTP GET of this path; any 2xx or 3xx answer is healthy."""
    tcp: bool = False
    """Probe by opening a TCP connection to the instance's port."""
    command: tuple[str, ...] | None = None
    """Probe by running this command; exit status 0 is healthy."""
    interval: Duration = 1.0
    """Time between probes."""
    timeout: Duration = 2.0
    """How long one probe may take."""
    healthy_after: int = Field(default=1, ge=1, le=100)
    """Consecutive successful probes before an instance takes traffic."""
    start_period: Duration = 30.0
    """How long a new instance may take to become healthy."""

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with '/'")
        return value

    @model_validator(mode="after")
    def _one_probe(self) -> HealthCheck:
        kinds = [
            k for k, on in (("http", self.http), ("tcp", self.tcp), ("command", self.command)) if on
        ]
        if len(kinds) > 1:
            raise ValueError(f"choose one of http, tcp or command (got {', '.join(kinds)})")
        return self


class SecretRef(_Section):
    """Where a secret comes from at deploy time; the value itself never enters the spec."""

    env: str | None = None
    """Read the value from this variable of the deploying process's environment."""
    file: str | None = None
    """Read the value from this file (relative to the spec file) at deploy time."""
    tf: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    """Read the value from this output of the Terraform outputs file (``terraform.outputs``)
    at deploy time; the way to use a sensitive output."""

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if sum(source is not None for source in (self.env, self.file, self.tf)) != 1:
            raise ValueError("give exactly one of env, file or tf")
        return self


class TerraformSection(_Section):
    """Where ``${tf:NAME}`` and ``{tf: NAME}`` secrets read Terraform outputs (``terraform:``)."""

    outputs: str = Field(min_length=1)
    """A Terraform state file (e.g. ``terraform.tfstate``) or the output of
    ``terraform output -json``, relative to the spec file."""


class Service(_Section):
    """How instances run (``service:``); environments may override some fields."""

    port: Port = 8000
    """The port the app listens on; it is passed to the app as $PORT."""
    health: HealthCheck = Field(default_factory=HealthCheck)
    """How to tell that an instance is ready for traffic."""
    replicas: int = Field(default=1, ge=1, le=1000)
    """Instances per environment (an environment may override it)."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables of every instance (merged under the environment's env)."""
    secrets: dict[EnvName, SecretRef] = Field(default_factory=dict)
    """Variables whose values are resolved at deploy time only; never interpolated."""
    writable: tuple[str, ...] = ()
    """Paths inside the instance that are writable (everything else is read-only)."""
    memory: str | None = None
    """Memory limit per instance, e.g. 256m or 1g."""
    cpus: float | None = Field(default=None, gt=0)
    """CPU limit per instance, e.g. 0.5."""


_TOKEN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
"""An HTTP token: what a cookie or header name may be made of."""


def _check_http_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"{value!r} is not an HTTP path: start it with '/', without spaces")
    return value


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, dict) else value


HttpPath = Annotated[str, AfterValidator(_check_http_path)]


class PrometheusCheck(_Section):
    """A Prometheus instant query whose value must stay at or below ``max``."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    """Base URL of the Prometheus server (the query goes to URL/api/v1/query)."""
    query: str = Field(min_length=1)
    """PromQL; $RELEASE and $ENVIRONMENT are replaced by the canary release and environment."""
    max: float
    """Highest acceptable value (every sample of a vector result is checked)."""


class CanaryStep(_Section):
    """One canary step: send ``weight`` percent to the new release, then wait."""

    weight: int = Field(ge=0, le=100)
    """Percent of requests sent to the new release during this step."""
    pause: Annotated[Duration | Literal["manual"], BeforeValidator(_check_pause)] = 60.0
    """How long to hold this step, or 'manual' to wait for `castiron deploy ENV --continue`."""


class Analysis(_Section):
    """What a canary step must show before it may go on."""

    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    """Highest share of 5xx answers (and failed connections) of the new release, 0 to 1."""
    max_p95_ms: float | None = Field(default=None, gt=0)
    """Highest 95th percentile latency of the new release, in milliseconds."""
    min_requests: int = Field(default=20, ge=0)
    """Requests the new release must have served before a step is judged."""
    http: tuple[HttpPath, ...] = ()
    """Paths GET on every canary instance at the end of each step; each must answer 2xx."""
    prometheus: Annotated[tuple[PrometheusCheck, ...], BeforeValidator(_one_or_many)] = ()
    """Prometheus instant queries whose value must not exceed their max (one or a list)."""


class Sticky(_Section):
    """Keep a client on the release it first got during a canary: by cookie or header."""

    cookie: str | None = Field(default=None, min_length=1, max_length=64, pattern=_TOKEN)
    """Cookie naming the release a client was given (set by the router)."""
    header: str | None = Field(default=None, min_length=1, max_length=64, pattern=_TOKEN)
    """Request header whose value picks the release (same value, same release)."""

    @model_validator(mode="after")
    def _one_kind(self) -> Sticky:
        if (self.cookie is None) == (self.header is None):
            raise ValueError("give exactly one of cookie or header")
        return self


class Strategy(_Section):
    """How a deployment moves traffic (``strategy:``)."""

    type: Literal["blue-green", "rolling", "canary"] = "blue-green"
    """blue-green (switch all at once), rolling (in batches) or canary (in weighted steps)."""
    batch: int = Field(default=1, ge=1)
    """Instances replaced at a time by a rolling deployment."""
    steps: tuple[CanaryStep, ...] = ()
    """The canary's weight steps, in order."""
    analysis: Analysis | None = None
    """Limits checked at each canary step; a breach aborts and rolls back."""
    sticky: Sticky | None = None
    """Canary only: keep each client on one release ({cookie: NAME} or {header: NAME})."""

    @model_validator(mode="after")
    def _canary_has_steps(self) -> Strategy:
        if self.type == "canary" and not self.steps:
            raise ValueError("steps: a canary needs at least one step")
        return self


class Policy(_Section):
    """Gates a deployment must pass (``policy:``)."""

    soak: Duration | None = None
    """How long a release must have run in promote_from before it may be promoted here."""
    require_signature: Annotated[
        bool | tuple[str, ...], BeforeValidator(_check_require_signature)
    ] = False
    """Refuse unsigned images (true), or images not signed by one of these key names."""
    checks: tuple[tuple[str, ...], ...] = ()
    """Commands (argument lists) that must exit 0 before traffic moves; $URL is the source env."""
    approvals: int = Field(default=0, ge=0)
    """Approvals required before deploying here: each signed by a distinct approver key and OS
    user other than the deployer (``castiron approve --key``), or made through the API by a
    distinct token whose role may approve."""
    approvers: tuple[str, ...] = ()
    """Public keys (PEM files, relative to the spec) of the people whose signed approvals
    count for ``castiron approve --key`` (a label such as CASTIRON_ACTOR proves nothing)."""


class Drift(_Section):
    """How drift is watched and fixed in one environment (``drift:``)."""

    watch: Duration | None = None
    """How often the host agent checks for drift (e.g. 60s); null: only on demand."""
    fix: bool = False
    """Replace drifted instances (and remove strays) when the agent's check finds drift."""
    ignore: tuple[str, ...] = ()
    """Gitignore-style patterns of paths whose changes are not drift (e.g. **/__pycache__/)."""

    @field_validator("watch")
    @classmethod
    def _watch_not_zero(cls, value: float | None) -> float | None:
        if value is not None and value < 1.0:
            raise ValueError("must be at least 1s (or null to not watch)")
        return value


class Router(_Section):
    """The router in front of an environment's instances (``router:``); ``router: haproxy``
    is short for ``router: {type: haproxy}``."""

    type: Literal["builtin", "haproxy"] = "builtin"
    """The data plane: castiron's builtin proxy or HAProxy."""
    max_body: Size = Field(default=10 * 1024**2, ge=0, le=1024**4)
    """Largest request body forwarded; a larger one is answered 413 Content Too Large."""
    body_timeout: Duration = 30.0
    """How long a request body may go without a byte before the request is cut (408)."""
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    """Client connections served at once; requests on connections beyond get 503."""
    allow_get_body: bool = False
    """Forward bodies on GET and HEAD requests (refused with 400 by default)."""
    access_log: bool = False
    """Write one JSON line per request to the agent's access log of this environment."""

    @field_validator("body_timeout")
    @classmethod
    def _body_timeout_positive(cls, value: float) -> float:
        if value < 0.1:
            raise ValueError("must be at least 100ms")
        return value


_DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?/)?"
    r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?$")
_QUANTITY_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?(?:m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_REPOSITORY_RE = re.compile(
    r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)+$"
)


def _matching(pattern: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"{value!r} is not {what}")
        return value

    return AfterValidator(check)


DnsLabel = Annotated[
    str, _matching(_DNS_LABEL_RE, "a Kubernetes name (1-63 lowercase letters, digits and '-')")
]
Quantity = Annotated[str, _matching(_QUANTITY_RE, "a Kubernetes quantity such as 250m or 128Mi")]


class KubernetesService(_Section):
    """The environment's stable Service (``kubernetes.service``)."""

    name: DnsLabel | None = None
    """The Service's name (default: APP-ENVIRONMENT)."""
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """The Service's type."""
    port: Port = 80
    """The port the Service exposes; it targets service.port."""


class KubernetesResources(_Section):
    """Requests per pod (``kubernetes.resources``); limits come from service.memory/cpus."""

    cpu: Quantity | None = None
    """CPU requested per pod, e.g. 250m."""
    memory: Quantity | None = None
    """Memory requested per pod, e.g. 128Mi."""


_HOSTNAME_RE = re.compile(
    r"^(?:\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class KubernetesGateway(_Section):
    """The Gateway API Gateway a canary's exact weights go through (``kubernetes.gateway``)."""

    name: DnsLabel
    """The Gateway's name: the environment's HTTPRoute attaches to it."""
    namespace: DnsLabel | None = None
    """The Gateway's namespace (default: the environment's)."""
    route: DnsLabel | None = None
    """The HTTPRoute's name (default: APP-ENVIRONMENT)."""
    hostnames: list[
        Annotated[str, _matching(_HOSTNAME_RE, "a hostname such as app.example.com")]
    ] = Field(default_factory=list)
    """Hostnames the HTTPRoute matches (default: every request of the Gateway's listener)."""


class Kubernetes(_Section):
    """Where the pods of a ``runtime: kubernetes`` environment run (``kubernetes:``)."""

    context: str | None = None
    """The kubeconfig context (default: the current one; KUBECONFIG or in-cluster, like kubectl)."""
    namespace: DnsLabel = "default"
    """The namespace of the environment's Deployments, Secrets and Service (it must exist)."""
    service: KubernetesService = Field(default_factory=KubernetesService)
    """The stable Service whose selector names the serving release."""
    image_repository: (
        Annotated[str, _matching(_REPOSITORY_RE, "a repository such as registry.example/team/app")]
        | None
    ) = None
    """REGISTRY/REPO the nodes pull the image from, by digest; unset: the nodes' container
    engine is given the image from castiron's store and pods never pull."""
    image_pull_secret: DnsLabel | None = None
    """The Secret the nodes use to pull from image_repository."""
    resources: KubernetesResources = Field(default_factory=KubernetesResources)
    """Requests per pod (limits come from service.memory and service.cpus)."""
    node_selector: dict[
        Annotated[str, _matching(_LABEL_KEY_RE, "a label key")],
        Annotated[str, _matching(_LABEL_VALUE_RE, "a label value")],
    ] = Field(default_factory=dict)
    """Node labels the pods must be scheduled on."""
    gateway: KubernetesGateway | None = None
    """A Gateway API Gateway: a canary then splits traffic by exact weights through an
    HTTPRoute and one Service per release (default: replica-ratio weights)."""


class Environment(_Section):
    """A named deployment target (``environments.<name>``)."""

    runtime: Literal["local", "docker", "kubernetes"] = "local"
    """Where instances run: local processes, Docker containers or Kubernetes pods."""
    listen: Listen
    """The address the environment's router serves on (HOST:PORT)."""
    replicas: int | None = Field(default=None, ge=1, le=1000)
    """Instances in this environment (default: service.replicas)."""
    env: EnvMap = Field(default_factory=dict)
    """Environment variables for this environment, over service.env."""
    strategy: Strategy = Field(default_factory=Strategy)
    """How deployments move traffic here."""
    promote_from: Name | None = None
    """The environment whose releases may be promoted here."""
    policy: Policy = Field(default_factory=Policy)
    """Gates a deployment or promotion must pass."""
    router: Annotated[Router, BeforeValidator(_router_from_text)] = Field(default_factory=Router)
    """The router in front of instances: its data plane and limits (see docs/routing.md)."""
    isolation: Literal["auto", "sandbox", "none"] = "auto"
    """Local runtime only: run instances in a bubblewrap sandbox (auto: when available)."""
    network: str = "host"
    """Docker runtime only: the network containers join."""
    metrics: Listen | None = None
    """An address serving the router's counters in Prometheus text format."""
    drain_timeout: Duration = 30.0
    """How long instances leaving service may finish in-flight requests."""
    keep_warm: Duration = 600.0
    """How long the previous release keeps running after a switch, for instant rollback."""
    keep_warm_releases: int = Field(default=1, ge=0, le=100)
    """How many previous releases are kept warm at most; older ones are drained and destroyed."""
    deploy_timeout: Duration | None = None
    """How long a deployment may wait for new instances to become healthy (default: the
    health check's ``start_period`` + (``healthy_after`` + 2) × (``interval`` + ``timeout``))."""
    drift: Drift = Field(default_factory=Drift)
    """Drift checks: how often the agent watches, whether it fixes, paths to ignore."""
    kubernetes: Kubernetes | None = None
    """Kubernetes runtime only: context, namespace, Service, image source, resources."""

    @model_validator(mode="after")
    def _kubernetes_only_for_kubernetes(self) -> Environment:
        if self.kubernetes is not None and self.runtime != "kubernetes":
            raise ValueError(
                f"kubernetes: only for runtime: kubernetes (this environment's runtime is "
                f"{self.runtime})"
            )
        return self

    @model_validator(mode="after")
    def _kubernetes_canary_without_router_counters(self) -> Environment:
        analysis = self.strategy.analysis
        if self.runtime != "kubernetes" or analysis is None:
            return self
        # Either could only ever abort the canary on a cluster ("not enough to judge it").
        why = {
            "max_error_rate": "a Kubernetes Service counts no requests",
            "max_p95_ms": "a Kubernetes Service counts no requests",
            "http": "pods are not reachable from castiron's host",
        }
        for name, reason in why.items():
            if getattr(analysis, name):
                raise ValueError(
                    f"strategy.analysis.{name}: {reason}; judge error rate and latency with "
                    "analysis.prometheus (the canary's pods' readiness and restarts are "
                    "always judged)"
                )
        return self


class Spec(_Section):
    """The whole of ``castiron.yaml``."""

    app: Name
    """The app's name: 1-63 lowercase letters, digits and '-'."""
    image: ImageSection = Field(default_factory=ImageSection)
    """How to bake the image."""
    service: Service = Field(default_factory=Service)
    """How instances run."""
    environments: dict[Name, Environment] = Field(default_factory=dict)
    """Deployment targets by name."""
    terraform: TerraformSection | None = None
    """Terraform outputs the spec reads (``${tf:NAME}``, ``{tf: NAME}`` secrets)."""
    extensions: dict[str, Any] = Field(default_factory=dict, exclude=True)
    """Top-level keys starting with x-, as written (the loader fills this)."""

    @model_validator(mode="after")
    def _check_references(self) -> Spec:
        # Messages start with a dotted path so the loader can point at the right line.
        for secret, ref in self.service.secrets.items():
            if ref.tf is not None and self.terraform is None:
                raise ValueError(
                    f"service.secrets.{secret}.tf: name the Terraform outputs file in "
                    "terraform.outputs"
                )
        for name, env in self.environments.items():
            if env.promote_from is None:
                continue
            if env.promote_from == name:
                raise ValueError(
                    f"environments.{name}.promote_from: an environment cannot promote from itself"
                )
            if env.promote_from not in self.environments:
                raise ValueError(
                    f"environments.{name}.promote_from: no environment named {env.promote_from!r}"
                )
        for name in self.environments:
            seen = [name]
            current = self.environments[name].promote_from
            while current is not None and current in self.environments:
                if current in seen:
                    cycle = " -> ".join([*seen, current])
                    raise ValueError(f"environments.{name}.promote_from: promotion cycle {cycle}")
                seen.append(current)
                current = self.environments[current].promote_from
        return self


def spec_json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of ``castiron.yaml`` for editors and linters.

    Keys starting with ``x-`` are allowed on every mapping (``patternProperties``).
    """
    schema = Spec.model_json_schema(mode="validation")
    schema["properties"].pop("extensions", None)
    _allow_extensions(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "castiron.yaml",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def _allow_extensions(node: object) -> None:
    if isinstance(node, dict):
        if node.get("additionalProperties") is False and "properties" in node:
            node["patternProperties"] = {"^x-": {}}
        for value in node.values():
            _allow_extensions(value)
    elif isinstance(node, list):
        for value in node:
            _allow_extensions(value)


__all__ = [
    "DURATION_PATTERN",
    "ENV_NAME_PATTERN",
    "NAME_PATTERN",
    "Analysis",
    "CanaryStep",
    "Drift",
    "Duration",
    "EnvName",
    "Environment",
    "HealthCheck",
    "ImageSection",
    "Kubernetes",
    "KubernetesResources",
    "KubernetesService",
    "Listen",
    "Name",
    "Policy",
    "PrometheusCheck",
    "SecretRef",
    "Service",
    "Spec",
    "Sticky",
    "Strategy",
    "TerraformSection",
    "parse_duration",
    "parse_listen",
    "spec_json_schema",
]
