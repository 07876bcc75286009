"""Benchmark: verify a 100,000-entry audit chain, next to sha256sum over the same entries.

Builds a chain of N entries (default 100,000) in a temporary CASTIRON_HOME, exactly as the
store writes them (same canonical bytes, same hashes, a signed head in the database and in
the head file), exports it as JSONL, then times side by side with hyperfine (or, without it,
a plain timing loop):

* ``castiron audit verify``  - the whole command: start-up, read, re-hash, check the signature;
* ``sha256sum export.jsonl`` - the floor: hashing the same entries once, with no checks at all;

and the library call ``store.verify_audit()`` in-process. Prints the figures and the ratio.

    .venv/bin/python bench/audit_verify.py [--entries 100000] [--runs 10]

Only the local disk is touched; the temporary directory is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _machine import cpu_model

from castiron.state import audit
from castiron.state.base import format_time
from castiron.state.sqlite import open_state

ACTIONS = ("deploy.start", "deploy.step", "deploy.finish", "lock.acquire", "lock.release")


def machine() -> str:
    cpu = cpu_model()
    return (
        f"{os.cpu_count()} CPU ({cpu}), kernel {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def build_chain(home: Path, entries: int) -> Path:
    """Create a store with ``entries`` audit entries; returns the database path."""
    db = home / "state.db"
    open_state(db, actor="bench@host").close()  # created and migrated by the store itself
    key = audit.create_key(home / "audit.key")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    prev = audit.GENESIS
    rows = []
    for seq in range(1, entries + 1):
        env = "production" if seq % 3 == 0 else "staging"
        details = audit.canonical_json(
            {"deployment": f"d{seq // 5}", "step": seq % 5, "replicas": 3, "note": "héllo"}
        )
        row = (
            seq,
            format_time(start + timedelta(seconds=seq)),
            "alice@build-host",
            ACTIONS[seq % len(ACTIONS)],
            env,
            f"rel-{seq // 5:08d}",
            f"sha256:{seq - 1:064x}",
            f"sha256:{seq:064x}",
            "ok",
            details,
            prev,
        )
        prev = audit.entry_hash(prev, audit.canonical_bytes(row))
        rows.append((*row, prev))
    head = key.sign_head(entries, prev)
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute(
            "INSERT INTO audit_head VALUES (1, ?, ?, ?, ?)",
            (head.seq, head.hash, head.public_key, head.signature),
        )
    conn.close()
    audit.advance_head_file(audit.head_file_for(home / "audit.key"), head)
    return db


def castiron_command() -> list[str]:
    script = Path(sys.executable).with_name("castiron")
    return [str(script)] if script.exists() else [sys.executable, "-m", "castiron.cli.main"]


def time_runs(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def hyperfine(commands: list[str], runs: int, env: dict[str, str], out: Path) -> list[float]:
    subprocess.run(
        [
            "hyperfine",
            "--style",
            "basic",
            "--warmup",
            "1",
            "--runs",
            str(runs),
            "--export-json",
            str(out),
            *commands,
        ],
        check=True,
        env=env,
    )
    data = json.loads(out.read_text(encoding="utf-8"))
    return [r["mean"] for r in data["results"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="castiron-bench-audit-"))
    try:
        home = tmp / "home"
        t0 = time.perf_counter()
        db = build_chain(home, args.entries)
        print(
            f"built {args.entries} entries in {time.perf_counter() - t0:.2f}s "
            f"(state.db {db.stat().st_size / 1e6:.1f} MB)"
        )
        env = {**os.environ, "CASTIRON_HOME": str(home), "NO_COLOR": "1"}
        cli = castiron_command()
        export = tmp / "audit.jsonl"
        subprocess.run(
            [*cli, "audit", "export", "--format", "jsonl", "-o", str(export)], check=True, env=env
        )
        print(f"export {export.stat().st_size / 1e6:.1f} MB")
        check = subprocess.run([*cli, "audit", "verify"], env=env, capture_output=True, text=True)
        print(f"castiron audit verify says: {check.stdout.strip() or check.stderr.strip()}")
        if check.returncode != 0:
            return 1

        with open_state(db, actor="bench@host") as store:
            lib = []
            for _ in range(args.runs):
                start = time.perf_counter()
                report = store.verify_audit()
                lib.append(time.perf_counter() - start)
                assert report.ok and report.entries == args.entries
        verify_cmd = [*cli, "audit", "verify"]
        floor_cmd = ["sha256sum", str(export)]
        if shutil.which("hyperfine"):
            verify_s, floor_s = hyperfine(
                [" ".join(verify_cmd), " ".join(floor_cmd)], args.runs, env, tmp / "hf.json"
            )
            how = "hyperfine mean"
        else:
            verify_s = statistics.median(time_runs(verify_cmd, args.runs, env))
            floor_s = statistics.median(time_runs(floor_cmd, args.runs, env))
            how = "median"
        lib_s = statistics.median(lib)
        print()
        print(f"entries:                         {args.entries}")
        print(f"castiron audit verify (CLI):     {verify_s:.3f} s  ({how}, {args.runs} runs)")
        print(f"store.verify_audit() (library):  {lib_s:.3f} s  (median)")
        print(f"sha256sum over the JSONL export: {floor_s:.3f} s  ({how})")
        print(f"ratio CLI / sha256sum:           {verify_s / floor_s:.1f}x")
        print(f"ratio library / sha256sum:       {lib_s / floor_s:.1f}x")
        target = "meets" if verify_s <= 2.0 else "MISSES"
        print(f"target <= 2 s for 100k entries:  {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
