"""docs/getting-started.md, followed step by step: every ```sh block runs as written, in
order, in one shell, on the bundled example; then nothing of castiron is left running."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .conftest import free_port, reap_home
from .firsthour import ROOT, castiron_shim, clean_env, processes_under, sh_blocks

pytestmark = pytest.mark.slow

GUIDE = ROOT / "docs" / "getting-started.md"


def test_the_getting_started_page_runs_as_written(tmp_path: Path) -> None:
    lines = sh_blocks(GUIDE)
    assert lines[0].startswith("export PORT=${PORT:-8080}")
    assert lines[-1].startswith("castiron agent stop")
    bin_dir = castiron_shim(tmp_path / "bin")
    port = free_port()
    env = clean_env(PORT=str(port))
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    work = tmp_path / "work"
    work.mkdir()
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 0, out + err
        hello = work / "hello"
        assert (
            f"wrote {hello}/castiron.yaml and {hello}/app/ (the bundled example app 'hello')" in out
        )
        assert out.count("Hello from castiron! (version dev)") == 2
        assert out.count("Hello from castiron! (version 2)") == 1
        assert "  image chosen: baked from the current spec and context (castiron bake)\n" in out
        assert (
            f"error: the current spec and context of app 'hello' ({hello}/app) are not baked "
            "yet; run castiron bake\n"
        ) in err
        assert "everything required is here\n" in out
        assert "staging is down (" in out
        assert "stop it with `castiron agent stop`" in out
        assert "agent stopped (pid " in out
        assert processes_under(tmp_path) == []
    finally:
        reap_home(work / "hello" / ".castiron")


def test_the_readme_tour_ends_with_nothing_running(tmp_path: Path) -> None:
    tour = sh_blocks(ROOT / "README.md")[2:]  # after the two set-up commands
    assert tour[0].startswith("castiron init --example --port 8080")
    assert tour[-2].startswith("castiron down staging --yes ")
    assert tour[-1].startswith("castiron agent stop ")
    port = free_port()  # the tour's 8080 may be taken on a shared machine: the only change
    script = "\n".join(line.replace("8080", str(port)) for line in tour)
    bin_dir = castiron_shim(tmp_path / "bin")
    env = clean_env()
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    work = tmp_path / "tour"
    work.mkdir()
    try:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Hello from castiron! (version dev)" in proc.stdout
        assert "rolled staging back to release " in proc.stdout
        assert "agent stopped (pid " in proc.stdout
        assert processes_under(tmp_path) == []
    finally:
        reap_home(work / ".castiron")
