"""Interleaved A/B of the builtin router: two source trees, same backend, same load, one run.

    python bench/router_ab.py OLD_SRC [NEW_SRC] [--rounds 6] [--duration 5]

OLD_SRC and NEW_SRC are ``src`` directories of two castiron checkouts (NEW_SRC defaults to
the installed package), e.g. ``git worktree add /tmp/base main`` then
``python bench/router_ab.py /tmp/base/src``. Each side runs the builtin router as its own
process in front of one shared backend (the one of ``bench/router.py``). Two measures, each
alternating between the sides (ABBA) so load from other work on the machine falls on both:
``wrk -t2 -c32`` throughput, and the router process's CPU time per request (user + system
from ``/proc/PID/stat``) at a fixed open-loop rate of 2000 req/s over 32 connections, which
busy neighbours disturb far less than throughput. Prints every run, each side's medians and
the ratios NEW/OLD.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import router as rb


def _spawn(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, rb.__file__, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"{args[0]} did not start")
    return proc


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("old_src")
    ap.add_argument("new_src", nargs="?")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {rb.machine()}")
    base = dict(os.environ)
    backend_port = rb.free_port()
    procs = [_spawn(base, "backend", str(backend_port))]
    workdir = tempfile.mkdtemp(prefix="castiron-bench-")
    sides = {"old": {**base, "PYTHONPATH": args.old_src}}
    sides["new"] = {**base, "PYTHONPATH": args.new_src} if args.new_src else base
    ports = {}
    pids = {}
    results: dict[str, list[float]] = {"old": [], "new": []}
    cpu: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for name, env in sides.items():
            ports[name] = rb.free_port()
            procs.append(
                proc := _spawn(
                    env,
                    "router",
                    "builtin",
                    f"127.0.0.1:{ports[name]}",
                    f"127.0.0.1:{backend_port}",
                    workdir,
                )
            )
            pids[name] = proc.pid
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            for name in order:
                r = rb.wrk(ports[name], args.duration, 32)
                results[name].append(r["rps"])
                before = _cpu_seconds(pids[name])
                rb.paced(ports[name], 2000, args.duration, 32)
                per_request = (_cpu_seconds(pids[name]) - before) / (2000 * args.duration) * 1e6
                cpu[name].append(per_request)
                print(
                    f"{name:4} {r['rps']:9.0f} req/s   p99 {r['p99_ms']:7.2f} ms   "
                    f"{per_request:6.1f} us CPU/request at 2000 req/s",
                    flush=True,
                )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for name, values in results.items():
        print(
            f"{name} median {statistics.median(values):.0f} req/s, "
            f"{statistics.median(cpu[name]):.1f} us CPU/request"
        )
    ratio = statistics.median(results["new"]) / statistics.median(results["old"])
    cpu_ratio = statistics.median(cpu["new"]) / statistics.median(cpu["old"])
    print(f"new/old throughput: {ratio:.3f}   new/old CPU per request: {cpu_ratio:.3f}")


if __name__ == "__main__":
    main()
