"""Registry references: ``host[:port]/repo[:tag]`` and ``host[:port]/repo@sha256:…``.

Owns parsing (Docker's grammar for repository names and tags), the one test for "is this
string a registry reference rather than a store tag or digest", and loopback detection (which
decides whether plain HTTP may be tried). Knows nothing of HTTP, the store or any runtime.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from castiron.errors import UsageError
from castiron.model import Digest, is_digest

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)(?::[0-9]{1,5})?$"
)
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
MAX_REFERENCE = 255 + 128 + 72


@dataclass(frozen=True)
class Reference:
    """Where an image lives in a registry; ``tag`` or ``digest`` (or both) name it."""

    registry: str
    """``host[:port]`` as written (``docker.io`` for Docker Hub)."""
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def api_host(self) -> str:
        """The host (and port) the API is served from (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the manifest endpoint for: the digest when known, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or "latest"

    def with_digest(self, digest: Digest) -> Reference:
        """The same repository, pinned to ``digest`` (the tag is dropped)."""
        return Reference(self.registry, self.repository, None, digest)

    def with_repository(self, repository: str) -> Reference:
        """Another repository on the same registry."""
        return Reference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def _has_host(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.startswith("[")


def looks_like_reference(text: str) -> bool:
    """True when ``text`` names a registry (``host[:port]/…``), not a store tag or digest.

    A store tag never contains ``/``; a registry reference always starts with a host: a name
    with a dot or a port, ``localhost``, or a bracketed IPv6 address.
    """
    first, slash, rest = text.partition("/")
    return bool(slash and rest) and _has_host(first)


def parse_reference(text: str) -> Reference:
    """Parse ``host[:port]/repo[:tag][@sha256:…]`` (no tag and no digest means ``latest``).

    Raises:
        UsageError: naming the part that does not parse.
    """
    if not text or len(text) > MAX_REFERENCE or any(c.isspace() for c in text):
        raise UsageError(f"invalid registry reference {text!r}: expected host[:port]/repo[:tag]")
    name, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise UsageError(f"invalid registry reference {text!r}: {digest!r} is not a sha256 digest")
    host, slash, path = name.partition("/")
    if not slash or not path or not _has_host(host):
        raise UsageError(
            f"invalid registry reference {text!r}: expected host[:port]/repo[:tag] "
            "(the host has a dot or a port, or is localhost)"
        )
    if not _HOST_RE.match(host):
        raise UsageError(f"invalid registry reference {text!r}: bad registry host {host!r}")
    repo, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid registry reference {text!r}: bad tag {tag!r}")
    if not _REPO_RE.match(repo) or len(repo) > 255:
        raise UsageError(
            f"invalid registry reference {text!r}: bad repository {repo!r} "
            "(lowercase letters, digits and . _ - separators)"
        )
    if host == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    if tag is None and not at:
        tag = "latest"
    return Reference(host, repo, tag, Digest(digest) if at else None)


def split_host(host: str) -> tuple[str, int | None]:
    """``host[:port]`` as (host, port); brackets are removed from an IPv6 address."""
    if host.startswith("["):
        addr, _, rest = host[1:].partition("]")
        return addr, int(rest[1:]) if rest.startswith(":") else None
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        return name, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1`` (port ignored)."""
    name, _ = split_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


__all__ = [
    "Reference",
    "is_loopback",
    "looks_like_reference",
    "parse_reference",
    "split_host",
]
