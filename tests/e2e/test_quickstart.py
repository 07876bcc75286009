"""``castiron quickstart`` end to end: a fresh directory, the real CLI, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_port, get, reap_home

pytestmark = pytest.mark.slow


def test_quickstart_runs_the_whole_tour(tmp_path: Path) -> None:
    target = tmp_path / "qs"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
    env.update({"NO_COLOR": "1", "CASTIRON_ACTOR": "e2e@test"})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "castiron.cli.main", "quickstart", "--dir", str(target),
             "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "Hello from castiron! (version 1)" in out
        assert "Hello from castiron! (version 2)" in out
        assert ", 0 failed" in out
        assert "rolled back to" in out
        assert get(port) == (200, "Hello from castiron! (version 1)\n")
        # the working directory is a normal project: the CLI works in it
        status = subprocess.run(
            [sys.executable, "-m", "castiron.cli.main", "history", "staging"],
            cwd=target,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert status.stdout.count("succeeded") == 3
    finally:
        reap_home(target / ".castiron")
