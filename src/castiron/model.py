"""Plain values shared by every layer: identifiers and small frozen records.

This module owns the vocabulary types (``Digest``, ``ReleaseId``, ...). It must not know the
spec format, the state schema, or any runtime; it imports only :mod:`castiron.errors` and
:mod:`castiron.values`.
"""

from __future__ import annotations

import dataclasses as _dc
import hashlib
import re
from collections.abc import Mapping as _Mapping
from pathlib import Path as _Path
from typing import Literal as _Literal
from typing import NewType

from castiron.errors import UsageError
from castiron.values import value

Digest = NewType("Digest", str)
"""A content digest, ``sha256:<64 hex>``."""

ReleaseId = NewType("ReleaseId", str)
"""A release identifier: a hash of the image digest and the resolved runtime config."""

IdentityKind = _Literal["key", "os_user", "token"]
"""How an :class:`Identity` is proven: a signing key's id, the OS user, an API token."""


@value
class Identity:
    """Who did something, as castiron can prove it (``CASTIRON_ACTOR`` is only a label).

    ``id`` is the key id (``sha256:`` + hex of the public key's DER) for ``key``, the user
    name for ``os_user``, a token's id for ``token``.
    """

    kind: IdentityKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"

    @property
    def actor(self) -> str:
        """How the state store records this identity as an actor: ``kind:id``."""
        return f"{self.kind}:{self.id}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "id": self.id}


_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def parse_digest(value: str) -> Digest:
    """Return ``value`` as a :data:`Digest`.

    Raises:
        UsageError: when ``value`` is not ``sha256:`` followed by 64 lowercase hex digits.
    """
    if not _DIGEST_RE.match(value):
        raise UsageError(f"not a sha256 digest: {value!r}")
    return Digest(value)


def is_digest(value: str) -> bool:
    """True when ``value`` is a well-formed ``sha256:`` digest."""
    return bool(_DIGEST_RE.match(value))


def sha256_digest(data: bytes) -> Digest:
    """The :data:`Digest` of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def is_name(value: str) -> bool:
    """True for a valid app or environment name: ``[a-z0-9-]{1,63}``, no leading/trailing dash."""
    return bool(_NAME_RE.match(value))


# --- values the engine hands to drivers (drivers never see the spec) -------------------------


@value
class Address:
    """Where something listens or serves: ``HOST:PORT``, ``[V6]:PORT`` for IPv6.

    ``host`` is kept without brackets; :meth:`__str__` adds them back for IPv6.
    """

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """``HOST:PORT`` or ``[V6]:PORT`` as an address (the port 0 to 65535; the host is
        not resolved or checked further).

        Raises:
            ValueError: naming ``text`` when it is not of that form.
        """
        host, sep, port_text = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            bracketed = True
        else:
            bracketed = False
        if not sep or not host or (":" in host and not bracketed):
            hint = " (write IPv6 hosts in brackets: [::1]:80)" if ":" in host else ""
            raise ValueError(f"{text!r} is not HOST:PORT{hint}")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"{text!r}: port {port_text!r} must be a number from 0 to 65535")
        return cls(host, int(port_text))

    @classmethod
    def parse_listen(cls, text: str, example: str = "127.0.0.1:8080") -> Address:
        """A listen or backend address as the spec, the agent and ``serve`` take it: the host
        an IP address (IPv6 in brackets) or ``localhost``, the port 1 to 65535.

        Raises:
            ValueError: saying what is wrong with ``text`` (``example`` shows the form).
        """
        import ipaddress  # (only validation needs it)

        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not HOST:PORT (e.g. {example})")
        if host.startswith("[") and host.endswith("]"):
            bare = host[1:-1]
            try:
                if ipaddress.ip_address(bare).version != 6:
                    raise ValueError
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv6 address") from None
            host = bare
        elif host != "localhost":
            try:
                version = ipaddress.ip_address(host).version
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or 'localhost'") from None
            if version != 4:
                raise ValueError(f"write IPv6 hosts in brackets: [{host}]:{port_text}")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"port {port_text!r} must be a number from 1 to 65535")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


RuntimeName = _Literal["local", "docker", "kubernetes"]
"""The runtimes an environment may run on."""

RUNTIMES: tuple[RuntimeName, ...] = ("local", "docker", "kubernetes")

HealthKind = _Literal["http", "tcp", "command", "none"]
"""How an instance is judged healthy."""

HEALTH_KINDS: tuple[HealthKind, ...] = ("http", "tcp", "command", "none")


@value
class HealthCheck:
    """How an instance is judged ready for traffic: one value from the spec to the prober,
    carried in :class:`InstanceSpec` and sent to the agent as is."""

    kind: HealthKind = "tcp"
    """``http`` (GET ``target`` answers 2xx), ``tcp`` (the port accepts), ``command`` (exits 0)
    or ``none`` (the agent treats it as ``tcp``: a listening port is the least required)."""
    target: str = ""
    """The http path, or the command as a JSON array of strings; empty for tcp/none."""
    interval: float = 1.0
    """Seconds between probes."""
    timeout: float = 2.0
    """Seconds one probe may take."""
    healthy_after: int = 1
    """Consecutive successes needed."""
    start_period: float = 30.0
    """Failures during this many seconds after the start do not count."""


Isolation = _Literal["auto", "sandbox", "none"]
InstanceState = _Literal["starting", "running", "exited", "missing"]


@value
class ImageRef:
    """An image in castiron's store, by digest. Drivers load or unpack it from ``store``."""

    digest: Digest
    """The manifest digest: the image's identity."""
    config_digest: Digest
    """The config digest: Docker's image ID once loaded."""
    store: _Path
    """The OCI image layout that holds the image."""


@value
class InstanceSpec:
    """Everything a driver needs to create one instance; resolved by the engine.

    ``env`` holds resolved secrets: drivers pass it to the instance and never persist or log
    the values of ``secret_names``.
    """

    id: str
    app: str
    environment: str
    release: ReleaseId
    image: ImageRef
    command: tuple[str, ...]
    env: _Mapping[str, str]
    workdir: str
    port: int
    host: str = "127.0.0.1"
    user: str | None = None
    secret_names: frozenset[str] = frozenset()
    isolation: Isolation = "auto"
    writable: tuple[str, ...] = ()
    memory: str | None = None
    cpus: float | None = None
    labels: _Mapping[str, str] = _dc.field(default_factory=dict)
    health: HealthCheck | None = None
    """The release's health check: the runtime's own probes (Kubernetes) and the agent's
    replacements of an instance run it (None: none stated)."""
    network: str | None = None
    """The network the instance joins where the runtime offers a choice (Docker: ``host``, or
    the name of a user bridge network); None: the runtime's default (Docker: ``host``)."""


@value
class Instance:
    """A created instance, as recorded and observed. Never modified: only destroyed."""

    id: str
    app: str
    environment: str
    release: ReleaseId
    runtime: str
    address: str
    """``HOST:PORT`` where it serves."""
    handle: str
    """The runtime's own handle: a pid and start time, a container id, ..."""
    image: Digest


@value
class Observed:
    """What a driver sees of an instance, for status and drift detection."""

    instance: Instance
    state: InstanceState
    image: Digest | None
    """The digest actually running (None when it cannot be told)."""
    config: _Mapping[str, object] = _dc.field(default_factory=dict)
    """Runtime config as observed: env (names only for secrets), command, user, ports, labels."""
    stray: bool = False
    """True when the runtime shows it but castiron's records do not know it."""
    exit_code: int | None = None


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:ib?|b)?\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_memory(text: str) -> int:
    """Bytes in a memory size such as ``256m``, ``1g``, ``512Mi`` or ``1048576``.

    Raises:
        ValueError: when ``text`` is not a size.
    """
    match = _MEMORY_RE.match(text)
    if match is None:
        raise ValueError(f"not a memory size: {text!r} (use e.g. 256m or 1g)")
    number, unit = match.groups()
    value = int(float(number) * _MEMORY_UNITS[unit.lower()])
    if value <= 0:
        raise ValueError(f"not a memory size: {text!r} (must be more than 0)")
    return value


__all__ = [
    "HEALTH_KINDS",
    "RUNTIMES",
    "Address",
    "Digest",
    "HealthCheck",
    "HealthKind",
    "ImageRef",
    "Instance",
    "InstanceSpec",
    "InstanceState",
    "Isolation",
    "Observed",
    "ReleaseId",
    "RuntimeName",
    "is_digest",
    "is_name",
    "parse_digest",
    "parse_memory",
    "sha256_digest",
]
