"""Benchmark: ``castiron serve`` with 50 environments and 10,000 deployments.

Builds a state store in a temporary CASTIRON_HOME through the store's own API (50
environments with two running instances each, 10,000 finished deployments with their journal
steps, one audit entry per deployment), starts ``castiron serve`` on a free loopback port, and
measures:

* the dashboard home (``/``, logged in): server time (the ``Server-Timing`` header: request to
  response start) and client time over ``--pages`` sequential loads, and its page weight
  (HTML + CSS + JS, uncompressed);
* API latency under 50 concurrent clients with ``wrk`` (``--latency``: p50/p90/p99) on
  ``GET /api/v1/environments`` (all 50 at a glance) and
  ``GET /api/v1/environments/env-00/history?limit=20``;
* side by side, in the same run and with the same wrk settings, the floor: Python's
  ``http.server`` serving the same ``/api/v1/environments`` JSON from a file (no auth, no
  database, no work). Argo CD and Spinnaker cannot run on this machine without network, so
  the floor is the honest peer here: the ratio says what castiron's work costs over doing
  nothing at all on the same interpreter.

    .venv/bin/python bench/serve.py [--envs 50] [--deployments 10000] [--duration 10]

Needs ``wrk`` (apt-get install wrk). Only loopback is used; the temporary directory and the
processes are removed afterwards.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _machine import cpu_model

from castiron.engine.access import create_token
from castiron.model import Digest, ReleaseId
from castiron.ports import free_port
from castiron.state.base import (
    AuditDraft,
    DeploymentRow,
    EnvironmentRow,
    ImageRow,
    InstanceRow,
    ReleaseRow,
    StateTx,
)
from castiron.state.sqlite import open_state

CLIENTS = 50


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} CPU ({cpu_model()}), kernel {platform.release()}, "
        f"Python {platform.python_version()}, load average {load[0]:.2f} at start"
    )


def build_state(home: Path, envs: int, deployments: int) -> str:
    """Fill ``home``'s store; returns a viewer token's secret."""
    store = open_state(home / "state.db", actor="bench@host")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    digest = Digest("sha256:" + "ab" * 32)
    names = [f"env-{i:02d}" for i in range(envs)]
    per_env = deployments // envs
    try:
        store.mutate(
            AuditDraft("bench.image"),
            lambda tx: tx.record_image(ImageRow(digest, 1234, start, "bench")),
        )
        for e, name in enumerate(names):
            releases = [ReleaseId(f"{e:02x}{r:014x}") for r in range(per_env)]

            def setup(tx: StateTx, name: str = name, releases: list[ReleaseId] = releases) -> None:
                config = {"replicas": 2, "env": {"VERSION": name}}
                for r, rid in enumerate(releases):
                    tx.create_release(ReleaseRow(rid, name, digest, {**config, "n": r}, start))

            store.mutate(AuditDraft("bench.releases", environment=name), setup)
            for d in range(per_env):
                when = start + timedelta(minutes=e * per_env + d)
                row = DeploymentRow(
                    id=f"d-{e:02d}{d:08d}",
                    environment=name,
                    from_release=releases[d - 1] if d else None,
                    to_release=releases[d],
                    strategy="blue-green",
                    actor="bench@host",
                    started=when,
                    details={"digest": digest},
                )

                def deploy(tx: StateTx, row: DeploymentRow = row, when: datetime = when) -> None:
                    tx.create_deployment(row)
                    for step in ("start", "created", "healthy", "switched", "drain"):
                        tx.append_step(row.id, step, "ok", {}, when)
                    tx.finish_deployment(row.id, "succeeded", when + timedelta(seconds=2))

                store.mutate(
                    AuditDraft(
                        "deploy.finish",
                        environment=name,
                        subject=row.id,
                        from_=row.from_release,
                        to=row.to_release,
                        result="succeeded",
                    ),
                    deploy,
                )
            last = releases[-1]

            def finish(tx: StateTx, name: str = name, last: ReleaseId = last, e: int = e) -> None:
                tx.upsert_environment(
                    EnvironmentRow(
                        name,
                        "local",
                        f"127.0.0.1:{20000 + e}",
                        {"runtime": "local"},
                        last,
                        last,
                        start + timedelta(days=1),
                    )
                )
                for i in range(2):
                    tx.put_instance(
                        InstanceRow(
                            f"{name}-{i}",
                            name,
                            last,
                            f"127.0.0.1:{30000 + 2 * e + i}",
                            "local",
                            "running",
                        )
                    )

            store.mutate(AuditDraft("bench.environment", environment=name), finish)
        _, secret = create_token(store, "bench", "viewer")
    finally:
        store.close()
    return secret


def request(
    port: int, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        took = time.perf_counter() - started
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body, took
    finally:
        conn.close()


def login(port: int, secret: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST",
            "/login",
            body=f"token={secret}&next=/",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        response.read()
        cookie = response.getheader("set-cookie") or ""
        return cookie.split(";", 1)[0]
    finally:
        conn.close()


def wrk(url: str, headers: dict[str, str], duration: int) -> dict[str, Any]:
    argv = ["wrk", "-t2", f"-c{CLIENTS}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    out = subprocess.run(
        [*argv, url], capture_output=True, text=True, check=True, timeout=duration + 60
    ).stdout

    def ms(text: str) -> float:
        value, unit = float(re.sub(r"[a-z]+$", "", text)), re.sub(r"^[0-9.]+", "", text)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    pct = {m[0]: ms(m[1]) for m in re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": pct["50"],
        "p90": pct["90"],
        "p99": pct["99"],
        "rps": rps,
        "non2xx": int(errors.group(1)) if errors else 0,
    }


def wait_up(port: int, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if request(port, "/healthz", {})[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=50)
    parser.add_argument("--deployments", type=int, default=10_000)
    parser.add_argument("--pages", type=int, default=50)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="castiron-bench-serve-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        home = tmp / "home"
        started = time.perf_counter()
        secret = build_state(home, args.envs, args.deployments)
        print(
            f"state: {args.envs} environments, {args.deployments} deployments "
            f"(built in {time.perf_counter() - started:.1f}s)"
        )
        port = free_port()
        env = {**os.environ, "CASTIRON_HOME": str(home), "NO_COLOR": "1"}
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "castiron.cli.main",
                    "serve",
                    "--listen",
                    f"127.0.0.1:{port}",
                ],
                env=env,
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_up(port)
        cookie = login(port, secret)
        page_headers = {"Cookie": cookie}
        request(port, "/", page_headers)  # warm-up
        server_ms, client_ms = [], []
        body = b""
        for _ in range(args.pages):
            status, headers, body, took = request(port, "/", page_headers)
            assert status == 200, status
            server_ms.append(float(headers["server-timing"].split("dur=")[1]))
            client_ms.append(took * 1000)
        assert body.count(b'<tr data-env="') == args.envs
        # Cold: each load right after a change of state (an audit entry from another process),
        # so the overview is computed afresh rather than reused.
        cold_ms = []
        for i in range(10):
            with open_state(home / "state.db", actor="bench@host") as store:
                store.mutate(AuditDraft("bench.bump", subject=str(i)), lambda tx: None)
            status, headers, _, _ = request(port, "/", page_headers)
            assert status == 200, status
            cold_ms.append(float(headers["server-timing"].split("dur=")[1]))
        assets = sum(len(request(port, f"/static/{name}", {})[2]) for name in ("app.css", "app.js"))
        weight = len(body) + assets

        def q(values: list[float], p: float) -> float:
            return statistics.quantiles(values, n=100)[int(p) - 1]

        print(
            f"dashboard home: server median {statistics.median(server_ms):.1f} ms, "
            f"p95 {q(server_ms, 95):.1f} ms; client median {statistics.median(client_ms):.1f} "
            f"ms; page weight {weight / 1024:.1f} KB (HTML {len(body) / 1024:.1f} KB + "
            f"CSS/JS {assets / 1024:.1f} KB)"
        )
        print(
            f"dashboard home, cold (after each change of state): server median "
            f"{statistics.median(cold_ms):.1f} ms, max {max(cold_ms):.1f} ms"
        )

        bearer = {"Authorization": f"Bearer {secret}"}
        overview = request(port, "/api/v1/environments", bearer)[2]
        results = {}
        for path in ("/api/v1/environments", "/api/v1/environments/env-00/history?limit=20"):
            results[path] = wrk(f"http://127.0.0.1:{port}{path}", bearer, args.duration)

        floor_dir = tmp / "floor" / "api" / "v1"
        floor_dir.mkdir(parents=True)
        (floor_dir / "environments").write_bytes(overview)
        floor_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    str(floor_port),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    str(tmp / "floor"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_up_floor = time.monotonic() + 10
        while time.monotonic() < wait_up_floor:
            try:
                if request(floor_port, "/api/v1/environments", {})[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        floor = wrk(f"http://127.0.0.1:{floor_port}/api/v1/environments", {}, args.duration)

        print(f"API under {CLIENTS} concurrent clients (wrk -t2 -c{CLIENTS} -d{args.duration}s):")
        for path, r in results.items():
            print(
                f"  castiron {path}: p50 {r['p50']:.1f} ms, p90 {r['p90']:.1f} ms, "
                f"p99 {r['p99']:.1f} ms, {r['rps']:.0f} req/s, non-2xx {r['non2xx']}"
            )
        print(
            f"  floor (python -m http.server, same JSON from a file): p50 {floor['p50']:.1f} ms, "
            f"p99 {floor['p99']:.1f} ms, {floor['rps']:.0f} req/s, non-2xx {floor['non2xx']}"
        )
        main_path = "/api/v1/environments"
        print(
            f"  ratio castiron/floor on {main_path}: p50 x"
            f"{results[main_path]['p50'] / floor['p50']:.1f}, p99 x"
            f"{results[main_path]['p99'] / floor['p99']:.2f}, throughput x"
            f"{results[main_path]['rps'] / floor['rps']:.2f}"
        )
        print(f"after: load average {os.getloadavg()[0]:.2f}")
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
