#!/usr/bin/env python3
"""CLI start-up and the spec-resolving path of two castiron source trees, in the same run.

    python bench/startup_ab.py --base ../castiron-before/src [--runs 20]

It copies the bundled example app into a temporary directory, bakes it and deploys it to
``staging`` with this tree's castiron (so the home holds one deployed environment), then runs
hyperfine (``-N``, 3 warm-ups, ``--runs`` runs) over, for each tree (selected with
``PYTHONPATH``, same interpreter): ``castiron version`` (import floor), ``castiron status``
(reads the state store and the agent) and ``castiron plan staging --json`` (resolves the spec
from its cache, resolves the image, plans; changes nothing). Commands of both trees alternate
within one hyperfine invocation, so both see the same machine load. Prints hyperfine's table
and each command's ratio after/before.

Both trees' modules are byte-compiled first (``compileall``, as ``pip install`` does), and the
spec cache is filled by each tree before timing (a cache key includes the resolving code).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import cpu_model

from castiron.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "src" / "castiron" / "examples" / "hello"
COMMANDS = {"version": ["version"], "status": ["status"], "plan": ["plan", "staging", "--json"]}


def machine() -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{os.cpu_count()} CPU(s), {cpu_model()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, load average {load}"
    )


def run(env: dict[str, str], cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "castiron.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"castiron {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="the other tree's src/")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("hyperfine") is None:
        raise SystemExit("hyperfine not found")
    trees = {"before": args.base.resolve(), "after": (ROOT / "src").resolve()}
    for src in trees.values():
        compileall.compile_dir(src / "castiron", quiet=1)
    with tempfile.TemporaryDirectory(prefix="castiron-startup-") as tmp:
        project = Path(tmp) / "hello"
        shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
        spec = project / "castiron.yaml"
        spec.write_text(spec.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}"))
        base = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
        base.pop("PYTHONPATH", None)
        base.update({"NO_COLOR": "1", "CASTIRON_HOME": str(project / ".castiron")})
        envs = {name: {**base, "PYTHONPATH": str(src)} for name, src in trees.items()}
        print(f"machine: {machine()}")
        try:
            run(envs["after"], project, "bake")
            run(envs["after"], project, "deploy", "staging", "--yes")
            for env in envs.values():  # fill each tree's spec cache
                run(env, project, "plan", "staging", "--json")
            cmd: list[str] = [
                "hyperfine", "-N", "--warmup", "3", "--runs", str(args.runs),
                "--export-json", str(project / "hyperfine.json"), "--style", "basic",
            ]  # fmt: skip
            for what, words in COMMANDS.items():
                for name, src in trees.items():
                    prefix = ["env", f"PYTHONPATH={src}", sys.executable, "-m", "castiron.cli.main"]
                    line = " ".join([*prefix, *words])
                    cmd += ["-n", f"{what} {name}", line]
            subprocess.run(cmd, cwd=project, env=base, check=True)
            results = json.loads((project / "hyperfine.json").read_text())["results"]
        finally:
            for words in (["down", "staging", "--yes"], ["agent", "stop"]):
                subprocess.run(
                    [sys.executable, "-m", "castiron.cli.main", *words],
                    cwd=project,
                    env=envs["after"],
                    capture_output=True,
                    check=False,
                )
    print(f"machine at the end: {machine()}")
    by_name = {r["command"]: r for r in results}
    for what in COMMANDS:
        before, after = by_name[f"{what} before"], by_name[f"{what} after"]
        cpu_before = before["user"] + before["system"]
        cpu_after = after["user"] + after["system"]
        print(
            f"{what}: median {before['median'] * 1000:.1f} -> {after['median'] * 1000:.1f} ms "
            f"(x{after['median'] / before['median']:.2f}), mean {before['mean'] * 1000:.1f} -> "
            f"{after['mean'] * 1000:.1f} ms (x{after['mean'] / before['mean']:.2f}), CPU "
            f"(user+system) {cpu_before * 1000:.1f} -> {cpu_after * 1000:.1f} ms "
            f"(x{cpu_after / cpu_before:.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
