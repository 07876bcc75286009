#!/usr/bin/env python3
"""Benchmark `castiron push` / `castiron pull` against `skopeo copy` on a loopback registry.

Generates a 60 MB / 5,000-file context (mixed text and random bytes, fixed seed), bakes it
with castiron into 5 layers (split by directory), starts Debian's `docker-registry` on
127.0.0.1 (plain HTTP, a free port, storage in the work directory) and times, side by side in
one run, median of --runs:

  push       castiron push v1 REG/bench:v1   vs  skopeo copy oci:STORE:v1 docker://REG/bench:v1
             (a fresh, empty registry for every run, so nothing can be skipped or mounted)
  pull       castiron pull REG/bench:v1 (empty store)  vs  skopeo copy docker://… oci:EMPTY:v1
  re-push    the same push again, unchanged (both ask the registry what it has)
  one file   bake v2 with one file changed, push it to the same repository: what each sends
  library    castiron's push()/pull() called in-process (the same transfer, no start-up)

Every figure is a whole CLI process (start-up included; castiron's modules byte-compiled, as
an installed package has them). castiron's bytes come from its
`--json`; the registry's access log counts the blob uploads of each tool.

Usage: python3 bench/registry.py [--runs N] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _machine import cpu_model

from castiron.ports import free_port

FILES = 5_000
TOTAL_BYTES = 60 * 1024 * 1024
SEED = 20241206
WORDS = ["push", "pull", "blob", "layer", "digest", "manifest", "registry", "mount", "tag"]
REGISTRY = "/usr/bin/docker-registry"


def generate(ctx: Path) -> int:
    """Write the context: 50 directories, 60 % compressible text; returns its size."""
    rng = random.Random(SEED)
    per_file = TOTAL_BYTES // FILES
    total = 0
    for i in range(FILES):
        d = ctx / f"pkg{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randint(per_file // 2, per_file * 3 // 2)
        if i % 5 < 3:
            words = []
            n = 0
            while n < size:
                w = rng.choice(WORDS)
                words.append(w)
                n += len(w) + 1
            data = " ".join(words).encode()[:size]
        else:
            data = rng.randbytes(size)
        (d / f"f{i:05d}.dat").write_bytes(data)
        total += len(data)
    return total


def machine() -> str:
    py = platform.python_version()
    skopeo = subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout
    return (
        f"{os.cpu_count()} CPU ({cpu_model()}), Linux {platform.release()}, Python {py}, "
        f"{skopeo.strip()}, docker-registry (distribution) 2.8"
    )


@contextlib.contextmanager
def registry(work: Path) -> Iterator[tuple[str, Path]]:
    """A fresh registry (empty storage); yields (host, access log)."""
    data = work / f"registry-{time.monotonic_ns()}"
    data.mkdir(parents=True)
    port = free_port()
    config = data / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {data}/store\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = data / "access.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(data, ignore_errors=True)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def library(store: Path, ref: str, work: Path, what: str) -> float:
    """Seconds for castiron's push()/pull() called in-process (no interpreter start-up)."""
    from castiron.images.registry import parse_reference, pull, push
    from castiron.images.store import ImageStore

    images = ImageStore(store)
    start = time.perf_counter()
    if what == "push":
        push(images, images.resolve("v1"), parse_reference(ref), environ={})
    else:
        target = work / f"lib-pull-{time.monotonic_ns()}"
        pull(ImageStore(target), parse_reference(ref), environ={})
    elapsed = time.perf_counter() - start
    if what == "pull":
        shutil.rmtree(target, ignore_errors=True)
    return elapsed


def uploads(log: Path) -> int:
    return sum(
        1
        for line in log.read_text(errors="replace").splitlines()
        if '"PUT /v2/' in line and "/blobs/uploads/" in line
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per case (median reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    for tool in ("skopeo", REGISTRY):
        if shutil.which(tool) is None:
            print(f"{tool} is required (apt-get install skopeo docker-registry)", file=sys.stderr)
            return 2
    castiron = shutil.which("castiron") or str(Path(sys.executable).parent / "castiron")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="castiron-bench-registry-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    env = {**os.environ, "CASTIRON_HOME": str(home), "NO_COLOR": "1"}
    env.pop("CASTIRON_REGISTRY_USERNAME", None)
    # Time castiron as installed (pip writes .pyc files), not recompiled on every start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    import castiron as package

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(Path(package.__file__).parent)],
        check=True,
        env=env,
    )
    try:
        ctx = work / "ctx"
        shutil.rmtree(ctx, ignore_errors=True)
        size = generate(ctx)
        layers = ", ".join(f'"pkg{d}*/**"' for d in range(4))
        (work / "castiron.yaml").write_text(
            "app: bench\nimage:\n  context: ./ctx\n  entrypoint: [/app/run]\n"
            f"  layers: [{layers}]\n"
        )
        spec = str(work / "castiron.yaml")
        bake = [castiron, "-f", spec, "bake", "--source-date-epoch", "0", "--json"]
        shutil.rmtree(home, ignore_errors=True)
        v1 = json.loads(
            subprocess.run(
                [*bake, "--tag", "v1"], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        store = home / "images"
        hints = store / "cache" / "registry-blobs.json"
        print(f"image: {len(v1['layers'])} layers, machine: {machine()}", file=sys.stderr)
        rows: dict[str, list[float]] = {
            k: []
            for k in (
                "castiron push",
                "skopeo copy (push)",
                "castiron pull",
                "skopeo copy (pull)",
                "castiron re-push",
                "skopeo re-push",
                "push() in-process",
                "pull() in-process",
                "castiron version",
            )
        }
        sent_one_file: dict[str, object] = {}
        for run in range(args.runs):
            rows["castiron version"].append(timed([castiron, "version"], env)[0])
            # the library alone (no interpreter start-up), into its own fresh registry
            with registry(work) as (host, _):
                hints.unlink(missing_ok=True)
                rows["push() in-process"].append(library(store, f"{host}/lib:v1", work, "push"))
                rows["pull() in-process"].append(library(store, f"{host}/lib:v1", work, "pull"))
            for tool in ("castiron", "skopeo"):
                with registry(work) as (host, log):
                    ref = f"{host}/bench:v1"
                    hints.unlink(missing_ok=True)
                    if tool == "castiron":
                        t, _ = timed([castiron, "push", "v1", ref, "--json"], env)
                        rows["castiron push"].append(t)
                    else:
                        t, _ = timed(
                            [
                                "skopeo",
                                "copy",
                                "-q",
                                "--dest-tls-verify=false",
                                f"oci:{store}:v1",
                                f"docker://{ref}",
                            ],
                            env,
                        )
                        rows["skopeo copy (push)"].append(t)
                    # pull what this tool pushed, into empty destinations
                    pull_home = work / f"pull-{run}-{tool}"
                    if tool == "castiron":
                        t, _ = timed(
                            [castiron, "pull", ref, "--json"],
                            {**env, "CASTIRON_HOME": str(pull_home)},
                        )
                        rows["castiron pull"].append(t)
                    else:
                        t, _ = timed(
                            [
                                "skopeo",
                                "copy",
                                "-q",
                                "--src-tls-verify=false",
                                f"docker://{ref}",
                                f"oci:{pull_home}:v1",
                            ],
                            env,
                        )
                        rows["skopeo copy (pull)"].append(t)
                    shutil.rmtree(pull_home, ignore_errors=True)
                    if tool == "castiron":
                        t, _ = timed([castiron, "push", "v1", ref, "--json"], env)
                        rows["castiron re-push"].append(t)
                    else:
                        t, _ = timed(
                            [
                                "skopeo",
                                "copy",
                                "-q",
                                "--dest-tls-verify=false",
                                f"oci:{store}:v1",
                                f"docker://{ref}",
                            ],
                            env,
                        )
                        rows["skopeo re-push"].append(t)
        # one changed file: v2 differs from v1 in one layer
        changed = ctx / "pkg49" / "f04999.dat"
        changed.write_bytes(changed.read_bytes() + b" changed")
        v2 = json.loads(
            subprocess.run(
                [*bake, "--tag", "v2"], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        new_layers = {x["digest"] for x in v2["layers"]} - {x["digest"] for x in v1["layers"]}
        for tool in ("castiron", "skopeo"):
            with registry(work) as (host, log):
                hints.unlink(missing_ok=True)
                timed([castiron, "push", "v1", f"{host}/bench:v1"], env)
                before = uploads(log)
                if tool == "castiron":
                    t, out = timed([castiron, "push", "v2", f"{host}/bench:v2", "--json"], env)
                    report = json.loads(out)
                    sent_one_file["castiron bytes"] = report["bytes_sent"]
                else:
                    t, _ = timed(
                        [
                            "skopeo",
                            "copy",
                            "-q",
                            "--dest-tls-verify=false",
                            f"oci:{store}:v2",
                            f"docker://{host}/bench:v2",
                        ],
                        env,
                    )
                sent_one_file[f"{tool} seconds"] = t
                sent_one_file[f"{tool} blob uploads"] = uploads(log) - before
        print()
        print(f"machine: {machine()}")
        print(
            f"image: {FILES} files, {size / 1e6:.1f} MB in {len(v1['layers'])} layers "
            f"(seed {SEED}); median of {args.runs} runs"
        )
        print()
        print(f"{'case':24} {'median s':>9} {'vs skopeo':>10}")
        version = statistics.median(rows["castiron version"])
        print(f"{'castiron version':24} {version:9.3f}   (interpreter + CLI start-up floor)")
        for name in ("push() in-process", "pull() in-process"):
            theirs = "skopeo copy (push)" if "push" in name else "skopeo copy (pull)"
            a, b = statistics.median(rows[name]), statistics.median(rows[theirs])
            print(f"{name:24} {a:9.3f} {a / b:9.2f}x  (vs {theirs})")
        pairs = [
            ("castiron push", "skopeo copy (push)"),
            ("castiron pull", "skopeo copy (pull)"),
            ("castiron re-push", "skopeo re-push"),
        ]
        for ours, theirs in pairs:
            a, b = statistics.median(rows[ours]), statistics.median(rows[theirs])
            print(f"{ours:24} {a:9.3f} {a / b:9.2f}x")
            print(f"{theirs:24} {b:9.3f} {1:9.2f}x")
        print()
        print(
            f"one-file change: {len(new_layers)} new layer; castiron uploaded "
            f"{sent_one_file['castiron blob uploads']} blobs "
            f"({sent_one_file['castiron bytes']} bytes) in "
            f"{sent_one_file['castiron seconds']:.3f} s; skopeo uploaded "
            f"{sent_one_file['skopeo blob uploads']} blobs in "
            f"{sent_one_file['skopeo seconds']:.3f} s"
        )
        return 0
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
