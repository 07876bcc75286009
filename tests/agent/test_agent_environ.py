"""The agent and its fd keeper run with a minimal environment, never the deployer's whole one.

Cloud credentials and tokens in the shell that first started the agent must not be readable
in a long-lived daemon's ``/proc/PID/environ``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from castiron.agent.fdkeeper import FdKeeperClient
from castiron.agent.lifecycle import agent_pid, ensure_agent, minimal_environ
from castiron.settings import Settings, load_settings

DEPLOYER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "CASTIRON_ACTOR": "alice",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-1234",
    "GITHUB_TOKEN": "ghp_token_5678",
    "HELLO_DB_PASSWORD": "hunter2-db",
}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        entry.decode().split("=", 1) for entry in raw.split(b"\0") if entry and b"=" in entry
    )


def test_minimal_environ_keeps_path_locale_home_and_castiron_variables() -> None:
    assert minimal_environ(DEPLOYER_ENV) == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/root",
        "CASTIRON_ACTOR": "alice",
    }
    assert minimal_environ({"TOKEN": "x"}) == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    }


def test_the_agent_does_not_inherit_the_deployers_environment(settings: Settings) -> None:
    # `settings` (the fixture) reaps whatever runs for this home afterwards.
    deployer = load_settings({**DEPLOYER_ENV, "CASTIRON_HOME": str(settings.home)})
    ensure_agent(deployer)
    pid = agent_pid(deployer)
    assert pid
    seen = environ_of(pid)
    assert set(seen) == {"PATH", "LANG", "HOME", "CASTIRON_ACTOR", "CASTIRON_HOME"}
    assert seen["PATH"] == DEPLOYER_ENV["PATH"]
    assert seen["CASTIRON_HOME"] == str(settings.home)
    assert "aws-secret-1234" not in Path(f"/proc/{pid}/environ").read_text()


def test_the_fd_keeper_does_not_inherit_its_starters_environment(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in DEPLOYER_ENV.items():
        monkeypatch.setenv(name, text)
    keeper = FdKeeperClient(settings.agent_path)
    settings.agent_path.mkdir(parents=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        try:
            keeper.put("listener", sock)
            pid = int((settings.agent_path / "fdkeeper.pid").read_text())
            seen = environ_of(pid)
            assert "AWS_SECRET_ACCESS_KEY" not in seen
            assert "GITHUB_TOKEN" not in seen
            assert "HELLO_DB_PASSWORD" not in seen
            assert seen["CASTIRON_ACTOR"] == "alice"
            assert set(seen) - {"PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TZ"} == {
                name for name in seen if name.startswith("CASTIRON_")
            }
        finally:
            keeper.quit()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "aws-secret-1234"  # the test's own, untouched
