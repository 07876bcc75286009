"""Two machines sharing PostgreSQL state, played by two homes on this host (each with its own
agent and image store, one database): one lock for both, and a deployment killed with
``kill -9`` on the first recovered by the next command on the second."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Project, get, project_env, reap_home, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _machines(
    make_project: Callable[..., Project], postgres_url: str, tmp_path: Path
) -> tuple[Project, Project]:
    a = make_project(replicas=1)
    root = tmp_path / "machine-b"
    shutil.copytree(a.root, root, ignore=shutil.ignore_patterns(".castiron"))
    b = Project(root, a.port, project_env(root))
    a.env["CASTIRON_STATE"] = b.env["CASTIRON_STATE"] = postgres_url
    a.env["CASTIRON_ACTOR"], b.env["CASTIRON_ACTOR"] = "alice@machine-a", "bob@machine-b"
    return a, b


@pytest.mark.parametrize(("step", "outcome"), [("created", "aborted"), ("switched", "succeeded")])
def test_two_machines_share_one_lock_and_recover_each_other(
    make_project: Callable[..., Project], postgres_url: str, tmp_path: Path, step: str, outcome: str
) -> None:
    a, b = _machines(make_project, postgres_url, tmp_path)
    try:
        a.bake("v1")
        first = a.deploy("v1", "one")
        assert a.served() == "one"
        # The team's one audit key, and the same image baked on B (same digest).
        b.home.mkdir(mode=0o700)
        shutil.copy2(a.home / "audit.key", b.home / "audit.key")
        b.bake("v1")
        proc = a.start(
            "deploy", "staging", "--yes", extra={"VERSION": "two", "CASTIRON_TEST_PAUSE_AT": step}
        )
        try:
            wait_for(lambda: (a.home / f"paused-at-{step}").exists(), what=f"pause at {step}")
            # B deploys the same environment at the same time: the shared lock refuses it.
            blocked = b.run("deploy", "staging", "--image", "v1", "--yes", extra={"VERSION": "b"})
            assert blocked.returncode == 4, blocked.stderr
            assert blocked.stderr.splitlines()[-1].startswith(
                f"error: environment 'staging' is locked by alice@machine-a (pid {proc.pid})"
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        reap_home(a.home)  # machine A is gone: its agent and instances with it
        # The next command on B recovers the deployment A left half done.
        status = b.status()
        history = b.json("history", "staging")["deployments"]
        assert isinstance(history, list)
        assert (history[0]["outcome"], history[0]["recovered"]) == (outcome, True)
        assert (status["release"] == first["release"]) is (outcome == "aborted")
        assert b.json("lock", "status")["locks"] == []
        # B carries on from the recovered state: its next deployment serves from machine B.
        second = b.deploy("v1", "three")
        assert second["outcome"] == "succeeded"
        wait_for(lambda: get(b.port)[1].strip() == "three", what="B to serve release three")
        verify = b.run("audit", "verify")
        assert verify.returncode == 0, verify.stderr
    finally:
        reap_home(b.home)
