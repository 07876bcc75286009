"""``castiron quickstart`` end to end, as a new user meets it: the README's first command
verbatim on a fresh clone (twice), inside a git work tree with the quickstart directory
ignored or not, outside one, with ``--home`` or ``CASTIRON_HOME``; the "try next" commands it
prints run as printed, and the tear-down they end with leaves no process running."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import free_port, get, reap_home
from .firsthour import ROOT, castiron_shim, clean_env, processes_under, sh_blocks

pytestmark = pytest.mark.slow

TAGGED = re.compile(r"^   baked sha256:([0-9a-f]{12})… tagged (\S+)$", re.M)


def readme_first_command() -> str:
    """The README's first command, as a user copies it (without its trailing comment)."""
    first = sh_blocks(ROOT / "README.md")[0]
    return first.split("   #", 1)[0].strip()


def try_next(out: str) -> tuple[str, list[str]]:
    """The directory and the commands quickstart suggested, as printed."""
    lines = out.split("try next:\n", 1)[1].splitlines()
    assert lines[0].startswith("  cd "), lines
    commands = [re.split(r"\s{2,}", line.strip())[0] for line in lines[1:] if line.strip()]
    return lines[0].strip().removeprefix("cd "), commands


def run_as_printed(directory: str, commands: list[str], env: dict[str, str]) -> list[str]:
    """Run each command in ``directory`` through a shell, as a user would; their stdout."""
    outputs = []
    for command in commands:
        proc = subprocess.run(
            ["bash", "-c", f"cd {directory} && {command}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, f"{command}: {proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)
    return outputs


def check_tour(out: str, directory: Path, port: int, fresh: bool) -> list[str]:
    """The tour's narration; returns the two default tags it baked."""
    verb = "copied" if fresh else "reusing"
    assert f"1. {verb} the example app in {directory} (castiron.yaml + app/server.py" in out
    assert "Hello from castiron! (version 1)" in out
    assert "Hello from castiron! (version 2)" in out
    assert re.search(r"^   load: \d+ requests answered, 0 failed$", out, re.M), out
    assert f"staging keeps serving http://127.0.0.1:{port}/ — try next:\n" in out
    tags = [tag for _, tag in TAGGED.findall(out)]
    assert len(tags) == 2 and tags[0] != tags[1], out
    return tags


def check_teardown(outputs: list[str], home: Path) -> None:
    """The last two suggested commands: down, then agent stop."""
    down, stop = outputs[-2], outputs[-1]
    pid = re.search(r"the agent \(pid (\d+)\) still runs", down)
    count = re.match(r"staging is down \((\d+) instance\(s\) destroyed\)\n", down)
    assert pid and count, down
    assert int(count[1]) >= 2  # serving and warm
    assert down == (
        f"staging is down ({count[1]} instance(s) destroyed)\nthe agent (pid {pid[1]}) still "
        f"runs for {home}; stop it with `castiron agent stop` (instances of other environments "
        "keep running)\n"
    )
    assert stop == f"agent stopped (pid {pid[1]})\n"


def git(cwd: Path, *args: str) -> str:
    env = clean_env(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        HOME=str(cwd),
    )
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def test_readme_first_command_from_a_fresh_clone_twice(tmp_path: Path) -> None:
    command = readme_first_command()
    assert command == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/castiron quickstart"
    )
    source = git(ROOT, "rev-parse", "--show-toplevel")
    clone = tmp_path / "castiron"
    subprocess.run(["git", "clone", "-q", source, str(clone)], check=True, timeout=120)
    short = git(clone, "rev-parse", "--short", "HEAD")
    port = free_port()
    env = clean_env(CASTIRON_QUICKSTART_PORT=str(port))
    env.pop("VIRTUAL_ENV", None)
    target = clone / "castiron-quickstart"
    try:
        runs = []
        for _ in range(2):
            proc = subprocess.run(
                ["bash", "-c", command],
                cwd=clone,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            runs.append(proc.stdout)
        first = check_tour(runs[0], target, port, fresh=True)
        again = check_tour(runs[1], target, port, fresh=False)
        # castiron-quickstart/ is in .gitignore: not clean, so never the bare short sha
        assert all(t.startswith(f"{short}-dirty-") for t in first), first
        assert again == first  # the same images bound to the same tags: not an error
        directory, commands = try_next(runs[1])
        assert directory == str(target)
        # The virtualenv is not activated, so `castiron` alone would not be found: the
        # commands name the script that ran, and work as printed with the user's own PATH.
        program = str(clone / ".venv" / "bin" / "castiron")
        assert commands[-2:] == [f"{program} down staging --yes", f"{program} agent stop"]
        outputs = run_as_printed(directory, commands, env)
        assert outputs[commands.index(f"{program} audit verify")].startswith("ok: ")
        check_teardown(outputs, target / ".castiron")
        assert processes_under(clone) == []
    finally:
        reap_home(target / ".castiron")


def test_quickstart_in_a_git_tree_that_does_not_ignore_it_with_home_flag(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README").write_text("a project\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    home = tmp_path / "state"
    target = repo / "qs"
    port = free_port()
    env = clean_env(CASTIRON_QUICKSTART_PORT=str(port))
    argv = [sys.executable, "-m", "castiron.cli.main", "--home", str(home), "quickstart"]

    def quickstart() -> str:
        proc = subprocess.run(
            [*argv, "--dir", "qs"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    try:
        short = git(repo, "rev-parse", "--short", "HEAD")
        untracked = check_tour(quickstart(), target, port, fresh=True)
        assert all(t.startswith(f"{short}-dirty-") for t in untracked)
        assert (home / "state.db").is_file() and not (target / ".castiron").exists()
        # once committed, the tree v2 bakes from (app/VERSION = 2) is clean: the short sha
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "quickstart")
        committed = git(repo, "rev-parse", "--short", "HEAD")
        out = quickstart()
        v1, v2 = check_tour(out, target, port, fresh=False)
        assert v1.startswith(f"{committed}-dirty-") and v2 == committed
        directory, commands = try_next(out)
        assert commands[0] == f"castiron --home {home} status"
        run_env = {**env, "PATH": f"{castiron_shim(tmp_path / 'bin')}:{env.get('PATH', '')}"}
        outputs = run_as_printed(directory, commands, run_env)
        check_teardown(outputs, home)
        assert processes_under(tmp_path) == []
    finally:
        reap_home(home)


def test_quickstart_outside_git_with_castiron_home(tmp_path: Path) -> None:
    target = tmp_path / "qs"
    home = tmp_path / "elsewhere"
    port = free_port()
    env = clean_env(CASTIRON_HOME=str(home))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "castiron.cli.main", "quickstart", "--dir", str(target),
             "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        tags = check_tour(out, target, port, fresh=True)
        assert all(t.startswith("sha-") for t in tags)
        assert "rolled back to" in out
        assert get(port) == (200, "Hello from castiron! (version 1)\n")
        assert (home / "state.db").is_file() and not (target / ".castiron").exists()
        directory, commands = try_next(out)
        assert commands[0] == "castiron status"
        run_env = {**env, "PATH": f"{castiron_shim(tmp_path / 'bin')}:{env.get('PATH', '')}"}
        outputs = run_as_printed(directory, commands, run_env)
        history = outputs[commands.index("castiron history staging")]
        assert history.count("succeeded") == 3
        check_teardown(outputs, home)
        assert processes_under(tmp_path) == []
    finally:
        reap_home(home)
