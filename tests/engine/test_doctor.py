"""``castiron doctor``: each check's verdict, what makes it required, the fix it names, the
exit code and the JSON."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from castiron import compiled
from castiron.engine.doctor import Check, diagnose, failed
from castiron.settings import load_settings

SPEC = """\
app: shop
environments:
  staging:
    runtime: docker
    listen: 127.0.0.1:{port}
    router: haproxy
  dev:
    runtime: local
    isolation: sandbox
    listen: 127.0.0.1:{free}
"""


@pytest.fixture
def taken() -> Iterator[int]:
    """A port some other process holds (this test's listening socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _free() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_bare_host_against_a_demanding_spec(tmp_path: Path, taken: int) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    free = _free()
    (tmp_path / "castiron.yaml").write_text(SPEC.format(port=taken, free=free))
    environ = {"PATH": str(empty), "DOCKER_HOST": f"unix://{tmp_path}/docker.sock"}
    settings = load_settings(environ, cwd=tmp_path)
    loaded, checks = diagnose(
        settings,
        version=(3, 10, 4),
        bwrap_probe=lambda _: None,
        find_module=lambda _: None,
        limits_probe=lambda: "no cgroup hierarchy with the memory or cpu controller is mounted",
        router_speed=compiled.Status(False, "not compiled (no C extensions were built)"),
    )
    assert loaded is not None and loaded.spec.app == "shop"
    home = tmp_path / ".castiron"
    assert checks == [
        Check(
            "python",
            "missing",
            True,
            "Python 3.10.4; castiron needs 3.11 or newer",
            "install Python 3.11 or newer (apt-get install python3)",
        ),
        Check("state directory", "ok", True, f"{home} (created on first use)"),
        Check("agent", "ok", False, "not running (the CLI starts it when a deploy needs it)"),
        Check(
            "bubblewrap",
            "missing",
            True,
            "bwrap not found (needed: an environment sets isolation: sandbox)",
            "apt-get install bubblewrap",
        ),
        Check(
            "limits",
            "warning",
            False,
            "memory and cpus of local instances are NOT enforced: no cgroup hierarchy with the "
            "memory or cpu controller is mounted",
            "run castiron's agent as root, or in a cgroup v2 subtree delegated to this user "
            "(systemd: Delegate=yes)",
        ),
        Check(
            "docker engine",
            "missing",
            True,
            f"no Docker engine at {tmp_path}/docker.sock (No such file or directory); the "
            "docker runtime cannot run",
            "apt-get install docker.io && systemctl start docker",
        ),
        Check(
            "docker sdk",
            "missing",
            True,
            "the docker Python package is not installed (the docker runtime needs it)",
            "pip install 'castiron[docker]'",
        ),
        Check(
            "haproxy",
            "missing",
            True,
            "haproxy not found (an environment sets router: haproxy)",
            "apt-get install haproxy",
        ),
        Check(
            "git",
            "missing",
            False,
            "git not found: bake tags images by digest instead of commit",
            "apt-get install git",
        ),
        Check(
            "builtin router",
            "warning",
            False,
            "builtin router: not compiled (no C extensions were built); uvloop and httptools "
            "not installed",
            "pip install 'castiron[fast]'; reinstall where mypy and a C compiler are available "
            "(pip install --no-deps --force-reinstall . in a checkout; ./scripts/test rebuilds "
            "it there)",
        ),
        Check(f"port 127.0.0.1:{free}", "ok", True, "dev: free"),
        Check(
            f"port 127.0.0.1:{taken}",
            "missing",
            True,
            f"staging: 127.0.0.1:{taken} is taken by another process (Address already in use)",
            "choose a free port for environments.staging.listen in the spec",
        ),
    ]
    assert [c.name for c in failed(checks)] == [
        "python",
        "bubblewrap",
        "docker engine",
        "docker sdk",
        "haproxy",
        f"port 127.0.0.1:{taken}",
    ]


def test_without_a_spec_only_the_host_is_checked_and_nothing_optional_fails(
    tmp_path: Path,
) -> None:
    environ = {"PATH": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    loaded, checks = diagnose(
        load_settings(environ, cwd=tmp_path), version=(3, 12, 0), find_module=lambda _: None
    )
    assert loaded is None
    assert failed(checks) == []
    assert {c.name for c in checks if c.required} == {"python", "state directory"}


@pytest.mark.parametrize(
    ("speed", "detail", "fix"),
    [
        (compiled.Status(True, "compiled with mypyc"), "compiled with mypyc", None),
        (
            compiled.Status(False, "CASTIRON_COMPILED=0: running from source", turned_off=True),
            "CASTIRON_COMPILED=0: running from source",
            "unset CASTIRON_COMPILED",
        ),
    ],
)
def test_the_builtin_routers_fast_path(
    tmp_path: Path, speed: compiled.Status, detail: str, fix: str | None
) -> None:
    _, checks = diagnose(
        load_settings({}, cwd=tmp_path), find_module=lambda _: 1, router_speed=speed
    )
    check = next(c for c in checks if c.name == "builtin router")
    assert check == Check(
        "builtin router",
        "ok" if fix is None else "warning",
        False,
        f"builtin router: {detail}",
        fix,
    )


def test_a_state_directory_readable_by_others_is_a_warning(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    _, checks = diagnose(load_settings({}, cwd=tmp_path, home=home), find_module=lambda _: 1)
    check = next(c for c in checks if c.name == "state directory")
    assert check == Check(
        "state directory",
        "warning",
        True,
        f"{home} is readable by others (mode 0755); castiron keeps it 0700",
        f"chmod 700 {home}",
    )


def test_cli_exits_1_naming_what_required_is_missing(
    run_cli, tmp_path: Path, taken: int, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "castiron.yaml"
    spec.write_text(f"app: shop\nenvironments:\n  staging: {{listen: 127.0.0.1:{taken}}}\n")
    monkeypatch.chdir(tmp_path)
    result = run_cli("doctor")
    assert result.exit_code == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"spec: {spec}"
    port = f"port 127.0.0.1:{taken}"
    assert f"missing  {port:<16} required  staging: 127.0.0.1:{taken} is taken by another " in (
        result.stdout
    )
    assert lines[-2] == (
        f"{'':<8} {'':<16} {'':<9} fix: choose a free port for environments.staging.listen "
        "in the spec"
    )
    assert lines[-1] == f"1 required check(s) failed: {port}"
    data = json.loads(run_cli("doctor", "--json").stdout)
    assert data["ok"] is False and data["spec"] == str(spec)
    assert [c["name"] for c in data["checks"] if c["required"] and c["status"] == "missing"] == [
        port
    ]


def test_cli_without_a_spec_exits_0(run_cli, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    result = run_cli("doctor")
    assert result.exit_code == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "spec: none (host checks only)"
    assert lines[-1] == "everything required is here"
    assert json.loads(run_cli("doctor", "--json").stdout)["ok"] is True
