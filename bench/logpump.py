"""Benchmark: the log pump that masks an instance's secrets, next to ``sed`` and ``cat``.

An instance with secrets writes its output through ``python -m castiron.agent.logpump``, which
replaces every secret value with ``***`` before the bytes reach the log file (even a value cut
across two writes). This measures its throughput on a generated log (lines of typical app
output, one in 50 holding a secret) against, in the same run:

* ``sed -e 's/VALUE/***/g'`` - the classic stream editor doing the same masking, line by line
  (it cannot mask a value across a line break or a partial write, the pump can);
* ``cat``                    - the floor: a plain pipe copy, no masking.

Each tool reads the log from a pipe (fed by a thread, as an instance's output arrives) and
writes to a file in a temporary directory; the pump runs as the supervisor starts it (stdout
and stderr pipes, the values on their own descriptor). The outputs of the pump and of sed are
checked to be identical and free of the values.

    .venv/bin/python bench/logpump.py [--mib 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _machine import cpu_model

SECRETS = ["hunter2-db-Pa55w0rd", "tok_live_8d7f6e5d4c3b2a19"]


def make_log(path: Path, mib: int) -> None:
    lines = []
    for n in range(20_000):
        if n % 50 == 0:
            lines.append(f"{n:08d} INFO connecting to db with password {SECRETS[n % 2]}\n")
        else:
            lines.append(f"{n:08d} INFO GET /api/items/{n} 200 12.{n % 10}ms ua=curl/8.1\n")
    block = "".join(lines).encode()
    with path.open("wb") as out:
        written = 0
        while written < mib * 1024 * 1024:
            out.write(block)
            written += len(block)


def _feed(source: Path, fd: int) -> None:
    with source.open("rb") as src, open(fd, "wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)


def run_once(argv: list[str], source: Path, target: Path, extra_fds: tuple[int, ...] = ()) -> float:
    """Time ``argv`` reading ``source`` from a pipe (as an instance's output arrives) into
    ``target``. With ``extra_fds`` the pipe is passed as a ``--source-fd`` (the pump)."""
    read_end, write_end = os.pipe()
    if extra_fds:
        argv = [*argv, "--source-fd", str(read_end)]
    with target.open("wb") as dst:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL if extra_fds else read_end,
            stdout=dst,
            pass_fds=(*extra_fds, read_end) if extra_fds else (),
        )
        os.close(read_end)
        feeder = threading.Thread(target=_feed, args=(source, write_end))
        feeder.start()
        feeder.join()
        if proc.wait() != 0:
            raise SystemExit(f"{argv[0]} failed")
        return time.perf_counter() - started


def pump_once(source: Path, target: Path) -> float:
    """The pump as the supervisor runs it: two sources (stdout and stderr pipes; stderr
    stays silent here) and the values on their own descriptor."""
    values_read, values_write = os.pipe()
    os.write(values_write, json.dumps(SECRETS).encode())
    os.close(values_write)
    err_read, err_write = os.pipe()
    os.close(err_write)
    try:
        argv = [
            sys.executable,
            "-m",
            "castiron.agent.logpump",
            "--secrets-fd",
            str(values_read),
            "--source-fd",
            str(err_read),
        ]
        return run_once(argv, source, target, (values_read, err_read))
    finally:
        os.close(values_read)
        os.close(err_read)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="Size of the generated log.")
    parser.add_argument("--runs", type=int, default=5, help="Runs of each tool.")
    args = parser.parse_args()
    sed_script = ";".join(f"s/{v}/***/g" for v in SECRETS)
    work = Path(tempfile.mkdtemp(prefix="castiron-bench-pump-"))
    try:
        log = work / "app.log"
        make_log(log, args.mib)
        size = log.stat().st_size / (1024 * 1024)
        tools = {
            "castiron log pump": lambda out: pump_once(log, out),
            "sed (same masking)": lambda out: run_once(["sed", "-e", sed_script], log, out),
            "cat (no masking)": lambda out: run_once(["cat"], log, out),
        }
        times: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(args.runs):
            for name, tool in tools.items():  # interleaved: load changes hit all alike
                times[name].append(tool(work / f"{name.split()[0]}.out"))
        pumped = (work / "castiron.out").read_bytes()
        assert pumped == (work / "sed.out").read_bytes(), "pump and sed disagree"
        assert not any(v.encode() in pumped for v in SECRETS)
        print(
            f"machine: {os.cpu_count()} CPU, {cpu_model()}, Linux {platform.release()}, "
            f"Python {platform.python_version()}; log {size:.0f} MiB, {args.runs} runs each"
        )
        floor = statistics.median(times["cat (no masking)"])
        sed = statistics.median(times["sed (same masking)"])
        for name, runs in times.items():
            median = statistics.median(runs)
            print(
                f"{name:20s} median {median * 1000:8.1f} ms  {size / median:8.1f} MiB/s  "
                f"x{median / floor:5.1f} cat  x{median / sed:4.2f} sed"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
