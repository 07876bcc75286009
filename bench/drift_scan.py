"""Benchmark: filesystem drift scans next to sha256sum, openssl and AIDE over the same files.

Generates, with a fixed seed, a tree of 20,000 files totalling 1 GB (sizes log-normal, bytes
random so nothing compresses) and a tree of 100,000 small files, with their file manifests
(``castiron.images.manifest`` JSON, as an image carries). Reads every file once so that all
tools run with a warm page cache, then runs each measurement ``--runs`` times (round-robin over
the tools; the median is reported) in a child process, side by side:

* ``sha256sum`` (coreutils) over the files: ``find -type f -print0 | xargs -0 sha256sum``;
* ``openssl dgst -sha256`` over the same files (many files per invocation);
* ``aide --check`` with a minimal aide.conf for the tree (database initialised first, only the
  check is timed), when AIDE is installed (``apt-get install aide``);
* ``castiron full scan`` (:func:`castiron.engine.fsdrift.scan_full`) with 1 and 2 threads:
  load the manifest, walk, re-hash every file, compare. The manifest is loaded as the product
  loads it (:func:`castiron.images.manifest.file_index`): from the store's index cache, written
  by the first scan of a release; one more row times that first scan (manifest decoded from its
  JSON) on one thread;
* ``openssl speed -evp sha256`` with 1 and with ``nproc`` processes: the hashing ceiling the
  machine offers to one core and to all of them while the benchmark runs;
* ``castiron fast scan`` (:func:`castiron.engine.fsdrift.scan_fast`) of the unchanged 20,000-
  and 100,000-file trees against a baseline taken beforehand.

Prints the machine, the load average, and per tool the median wall time, CPU time (user +
system, children included) and throughput, with ratios to openssl. Everything lives in a
temporary directory (under ``--dir``, default ``$TMPDIR`` or /tmp) removed at the end.

    .venv/bin/python bench/drift_scan.py [--dir /tmp] [--runs 3] [--files 20000] [--mb 1000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from _machine import cpu_model

from castiron.engine import fsdrift
from castiron.images import manifest as file_manifest
from castiron.images.manifest import FileEntry

SEED = 20240601
POOL = 64 << 20


def machine() -> str:
    cpu = cpu_model()
    return (
        f"nproc {os.cpu_count()}, {cpu}, kernel {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def openssl_speed(procs: int) -> float:
    """SHA-256 throughput (GB/s, 1 MiB blocks) of ``procs`` openssl processes together: the
    ceiling the machine offers to one and to several cores right now."""
    cmd = ["openssl", "speed", "-evp", "sha256", "-bytes", "1048576", "-seconds", "2"]
    if procs > 1:
        cmd[2:2] = ["-multi", str(procs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("sha256")][-1]
    return float(line.split()[-1].rstrip("k")) * 1000 / 1e9


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])
    except OSError:
        return "unknown"


# --- trees -------------------------------------------------------------------------------


def generate(root: Path, files: int, total: int, seed: int) -> dict[str, FileEntry]:
    """``files`` files totalling about ``total`` bytes under ``root``; returns the manifest."""
    rng = random.Random(seed)
    pool = rng.randbytes(min(POOL, max(total, 1 << 20)))
    weights = [rng.lognormvariate(0, 1.5) for _ in range(files)]
    scale = total / sum(weights)
    entries: dict[str, FileEntry] = {}
    per_dir = 100
    for i, weight in enumerate(weights):
        rel = f"srv/d{i // (per_dir * 10):03}/s{(i // per_dir) % 10}/f{i:06}.bin"
        path = root / rel
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            parts = rel.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                d = "/" + "/".join(parts[:depth])
                entries.setdefault(d, FileEntry(d, "dir", 0o755))
        size = int(weight * scale)
        offset = rng.randrange(len(pool))
        h = hashlib.sha256()
        with open(path, "wb") as out:
            left = size
            while left:
                chunk = memoryview(pool)[offset : offset + left]
                out.write(chunk)
                h.update(chunk)
                left -= len(chunk)
                offset = 0
        os.chmod(path, 0o644)
        entries["/" + rel] = FileEntry("/" + rel, "file", 0o644, size, h.hexdigest())
    for d in entries:
        if entries[d].type == "dir":
            os.chmod(root / d.lstrip("/"), 0o755)
    return entries


def write_manifest(entries: Mapping[str, FileEntry], out: Path) -> None:
    """The manifest's JSON (as an image carries it) and, next to it, its index cache (as the
    store keeps it after the first scan of a release)."""
    out.write_bytes(file_manifest.encode(entries))
    index = file_manifest.decode_index(out.read_bytes(), str(out))
    out.with_suffix(".idx").write_bytes(file_manifest.encode_index_cache(index))


def warm(root: Path, listing: Path) -> None:
    """Read every file once so that every tool runs on a warm page cache."""
    with open(listing, "wb") as out:
        subprocess.run(["find", str(root), "-type", "f", "-print0"], stdout=out, check=True)
    subprocess.run(f"xargs -0 cat < {listing} > /dev/null", shell=True, check=True, cwd=root.parent)


# --- measuring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    inner: float | None
    inner_cpu: float | None


def run_once(cmd: Sequence[str] | str) -> Run:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        shell=isinstance(cmd, str),
        capture_output=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {cmd}\n{proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    inner = inner_cpu = None
    if proc.stdout.startswith(b"{"):
        doc = json.loads(proc.stdout)
        inner, inner_cpu = float(doc["scan_s"]), float(doc["scan_cpu_s"])
    return Run(wall, cpu, inner, inner_cpu)


@dataclass(frozen=True)
class Row:
    name: str
    wall: float
    cpu: float
    inner: float | None
    inner_cpu: float | None
    nbytes: int


@dataclass(frozen=True)
class Job:
    name: str
    cmd: Sequence[str] | str
    nbytes: int


def measure(jobs: Sequence[Job], runs: int) -> list[Row]:
    """Run every job ``runs`` times, round-robin (so load changes hit every tool alike)."""
    results: dict[str, list[Run]] = {job.name: [] for job in jobs}
    for _ in range(runs):
        for job in jobs:
            results[job.name].append(run_once(job.cmd))
    rows = []
    for job in jobs:
        done = results[job.name]
        inner = [r.inner for r in done if r.inner is not None]
        inner_cpu = [r.inner_cpu for r in done if r.inner_cpu is not None]
        row = Row(
            job.name,
            statistics.median(r.wall for r in done),
            statistics.median(r.cpu for r in done),
            statistics.median(inner) if inner else None,
            statistics.median(inner_cpu) if inner_cpu else None,
            job.nbytes,
        )
        walls = ", ".join(f"{r.wall:.3f}" for r in done)
        print(f"  {job.name}: wall {walls} s -> median {row.wall:.3f} s", flush=True)
        rows.append(row)
    return rows


def scan_child(argv: list[str]) -> None:
    """``--scan full|fast``: one scan in this process; prints its own timing as JSON."""
    parser = argparse.ArgumentParser(prog="drift_scan.py --scan")
    parser.add_argument("mode", choices=["full", "fast"])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--index", type=Path, help="the manifest's index cache, when warm")
    args = parser.parse_args(argv)

    def load() -> Mapping[str, FileEntry]:
        if args.index is not None:
            index = file_manifest.decode_index_cache(args.index.read_bytes())
            if index is None:
                raise SystemExit(f"{args.index}: not an intact index cache")
            return index
        return file_manifest.decode_index(args.manifest.read_bytes(), str(args.manifest))

    start, cpu = time.perf_counter(), time.process_time()
    if args.mode == "full":
        result = fsdrift.scan_full(
            args.root, load, instance="bench", threads=args.threads, read_only=False
        )
    else:
        result = fsdrift.scan_fast(
            args.root, load, args.baseline, instance="bench", read_only=False
        )
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if result.findings:
        raise SystemExit(f"unexpected drift: {result.findings[:3]}")
    stats = result.stats
    print(
        json.dumps(
            {
                "scan_s": elapsed,
                "scan_cpu_s": cpu,
                "entries": stats.entries,
                "hashed": stats.hashed_files,
            }
        )
    )


def aide_jobs(work: Path, root: Path, nbytes: int) -> list[Job]:
    if shutil.which("aide") is None:
        print("  aide: not installed (apt-get install aide); skipped")
        return []
    conf = work / "aide.conf"
    conf.write_text(
        f"database_in=file:{work}/aide.db\n"
        f"database_out=file:{work}/aide.db.new\n"
        "gzip_dbout=no\n"
        "report_url=stdout\n"
        "num_workers=1\n"
        "Bench = p+i+n+u+g+s+m+c+sha256\n"
        f"{root} Bench\n",
        encoding="utf-8",
    )
    subprocess.run(["aide", "--init", f"--config={conf}"], stdout=subprocess.DEVNULL, check=True)
    os.replace(work / "aide.db.new", work / "aide.db")
    return [Job("aide --check", ["aide", "--check", f"--config={conf}"], nbytes)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--scan":
        scan_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--mb", type=int, default=1000, help="size of the big tree in MB")
    parser.add_argument("--fast-files", type=int, default=100_000)
    args = parser.parse_args()

    py = sys.executable
    me = str(Path(__file__).resolve())
    print(f"machine: {machine()}")
    openssl_version = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    coreutils = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True)
    print(f"tools: {openssl_version.stdout.strip()}; {coreutils.stdout.splitlines()[0]}")
    print(f"load average at start: {loadavg()}")
    ncpu = os.cpu_count() or 1
    print(
        f"openssl speed sha256 (1 MiB blocks): 1 process {openssl_speed(1):.2f} GB/s, "
        f"{ncpu} processes together {openssl_speed(ncpu):.2f} GB/s"
    )
    work = Path(tempfile.mkdtemp(prefix="castiron-bench-drift.", dir=args.dir))
    try:
        big, small = work / "big", work / "small"
        t = time.perf_counter()
        big_entries = generate(big, args.files, args.mb * 1_000_000, SEED)
        small_entries = generate(small, args.fast_files, args.fast_files * 1024, SEED + 1)
        write_manifest(big_entries, work / "big.files.json")
        write_manifest(small_entries, work / "small.files.json")
        nbytes = sum(e.size for e in big_entries.values())
        print(
            f"trees: {args.files} files / {nbytes / 1e9:.2f} GB and {args.fast_files} files "
            f"generated in {time.perf_counter() - t:.1f} s under {work}"
        )
        warm(big, work / "big.list")
        warm(small, work / "small.list")
        print("page cache: warm (every file read once before timing; same for every tool)")

        baselines = {}
        for name, root in (("big", big), ("small", small)):
            t = time.perf_counter()
            count = fsdrift.take_baseline(root, work / f"{name}.baseline")
            baselines[name] = work / f"{name}.baseline"
            size = baselines[name].stat().st_size
            print(f"baseline {name}: {count} paths, {size} bytes, {time.perf_counter() - t:.3f} s")

        listing = work / "big.list"
        jobs = [
            Job("sha256sum", f"xargs -0 sha256sum < {listing} > /dev/null", nbytes),
            Job(
                "openssl dgst -sha256",
                f"xargs -0 openssl dgst -sha256 < {listing} > /dev/null",
                nbytes,
            ),
            *aide_jobs(work, big, nbytes),
        ]
        for threads in (1, 2):
            cmd = [py, me, "--scan", "full", "--root", str(big)]
            cmd += ["--manifest", str(work / "big.files.json"), "--threads", str(threads)]
            cmd += ["--index", str(work / "big.files.idx")]
            jobs.append(Job(f"castiron full scan, {threads} thread(s)", cmd, nbytes))
        cmd = [py, me, "--scan", "full", "--root", str(big)]
        cmd += ["--manifest", str(work / "big.files.json"), "--threads", "1"]
        jobs.append(Job("castiron full scan, 1 thread, first scan (manifest JSON)", cmd, nbytes))
        print(f"\nfull scans of {args.files} files / {nbytes / 1e9:.2f} GB ({args.runs} runs):")
        rows = measure(jobs, args.runs)
        fast_jobs = []
        for name, root, count in (("big", big, args.files), ("small", small, args.fast_files)):
            cmd = [py, me, "--scan", "fast", "--root", str(root)]
            cmd += ["--manifest", str(work / f"{name}.files.json")]
            cmd += ["--baseline", str(baselines[name])]
            cmd += ["--index", str(work / f"{name}.files.idx")]
            fast_jobs.append(Job(f"castiron fast scan, {count} files", cmd, 0))
        print(f"\nfast scans of unchanged trees ({args.runs} runs):")
        fast_rows = measure(fast_jobs, args.runs)
        print(f"load average at end: {loadavg()}")

        openssl = next(r for r in rows if r.name.startswith("openssl"))
        print(
            "\n| tool | wall | CPU | GB/s | vs openssl | scan only: wall | CPU | "
            "vs openssl (wall) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows + fast_rows:
            gbs = f"{r.nbytes / r.wall / 1e9:.2f}" if r.nbytes else "—"
            vs = f"{openssl.wall / r.wall:.2f}x" if r.nbytes else "—"
            inner = f"{r.inner:.3f} s" if r.inner is not None else "—"
            inner_cpu = f"{r.inner_cpu:.3f} s" if r.inner_cpu is not None else "—"
            ratio = f"{openssl.wall / r.inner:.2f}x" if r.inner is not None and r.nbytes else "—"
            print(
                f"| {r.name} | {r.wall:.3f} s | {r.cpu:.3f} s | {gbs} | {vs} | {inner} | "
                f"{inner_cpu} | {ratio} |"
            )
        print("(medians; wall and CPU of the whole process, children included; scan only:")
        print(" measured inside the castiron process, without interpreter start and imports)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
