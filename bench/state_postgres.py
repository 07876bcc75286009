#!/usr/bin/env python3
"""Team state benchmark: PostgreSQL next to SQLite, in the same run, on the same machine.

    python bench/state_postgres.py [--deploys 8] [--entries 100000] [--writers 20]
                                   [--appends 50] [--runs 10] [--only deploy|verify|writers]

Starts its own PostgreSQL server (Debian's ``postgresql`` binaries, a throwaway data
directory, 127.0.0.1 on a free port, with its default durability: fsync on) and measures:

* **deploy**: the real ``castiron deploy`` of a tiny app on the local runtime, ``--deploys``
  times per backend, alternating the backends deploy by deploy (same machine load); the
  median command time of each, and the difference (PostgreSQL's overhead per deploy);
* **status**: ``castiron status staging`` on the idle environment, with hyperfine, both
  backends in one hyperfine run;
* **audit verify**: a chain of ``--entries`` entries (built as bench/audit_verify.py builds it),
  moved into PostgreSQL with ``castiron state migrate`` (timed too), then
  ``castiron audit verify`` on PostgreSQL next to ``sha256sum`` of the JSONL export (target:
  at most 3x), and next to ``audit verify`` on SQLite;
* **writers**: ``--writers`` processes appending ``--appends`` audited mutations each at the
  same time to one PostgreSQL database (and, for reference, to one SQLite file), each
  connected and warmed up (one append) before the start; appends/s from the start until the
  last writer is done, then ``audit verify`` (no fork, no gap).

Only loopback and temporary directories are touched; everything is removed afterwards.
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
import textwrap
import time
from pathlib import Path

from _machine import cpu_model
from audit_verify import build_chain

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the throwaway server the tests use
from castiron.ports import free_port  # noqa: E402
from pgserver import PostgresServer, find_bin  # noqa: E402

APP = textwrap.dedent(
    """
    import os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ.get("VERSION", "?") + "\\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever(0.05)
    """
)

SPEC = """
app: bench
image:
  context: ./app
  entrypoint: ["python3", "app.py"]
service:
  port: 8000
  replicas: 1
  health: {{http: /, interval: 100ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
environments:
  staging:
    listen: 127.0.0.1:{port}
    drain_timeout: 0s
    keep_warm: 0s
    isolation: none
"""

WRITER = textwrap.dedent(
    """
    import os, sys
    from castiron.settings import load_settings
    from castiron.state.base import AuditDraft, EventRow
    from castiron.state.store import open_state

    who, count = sys.argv[1], int(sys.argv[2])
    with open_state(load_settings(os.environ), actor=who) as store:
        store.mutate(AuditDraft("bench.ready", subject=who), lambda tx: None)  # key loaded
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(count):
            store.mutate(
                AuditDraft("bench.write", environment="staging", subject=f"{who}-{i}"),
                lambda tx, i=i: tx.add_event(
                    EventRow(store.clock.now(), "staging", "bench", f"{who} {i}")
                ),
            )
    """
)


def machine() -> str:
    return (
        f"{os.cpu_count()} CPU ({cpu_model()}), kernel {platform.release()}, "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"
    )


def cli() -> list[str]:
    script = Path(sys.executable).with_name("castiron")
    return [str(script)] if script.exists() else [sys.executable, "-m", "castiron.cli.main"]


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*cli(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise SystemExit(f"castiron {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def project(root: Path, state: str | None) -> dict[str, str]:
    (root / "app").mkdir(parents=True)
    (root / "app" / "app.py").write_text(APP)
    (root / "castiron.yaml").write_text(SPEC.format(port=free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
    env.update({"CASTIRON_HOME": str(root / ".castiron"), "NO_COLOR": "1"})
    if state is not None:
        env["CASTIRON_STATE"] = state
    return env


def hyperfine(commands: list[str], runs: int, out: Path, env: dict[str, str]) -> list[float]:
    subprocess.run(
        ["hyperfine", "--style", "basic", "-N", "--warmup", "2", "--runs", str(runs),
         "--export-json", str(out), *commands],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return [r["mean"] for r in json.loads(out.read_text())["results"]]


def bench_deploys(tmp: Path, url: str, deploys: int, runs: int) -> dict[str, float]:
    envs = {"sqlite": project(tmp / "p-sqlite", None), "postgresql": project(tmp / "p-pg", url)}
    roots = {"sqlite": tmp / "p-sqlite", "postgresql": tmp / "p-pg"}
    times: dict[str, list[float]] = {name: [] for name in envs}
    try:
        for name, env in envs.items():
            run(env, roots[name], "bake", "--tag", "v1")
            run(env, roots[name], "deploy", "staging", "--image", "v1", "--yes")  # agent up
        for i in range(deploys):
            for name, env in envs.items():
                start = time.perf_counter()
                run({**env, "VERSION": f"v{i + 2}"}, roots[name], "deploy", "staging", "--yes")
                times[name].append(time.perf_counter() - start)
        out: dict[str, float] = {f"deploy_{n}": statistics.median(t) for n, t in times.items()}
        if shutil.which("hyperfine"):
            commands = [
                f"env CASTIRON_HOME={envs[n]['CASTIRON_HOME']} "
                + (f"CASTIRON_STATE={url} " if n == "postgresql" else "")
                + f"{' '.join(cli())} -f {roots[n] / 'castiron.yaml'} status staging"
                for n in envs
            ]
            sq, pg = hyperfine(commands, runs * 2, tmp / "status.json", envs["sqlite"])
            out.update({"status_sqlite": sq, "status_postgresql": pg})
        return out
    finally:
        for name, env in envs.items():
            subprocess.run([*cli(), "down", "staging", "--yes"], env=env, cwd=roots[name],
                           capture_output=True, check=False)  # fmt: skip
            subprocess.run([*cli(), "agent", "stop"], env=env, cwd=roots[name],
                           capture_output=True, check=False)  # fmt: skip


def bench_verify(tmp: Path, server: PostgresServer, entries: int, runs: int) -> dict[str, float]:
    home = tmp / "audit-home"
    build_chain(home, entries)
    env = {**os.environ, "CASTIRON_HOME": str(home), "NO_COLOR": "1"}
    env.pop("CASTIRON_STATE", None)
    url = server.create_database("audit_bench")
    start = time.perf_counter()
    run(env, tmp, "state", "migrate", "--from", f"sqlite:{home / 'state.db'}", "--to", url)
    migrate_s = time.perf_counter() - start
    export = tmp / "audit.jsonl"
    pg_env = {**env, "CASTIRON_STATE": url}
    run(pg_env, tmp, "audit", "export", "-o", str(export))
    said = run(pg_env, tmp, "audit", "verify").stdout.strip()
    print(f"audit verify on PostgreSQL says: {said}")
    # The SQLite reference: the same chain in a home of its own.
    sqlite_home = tmp / "audit-sqlite"
    build_chain(sqlite_home, entries)
    commands = [
        f"env CASTIRON_STATE={url} CASTIRON_HOME={home} {' '.join(cli())} audit verify",
        f"sha256sum {export}",
        f"env CASTIRON_HOME={sqlite_home} {' '.join(cli())} audit verify",
    ]
    pg_s, floor_s, sqlite_s = hyperfine(commands, runs, tmp / "verify.json", env)
    return {
        "migrate": migrate_s,
        "verify_postgresql": pg_s,
        "sha256sum": floor_s,
        "verify_sqlite": sqlite_s,
        "export_mb": export.stat().st_size / 1e6,
    }


def bench_writers(tmp: Path, state: str | None, writers: int, appends: int) -> tuple[float, str]:
    home = tmp / f"writers-{'pg' if state else 'sqlite'}"
    env = {**os.environ, "CASTIRON_HOME": str(home), "NO_COLOR": "1"}
    env.pop("CASTIRON_STATE", None)
    if state is not None:
        env["CASTIRON_STATE"] = state
    run(env, tmp, "lock", "acquire", "staging", "-m", "bench")  # creates the key and the schema
    run(env, tmp, "lock", "release", "staging")
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, f"w{n}", str(appends)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for n in range(writers)
    ]  # fmt: skip
    for proc in procs:  # every writer connected, key loaded, one entry appended
        assert proc.stdout is not None
        if proc.stdout.readline() != "ready\n":
            raise SystemExit("a writer failed to start")
    start = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise SystemExit("a writer failed")
    elapsed = time.perf_counter() - start
    verdict = run(env, tmp, "audit", "verify").stdout.strip()
    return writers * appends / elapsed, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploys", type=int, default=8)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=20)
    parser.add_argument("--appends", type=int, default=50)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--only", choices=["deploy", "verify", "writers"], default=None)
    args = parser.parse_args()
    want = {args.only} if args.only else {"deploy", "verify", "writers"}
    bin_dir = find_bin()
    if bin_dir is None:
        print("PostgreSQL is not installed (apt-get install postgresql)")
        return 1
    print(f"machine: {machine()}, PostgreSQL {bin_dir.parent.name}")
    server = PostgresServer(bin_dir, durable=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="castiron-bench-state-"))
    d: dict[str, float] = {}
    v: dict[str, float] = {}
    rates: list[tuple[str, float, str]] = []
    try:
        if "deploy" in want:
            url = server.create_database("deploy_bench")
            d = bench_deploys(tmp, url, args.deploys, args.runs)
        if "verify" in want:
            v = bench_verify(tmp, server, args.entries, args.runs)
        if "writers" in want:
            url = server.create_database("writers_bench")
            rates.append(("PostgreSQL", *bench_writers(tmp, url, args.writers, args.appends)))
            rates.append(("SQLite", *bench_writers(tmp, None, args.writers, args.appends)))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def ms(s: float) -> str:
        return f"{s * 1000:.0f} ms"

    print()
    if d:
        print(f"deploy (median of {args.deploys}):  SQLite {ms(d['deploy_sqlite'])}, "
              f"PostgreSQL {ms(d['deploy_postgresql'])}, "
              f"difference {ms(d['deploy_postgresql'] - d['deploy_sqlite'])}")  # fmt: skip
    if "status_sqlite" in d:
        print(f"status (hyperfine mean):       SQLite {ms(d['status_sqlite'])}, "
              f"PostgreSQL {ms(d['status_postgresql'])} "
              f"({d['status_postgresql'] / d['status_sqlite']:.2f}x)")  # fmt: skip
    if v:
        print(f"state migrate {args.entries} entries: {v['migrate']:.2f} s")
        print(f"audit verify {args.entries} (hyperfine mean): PostgreSQL "
              f"{v['verify_postgresql']:.3f} s, SQLite {v['verify_sqlite']:.3f} s, sha256sum of "
              f"the {v['export_mb']:.1f} MB export {v['sha256sum']:.3f} s")  # fmt: skip
        ratio = v["verify_postgresql"] / v["sha256sum"]
        print(f"ratio PostgreSQL verify / sha256sum: {ratio:.1f}x "
              f"({'meets' if ratio <= 3 else 'MISSES'} the <= 3x target)")  # fmt: skip
    for name, rate, verdict in rates:
        print(f"{args.writers} writers x {args.appends} appends, {name}: {rate:.0f} appends/s "
              f"({verdict})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
