"""Registry credentials and authentication challenges.

Owns where credentials come from, in this order: the ``CASTIRON_REGISTRY_USERNAME`` /
``CASTIRON_REGISTRY_PASSWORD`` environment variables (limited to ``CASTIRON_REGISTRY_HOST``
when it is set), then the Docker client config (``$DOCKER_CONFIG/config.json``, else
``~/.docker/config.json``; ``REGISTRY_AUTH_FILE`` first when set): a per-registry credential
helper (``credHelpers``), an inline ``auths`` entry, then the default ``credsStore``. It also
parses ``WWW-Authenticate`` challenges (Basic and Bearer).

Credentials are never written anywhere and never appear in a ``repr`` or a message. The
environment is passed in (the caller captured it at the edge). Knows nothing of HTTP
connections, the store or any runtime.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from castiron.errors import RegistryAuthError
from castiron.images.registry.reference import DOCKER_HUB, DOCKER_HUB_API

ENV_USERNAME = "CASTIRON_REGISTRY_USERNAME"
ENV_PASSWORD = "CASTIRON_REGISTRY_PASSWORD"
ENV_HOST = "CASTIRON_REGISTRY_HOST"
HELPER_TIMEOUT = 30.0
_MAX_CONFIG_BYTES = 1 << 20
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB, DOCKER_HUB_API)


@dataclass(frozen=True)
class Credentials:
    """A username and a secret (password or token) for one registry."""

    username: str
    password: str = field(repr=False)
    source: str = ""
    """Where they came from (``environment``, a config file, a helper), for messages."""

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str
    """``basic`` or ``bearer`` (lowercase)."""
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """Parse ``Bearer realm="…",service="…",scope="…"`` or ``Basic realm="…"``; None when the
    header is empty or of another scheme."""
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("basic", "bearer"):
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3) or ""
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme, params)


def _config_paths(environ: Mapping[str, str]) -> list[Path]:
    paths: list[Path] = []
    if environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(environ["REGISTRY_AUTH_FILE"]))
    if environ.get("DOCKER_CONFIG"):
        paths.append(Path(environ["DOCKER_CONFIG"]) / "config.json")
    elif environ.get("HOME"):
        paths.append(Path(environ["HOME"]) / ".docker" / "config.json")
    return paths


def _keys_for(host: str) -> tuple[str, ...]:
    if host in (DOCKER_HUB, DOCKER_HUB_API):
        return _HUB_KEYS
    return (host,)


def _normalize(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key)
    return key.split("/", 1)[0]


def _run_helper(name: str, host: str, environ: Mapping[str, str]) -> Credentials | None:
    program = f"docker-credential-{name}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise RegistryAuthError(f"credential helper name {name!r} is not valid")
    try:
        proc = subprocess.run(
            [program, "get"],
            input=host.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            env=dict(environ),
            check=False,
        )
    except FileNotFoundError:
        raise RegistryAuthError(
            f"credential helper {program} for {host} is not installed"
        ) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RegistryAuthError(f"credential helper {program} failed for {host}: {exc}") from None
    if proc.returncode != 0:
        text = proc.stdout.decode("utf-8", "replace").strip()
        if "not found" in text.lower() or "credentials not found" in text.lower():
            return None
        raise RegistryAuthError(
            f"credential helper {program} failed for {host} (exit status {proc.returncode})"
        )
    try:
        doc = json.loads(proc.stdout)
        username, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(
            f"credential helper {program} gave no credentials for {host}"
        ) from None
    if not isinstance(username, str) or not isinstance(secret, str):
        raise RegistryAuthError(f"credential helper {program} gave no credentials for {host}")
    return Credentials(username, secret, program)


def _from_config(path: Path, host: str, environ: Mapping[str, str]) -> Credentials | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise RegistryAuthError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(data)
    except ValueError:
        raise RegistryAuthError(f"{path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryAuthError(f"{path} is not a JSON object")
    keys = _keys_for(host)
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key in keys:
            helper = helpers.get(key)
            if isinstance(helper, str) and helper:
                return _run_helper(helper, key, environ)
    auths = doc.get("auths")
    if isinstance(auths, dict):
        by_host = {_normalize(k): v for k, v in auths.items() if isinstance(k, str)}
        for key in keys:
            entry = auths.get(key) or by_host.get(_normalize(key))
            if not isinstance(entry, dict):
                continue
            encoded = entry.get("auth")
            if isinstance(encoded, str) and encoded:
                try:
                    user, sep, password = base64.b64decode(encoded).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    raise RegistryAuthError(f"{path}: auths.{key}.auth is not valid") from None
                if not sep:
                    raise RegistryAuthError(f"{path}: auths.{key}.auth is not user:password")
                return Credentials(user, password, str(path))
            name, secret = entry.get("username"), entry.get("password")
            if isinstance(name, str) and isinstance(secret, str):
                return Credentials(name, secret, str(path))
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        for key in keys:
            found = _run_helper(store, key, environ)
            if found is not None:
                return found
    return None


def find_credentials(host: str, environ: Mapping[str, str]) -> Credentials | None:
    """The credentials for registry ``host`` (``host[:port]``), or None to go anonymous.

    Raises:
        RegistryAuthError: when a config file or credential helper is broken (never when
            there simply are no credentials).
    """
    user, password = environ.get(ENV_USERNAME), environ.get(ENV_PASSWORD)
    scope = environ.get(ENV_HOST)
    if user and password is not None and (not scope or scope == host):
        return Credentials(user, password, "environment")
    for path in _config_paths(environ):
        found = _from_config(path, host, environ)
        if found is not None:
            return found
    return None


__all__ = ["Challenge", "Credentials", "find_credentials", "parse_challenge"]
