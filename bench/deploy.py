#!/usr/bin/env python3
"""Deploy and rollback benchmark: zero failed requests, deploy overhead, warm rollback time,
CLI start-up.

    python bench/deploy.py [--deploys 20] [--rollbacks 5] [--rate 100] [--no-hyperfine]

It copies the bundled example app into a temporary directory, bakes it, and drives the real
``castiron`` CLI (subprocesses) while a constant-rate client (new connection per request,
loopback only, bounded in count and time) sends GETs through the router and records which
release answered each one and whether it failed.

Figures:
* failed requests over all deploys and rollbacks (must be 0);
* deploy overhead = command start → first answer from the new release, minus the app's own
  time to become healthy (measured independently: the same app started directly, without
  castiron, with /healthz polled every 2 ms — once before each deploy, so both see the same
  machine load; the median is used);
* warm rollback = command start → first answer from the old release (then 100% of it), next to
  the CLI's own start-up (``castiron version``) as the floor;
* CLI start-up with hyperfine: ``castiron status`` on an idle environment vs ``castiron
  version`` vs ``python -c pass``.

castiron's modules are byte-compiled first (``compileall``), as ``pip install`` does: an
environment with ``PYTHONDONTWRITEBYTECODE`` set would otherwise recompile every module on
every command and measure the compiler, not castiron.
"""

from __future__ import annotations

import argparse
import compileall
import http.client
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
from dataclasses import dataclass, field
from pathlib import Path

from _machine import cpu_model

from castiron.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "src" / "castiron" / "examples" / "hello"
CLI = [sys.executable, "-m", "castiron.cli.main"]


def get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        conn.close()


@dataclass
class Load:
    """GETs at a constant rate (one every 1/rate s), bounded by max_requests and max_seconds."""

    port: int
    rate: float
    max_requests: int
    max_seconds: float
    samples: list[tuple[float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run(self) -> None:
        start = time.monotonic()
        period = 1.0 / self.rate
        for n in range(self.max_requests):
            due = start + n * period
            now = time.monotonic()
            if self._stop.is_set() or now - start > self.max_seconds:
                return
            if due > now:
                time.sleep(due - now)
            at = time.monotonic()
            try:
                status, body = get(self.port)
                self.samples.append((at, status == 200, body))
            except OSError as exc:
                self.samples.append((at, False, repr(exc)))

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def first_after(self, since: float, body: str) -> float | None:
        for at, ok, text in list(self.samples):
            if at >= since and ok and text == body:
                return at
        return None

    def failed(self) -> list[tuple[float, bool, str]]:
        return [s for s in self.samples if not s[1]]


def castiron(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"castiron {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def app_ready_times(project: Path, runs: int) -> list[float]:
    """Seconds from starting the app directly (no castiron) to /healthz answering 200."""
    times = []
    for _ in range(runs):
        port = free_port()
        env = {**os.environ, "PORT": str(port), "APP_VERSION": "x"}
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "server.py"],
            cwd=project / "app",
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while True:
                try:
                    if get(port, "/healthz", timeout=1)[0] == 200:
                        break
                except OSError:
                    time.sleep(0.002)
                if time.monotonic() - start > 30:
                    raise SystemExit("the app did not become healthy in 30s")
            times.append(time.monotonic() - start)
        finally:
            proc.terminate()
            proc.wait(10)
    return times


def machine() -> str:
    """``nproc``, the CPU model, the kernel and the load average, for the record."""
    model = cpu_model()
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = ["?"]
    return (
        f"{os.cpu_count()} CPU(s), {model}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average {' '.join(load)}"
    )


def compile_castiron() -> None:
    """Byte-compile the castiron package the CLI runs (as pip does when installing it)."""
    found = subprocess.run(
        [sys.executable, "-c", "import castiron, os; print(os.path.dirname(castiron.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    compileall.compile_dir(found, quiet=1)


def body_of(version: int) -> str:
    return f"Hello from castiron! (version {version})"


def hyperfine(env: dict[str, str], cwd: Path) -> dict[str, float] | None:
    if shutil.which("hyperfine") is None:
        print("hyperfine not found: skipping the start-up comparison")
        return None
    out = cwd / "hyperfine.json"
    cli = " ".join(CLI)
    subprocess.run(
        [
            "hyperfine", "--warmup", "3", "--runs", "20", "--export-json", str(out), "-N",
            f"{sys.executable} -c pass", f"{cli} version", f"{cli} status",
        ],
        cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    results = json.loads(out.read_text())["results"]
    return {r["command"]: r["mean"] for r in results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploys", type=int, default=20)
    parser.add_argument("--rollbacks", type=int, default=5)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--no-hyperfine", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="castiron-bench-") as tmp:
        project = Path(tmp) / "hello"
        shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
        port = free_port()
        spec = project / "castiron.yaml"
        spec.write_text(spec.read_text().replace("127.0.0.1:8080", f"127.0.0.1:{port}"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
        env.update({"NO_COLOR": "1", "CASTIRON_HOME": str(project / ".castiron")})
        print(f"machine: {machine()}")
        compile_castiron()
        try:
            castiron(env, project, "bake")
            ready: list[float] = app_ready_times(project, 3)
            castiron({**env, "APP_VERSION": "0"}, project, "deploy", "staging", "--yes")
            starts: list[float] = []
            seens: list[float] = []
            internal: list[dict[str, float]] = []
            rollbacks: list[float] = []
            seconds = 30 + 3 * (args.deploys + args.rollbacks)
            with Load(port, args.rate, int(args.rate * seconds), seconds) as load:
                time.sleep(0.5)
                for version in range(1, args.deploys + 1):
                    ready.extend(app_ready_times(project, 1))
                    start = time.monotonic()
                    proc = castiron(
                        {**env, "APP_VERSION": str(version)},
                        project,
                        "deploy", "staging", "--yes", "--json",
                    )  # fmt: skip
                    seen = None
                    deadline = time.monotonic() + 10
                    while seen is None and time.monotonic() < deadline:
                        seen = load.first_after(start, body_of(version))
                        time.sleep(0.01)
                    if seen is None:
                        raise SystemExit(f"version {version} never answered")
                    starts.append(start)
                    seens.append(seen)
                    internal.append(json.loads(proc.stdout)["timings"])
                current = args.deploys
                for _ in range(args.rollbacks):
                    target = current - 1 if current == args.deploys else args.deploys
                    start = time.monotonic()
                    castiron(env, project, "rollback", "staging", "--json")
                    seen = None
                    deadline = time.monotonic() + 10
                    while seen is None and time.monotonic() < deadline:
                        seen = load.first_after(start, body_of(target))
                        time.sleep(0.01)
                    if seen is None:
                        raise SystemExit(f"rollback to {target} never answered")
                    rollbacks.append(seen - start)
                    current = target
                    time.sleep(0.3)
                    late = [
                        s for s in load.samples if s[0] > seen + 0.05 and s[2] != body_of(target)
                    ]
                    if late:
                        raise SystemExit(
                            f"after the rollback {len(late)} answers were not {target}"
                        )
            failed = load.failed()
            app_ready = statistics.median(ready)
            overheads = [b - a - app_ready for a, b in zip(starts, seens, strict=True)]
            startup = None if args.no_hyperfine else hyperfine(env, project)
            floor = statistics.median(
                [_timed(lambda: castiron(env, project, "version")) for _ in range(5)]
            )
        finally:
            subprocess.run([*CLI, "down", "staging", "--yes"], cwd=project, env=env,
                           capture_output=True, check=False)  # fmt: skip
            subprocess.run([*CLI, "agent", "stop"], cwd=project, env=env,
                           capture_output=True, check=False)  # fmt: skip

    def ms(v: float) -> str:
        return f"{v * 1000:.0f} ms"

    print(f"requests: {len(load.samples)} at {args.rate:g}/s, failed: {len(failed)}")
    for sample in failed[:5]:
        print("  failed:", sample)
    print(f"machine at the end: {machine()}")
    print(
        f"app's own time to healthy (direct start, median of {len(ready)}): {ms(app_ready)} "
        f"(min {ms(min(ready))}, max {ms(max(ready))})"
    )
    print(
        f"deploy overhead over {len(overheads)} deploys (start → first new answer − app ready): "
        f"median {ms(statistics.median(overheads))}, max {ms(max(overheads))}"
    )
    switch = [t.get("switch_s", 0.0) for t in internal]
    health = [t.get("health_s", 0.0) for t in internal]
    print(
        f"  inside the CLI: engine start → switch median {ms(statistics.median(switch))}, "
        f"of which waiting for health {ms(statistics.median(health))}"
    )
    print(f"CLI floor (`castiron version`, median of 5): {ms(floor)}")
    print(
        f"warm rollback over {len(rollbacks)} (start → first answer of the old release): "
        f"median {ms(statistics.median(rollbacks))}, max {ms(max(rollbacks))}; beyond the "
        f"CLI floor: {ms(statistics.median(rollbacks) - floor)}"
    )
    if startup:
        py = startup[f"{sys.executable} -c pass"]
        for command, mean in startup.items():
            print(f"hyperfine {command.replace(sys.executable, 'python')}: {ms(mean)} "
                  f"({mean / py:.1f}x python -c pass)")  # fmt: skip
    return 1 if failed else 0


def _timed(fn: object) -> float:
    start = time.monotonic()
    fn()  # type: ignore[operator]
    return time.monotonic() - start


if __name__ == "__main__":
    raise SystemExit(main())
