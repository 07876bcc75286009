"""Registry references, credentials and challenges: pure tables, no network."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from castiron.errors import RegistryAuthError, UsageError
from castiron.images.registry.auth import Challenge, find_credentials, parse_challenge
from castiron.images.registry.reference import (
    Reference,
    is_loopback,
    looks_like_reference,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000/app", Reference("127.0.0.1:5000", "app", "latest")),
        ("localhost/team/app:v1", Reference("localhost", "team/app", "v1")),
        ("ghcr.io/org/app:1.2.3", Reference("ghcr.io", "org/app", "1.2.3")),
        (f"reg.example.com/app@{DIGEST}", Reference("reg.example.com", "app", None, DIGEST)),
        (f"reg.example.com/app:v1@{DIGEST}", Reference("reg.example.com", "app", "v1", DIGEST)),
        ("docker.io/busybox:1", Reference("docker.io", "library/busybox", "1")),
        ("[::1]:5000/a/b", Reference("[::1]:5000", "a/b", "latest")),
    ],
)
def test_parse_reference(text: str, expected: Reference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "app:v1",
            "invalid registry reference 'app:v1': expected host[:port]/repo[:tag] "
            "(the host has a dot or a port, or is localhost)",
        ),
        (
            "127.0.0.1:5000/App",
            "invalid registry reference '127.0.0.1:5000/App': bad repository "
            "'App' (lowercase letters, digits and . _ - separators)",
        ),
        (
            "127.0.0.1:5000/app:-x",
            "invalid registry reference '127.0.0.1:5000/app:-x': bad tag '-x'",
        ),
        (
            "127.0.0.1:5000/app@sha256:12",
            "invalid registry reference "
            "'127.0.0.1:5000/app@sha256:12': 'sha256:12' is not a sha256 digest",
        ),
        (
            "bad_host.com/app",
            "invalid registry reference 'bad_host.com/app': bad registry host 'bad_host.com'",
        ),
        ("", "invalid registry reference '': expected host[:port]/repo[:tag]"),
    ],
)
def test_bad_references_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_reference(text)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("text", "is_ref"),
    [
        ("v1", False),
        ("sha256:" + "0" * 64, False),
        ("0123456789ab", False),
        ("localhost:5000/app:v1", True),
        ("ghcr.io/org/app", True),
        ("team/app", False),
    ],
)
def test_looks_like_reference(text: str, is_ref: bool) -> None:
    assert looks_like_reference(text) is is_ref


def test_loopback_hosts() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") and is_loopback("[::1]:1")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("ghcr.io")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.example.com/token",service="registry",'
            'scope="repository:a/b:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.example.com/token",
                    "service": "registry",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        ('Basic realm="castiron-test"', Challenge("basic", {"realm": "castiron-test"})),
        ("Negotiate abc", None),
        ("", None),
    ],
)
def test_parse_challenge(header: str, expected: Challenge | None) -> None:
    assert parse_challenge(header) == expected


def _config(tmp_path: Path, doc: object) -> dict[str, str]:
    folder = tmp_path / "docker"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(doc))
    return {"DOCKER_CONFIG": str(folder), "PATH": os.environ.get("PATH", "")}


def test_credentials_from_docker_config_auths(tmp_path: Path) -> None:
    auth = base64.b64encode(b"bot:pa:ss").decode()
    env = _config(tmp_path, {"auths": {"https://reg.example.com/v1/": {"auth": auth}}})
    creds = find_credentials("reg.example.com", env)
    assert creds is not None and (creds.username, creds.password) == ("bot", "pa:ss")
    assert "pa:ss" not in repr(creds)
    assert find_credentials("other.example.com", env) is None


def test_environment_credentials_win_and_can_be_scoped(tmp_path: Path) -> None:
    env = {"CASTIRON_REGISTRY_USERNAME": "ci", "CASTIRON_REGISTRY_PASSWORD": "pw"}
    creds = find_credentials("reg.example.com", env)
    assert creds is not None and creds.source == "environment"
    scoped = {**env, "CASTIRON_REGISTRY_HOST": "127.0.0.1:5000"}
    assert find_credentials("reg.example.com", scoped) is None
    assert find_credentials("127.0.0.1:5000", scoped) is not None


def _helper(tmp_path: Path, name: str, script: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / f"docker-credential-{name}"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(bindir)


def test_credential_helper(tmp_path: Path) -> None:
    bindir = _helper(
        tmp_path,
        "test",
        'read host\n[ "$1" = get ] && [ "$host" = reg.example.com ] && '
        'echo \'{"ServerURL":"reg.example.com","Username":"h","Secret":"tok"}\'\n',
    )
    env = _config(tmp_path, {"credHelpers": {"reg.example.com": "test"}})
    env["PATH"] = bindir + os.pathsep + env["PATH"]
    creds = find_credentials("reg.example.com", env)
    assert creds is not None and (creds.username, creds.password) == ("h", "tok")
    assert creds.source == "docker-credential-test"


def test_missing_credential_helper_is_one_clear_error(tmp_path: Path) -> None:
    env = _config(tmp_path, {"credsStore": "nope-not-here"})
    with pytest.raises(RegistryAuthError) as err:
        find_credentials("reg.example.com", env)
    assert str(err.value) == (
        "credential helper docker-credential-nope-not-here for reg.example.com is not installed"
    )


def test_broken_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "docker"
    folder.mkdir()
    (folder / "config.json").write_text("{nope")
    with pytest.raises(RegistryAuthError) as err:
        find_credentials("reg.example.com", {"DOCKER_CONFIG": str(folder)})
    assert str(err.value) == f"{folder / 'config.json'} is not valid JSON"
