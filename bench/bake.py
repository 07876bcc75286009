#!/usr/bin/env python3
"""Benchmark `castiron bake` against its floor (`tar -c | gzip -6`) and `docker build`.

Generates a 50 MB / 5,000-file context (mixed compressible text and random bytes, fixed
seed), then times, side by side in one run:

  cold     castiron bake (empty store)   vs  tar -c | gzip -6   vs  docker build --no-cache
  rebuild  castiron bake (unchanged)     vs  tar -c | gzip -6   vs  docker build (cached)

docker build uses a `FROM scratch` + `COPY . /app` Dockerfile with DOCKER_BUILDKIT=0 and
runs only when a Docker engine answers. Timing uses hyperfine (median of --runs runs).

Usage: python3 bench/bake.py [--runs N] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _machine import cpu_model

FILES = 5_000
TOTAL_BYTES = 50 * 1024 * 1024
SEED = 20240601
WORDS = [
    *("deploy", "image", "digest", "layer", "release", "router", "drain", "health", "canary"),
    *("rollback", "audit", "spec", "bake", "store", "tag", "manifest", "config", "context"),
]


def generate(ctx: Path) -> int:
    """Write the context; returns its size in bytes."""
    rng = random.Random(SEED)
    per_file = TOTAL_BYTES // FILES
    total = 0
    for i in range(FILES):
        d = ctx / f"pkg{i % 50:02d}" / f"mod{(i // 50) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(per_file // 2, per_file * 3 // 2)
        if i % 5 < 3:  # text: compressible
            out: list[str] = []
            n = 0
            while n < size:
                line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
                out.append(line)
                n += len(line)
            data = "".join(out).encode()[:size]
            name = f"f{i:05d}.txt"
        else:  # binary: incompressible
            data = rng.randbytes(size)
            name = f"f{i:05d}.bin"
        (d / name).write_bytes(data)
        total += len(data)
    old = 1_600_000_000
    for p in ctx.rglob("*"):
        os.utime(p, (old, old))
    return total


def machine() -> str:
    cpu = cpu_model("unknown")
    py = platform.python_version()
    return f"{os.cpu_count()} CPU ({cpu}), Linux {platform.release()}, Python {py}"


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def hyperfine(
    commands: dict[str, tuple[str, str | None]], runs: int, out: Path
) -> dict[str, float]:
    args = [
        "hyperfine",
        "--runs",
        str(runs),
        "--export-json",
        str(out),
        "--style",
        "basic",
        "--shell",
        "bash",
    ]
    for name, (cmd, prepare) in commands.items():
        args += ["--command-name", name]
        args += ["--prepare", prepare or "true"]
        args.append(cmd)
    subprocess.run(args, check=True, stdout=sys.stderr)
    results = json.loads(out.read_text())["results"]
    return {r["command"]: r["median"] for r in results}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median reported)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to build (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if shutil.which("hyperfine") is None:
        print("hyperfine is required (apt-get install hyperfine)", file=sys.stderr)
        return 2
    castiron = shutil.which("castiron") or str(Path(sys.executable).parent / "castiron")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="castiron-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ctx = work / "ctx"
        if ctx.exists():
            shutil.rmtree(ctx)
        size = generate(ctx)
        (work / "castiron.yaml").write_text(
            "app: bench\nimage:\n  context: ./ctx\n  workdir: /app\n  entrypoint: [/app/run]\n"
        )
        (work / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
        home = work / "home"
        spec = work / "castiron.yaml"
        bake = f"{castiron} -f {spec} --home {home} bake --tag bench --source-date-epoch 0"
        floor = f"tar -C {ctx} --sort=name -cf - . | gzip -6 > {work}/floor.tar.gz"
        docker = docker_available()
        dbuild = (
            f"DOCKER_BUILDKIT=0 docker build -q -f {work}/Dockerfile "
            f"-t castiron-bench:latest {ctx} >/dev/null"
        )
        cold: dict[str, tuple[str, str | None]] = {
            "castiron bake (cold)": (bake, f"rm -rf {home}"),
            "tar | gzip -6": (floor, None),
        }
        if docker:
            cold["docker build --no-cache"] = (
                dbuild.replace("docker build", "docker build --no-cache"),
                "docker image rm -f castiron-bench:latest >/dev/null 2>&1 || true",
            )
        print(f"context: {FILES} files, {size / 1e6:.1f} MB; machine: {machine()}", file=sys.stderr)
        cold_t = hyperfine(cold, args.runs, work / "cold.json")
        subprocess.run(bake, shell=True, check=True, capture_output=True)
        if docker:
            subprocess.run(dbuild, shell=True, check=True)
        warm: dict[str, tuple[str, str | None]] = {
            "castiron bake (unchanged)": (bake, None),
            "tar | gzip -6": (floor, None),
        }
        if docker:
            warm["docker build (cached)"] = (dbuild, None)
        warm_t = hyperfine(warm, args.runs, work / "warm.json")
        if docker:
            subprocess.run(
                "docker image rm -f castiron-bench:latest",
                shell=True,
                capture_output=True,
                check=False,
            )
        floor_s = cold_t["tar | gzip -6"]
        print()
        print(f"machine: {machine()}")
        print(
            f"context: {FILES} files, {size / 1e6:.1f} MB (seed {SEED}); median of {args.runs} runs"
        )
        print()
        print(f"{'case':34} {'median s':>9} {'vs tar|gzip':>12}")
        for name, t in [*cold_t.items(), *warm_t.items()]:
            print(f"{name:34} {t:9.3f} {t / floor_s:11.2f}x")
        print()
        c = cold_t["castiron bake (cold)"]
        w = warm_t["castiron bake (unchanged)"]
        print(f"cold bake / floor      = {c / floor_s:.2f}x (goal <= 1.2x)")
        print(f"unchanged rebuild      = {w:.3f} s (goal <= 0.5 s)")
        if docker:
            print(f"cold bake / docker     = {c / cold_t['docker build --no-cache']:.2f}x")
            print(f"rebuild / docker cache = {w / warm_t['docker build (cached)']:.2f}x")
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
