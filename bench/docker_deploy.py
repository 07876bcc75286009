#!/usr/bin/env python3
"""Docker runtime benchmark: castiron blue-green on Docker vs `docker-compose up -d`, and the
container start overhead castiron adds to a plain `docker run`.

    python bench/docker_deploy.py [--rounds 3] [--runs 5] [--rate 200]

Both sides run the same image (castiron bakes it from /bin/busybox and loads it into the engine;
`busybox httpd` serves `$VERSION` from its tmpfs), on the host network, with a read-only root,
loopback only. The load is a constant-rate client (a new connection per request, bounded in
count and time) that records every answer.

1. Redeploy under load, ``--rounds`` times each, alternating the version:
   * castiron: ``castiron deploy staging`` of a new release (a changed env var), 1 replica,
     blue-green behind castiron's router; the load goes through the router;
   * compose: ``docker-compose up -d`` of the same service with the changed env var, which
     recreates the container in place; the load goes straight to the container's port (there
     is no router).
   Figures: failed requests, and time to converge = command start -> first answer from the new
   version (after which every answer is new), plus the command's own duration.
2. Container start: median of ``--runs`` of
   * ``docker run -d --network host ...`` + polling until the app answers 200;
   * castiron's Docker driver ``create`` (in-process, image already loaded) + the same polling;
   * ``castiron deploy`` of 1 replica (CLI process, lock, journal, create, health gate,
     router switch), with the health wait it reports.

Every container, the compose project and the image are removed at the end.
"""

from __future__ import annotations

import argparse
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
from typing import Any

from _machine import cpu_model

from castiron.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "castiron.cli.main"]
APP = "benchdocker"
BENCH_LABEL = "castiron-bench.docker-deploy"
COMPOSE_PROJECT = "castironbench"
IMAGE_TAG = "castiron-bench/docker-deploy:latest"
SCRIPT = (
    'mkdir -p /tmp/www && echo "$VERSION" > /tmp/www/index.html && '
    'exec /bin/busybox httpd -f -p "$HOST:$PORT" -h /tmp/www'
)
ENTRYPOINT = ["/bin/busybox", "sh", "-c", SCRIPT]
SPEC = """
app: {app}
image:
  context: ./app
  workdir: /
  entrypoint: {entrypoint}
  labels: {{{label}: "yes"}}
service:
  port: 8000
  replicas: 1
  health: {{http: /, interval: 200ms, timeout: 2s}}
  env: {{VERSION: "${{VERSION:-v0}}"}}
environments:
  staging:
    runtime: docker
    network: host
    listen: 127.0.0.1:{port}
    drain_timeout: 1s
    keep_warm: 0s
"""
COMPOSE = """
version: "2.4"
services:
  web:
    image: {image}
    network_mode: host
    read_only: true
    tmpfs: ["/tmp"]
    init: true
    entrypoint: {entrypoint}
    labels: {{{label}: "yes"}}
    environment:
      VERSION: "${{VERSION}}"
      HOST: 127.0.0.1
      PORT: "{port}"
"""


def get(port: int, timeout: float = 2.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        conn.close()


def wait_answer(port: int, body: str | None = None, limit: float = 30.0) -> float:
    """Poll until 127.0.0.1:port answers 200 (with ``body``); returns when it did."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            status, text = get(port, timeout=1.0)
            if status == 200 and (body is None or text == body):
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.002)
    raise SystemExit(f"nothing answered on 127.0.0.1:{port} within {limit:g}s")


@dataclass
class Load:
    """GETs at a constant rate (one every 1/rate s), bounded by max_requests and max_seconds."""

    port: int
    rate: float
    max_seconds: float = 60.0
    samples: list[tuple[float, bool, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def run(self) -> None:
        start = time.monotonic()
        period = 1.0 / self.rate
        for n in range(int(self.rate * self.max_seconds)):
            due = start + n * period
            now = time.monotonic()
            if self._stop.is_set() or now - start > self.max_seconds:
                return
            if due > now:
                time.sleep(due - now)
            at = time.monotonic()
            try:
                status, body = get(self.port)
                self.samples.append((at, status == 200, body if status == 200 else str(status)))
            except OSError as exc:
                self.samples.append((at, False, type(exc).__name__))

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def converged(self, since: float, body: str) -> float | None:
        """When answers became ``body`` for good (first of the final run of ``body``)."""
        at: float | None = None
        for t, ok, text in self.samples:
            if t < since:
                continue
            good = ok and text == body
            at = None if not good else (t if at is None else at)
        return at


def run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    return ["docker", "compose"] if probe.returncode == 0 else None


@dataclass
class Round:
    failed: int
    requests: int
    converge_s: float
    command_s: float
    errors: list[str]


def redeploy_under_load(
    port: int, rate: float, version: str, command: list[str], env: dict[str, str], cwd: Path
) -> Round:
    with Load(port, rate) as load:
        wait_answer(port)
        time.sleep(0.5)
        start = time.monotonic()
        run(command, {**env, "VERSION": version}, cwd)
        command_s = time.monotonic() - start
        wait_answer(port, version)
        time.sleep(1.0)
    after = [s for s in load.samples if s[0] >= start - 0.5]
    converged = load.converged(start, version)
    failed = [s for s in after if not s[1]]
    return Round(
        failed=len(failed),
        requests=len(after),
        converge_s=(converged - start) if converged is not None else float("nan"),
        command_s=command_s,
        errors=sorted({s[2] for s in failed}),
    )


def docker_run_start(image_id: str, runs: int) -> list[float]:
    times = []
    for n in range(runs):
        port = free_port()
        name = f"{COMPOSE_PROJECT}-run-{n}"
        start = time.monotonic()
        subprocess.run(
            [
                "docker", "run", "-d", "--name", name, "--network", "host", "--read-only",
                "--tmpfs", "/tmp", "--init", "--label", f"{BENCH_LABEL}=yes",
                "-e", "VERSION=x", "-e", "HOST=127.0.0.1", "-e", f"PORT={port}",
                "--entrypoint", ENTRYPOINT[0], image_id, *ENTRYPOINT[1:],
            ],
            check=True, capture_output=True,
        )  # fmt: skip
        times.append(wait_answer(port) - start)
        subprocess.run(["docker", "rm", "-f", name], check=True, capture_output=True)
    return times


START_WINDOW = 0.2
"""DockerDriver.start_window (its default): how long create watches a new container."""


def driver_start(home: Path, image: Any, runs: int) -> list[float]:
    from castiron.drivers.docker import DockerDriver, DockerEndpoint
    from castiron.engine.runtimes import archive_exporter
    from castiron.model import InstanceSpec, ReleaseId

    driver = DockerDriver(
        export=archive_exporter(home / "cache" / "docker"),
        endpoint=DockerEndpoint(os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"),
        start_window=START_WINDOW,
    )
    driver.ensure_image(image)
    times = []
    for n in range(runs):
        spec = InstanceSpec(
            id=f"bench-{n}-{os.getpid()}",
            app=APP,
            environment="driver",
            release=ReleaseId("bench"),
            image=image,
            command=tuple(ENTRYPOINT),
            env={"VERSION": "x"},
            workdir="/",
            port=0,
            labels={BENCH_LABEL: "yes"},
        )
        start = time.monotonic()
        instance = driver.create(spec)
        port = int(instance.address.rsplit(":", 1)[1])
        times.append(wait_answer(port) - start)
        driver.destroy(instance, grace=1.0)
    return times


def castiron_start(env: dict[str, str], cwd: Path, runs: int) -> list[dict[str, float]]:
    out = []
    for n in range(runs):
        start = time.monotonic()
        proc = run(
            [*CLI, "deploy", "staging", "--yes", "--json"], {**env, "VERSION": f"start-{n}"}, cwd
        )
        wall = time.monotonic() - start
        data = json.loads(proc.stdout)
        out.append(
            {
                "wall": wall,
                "switch": float(data["timings"].get("switch_s", data["duration_s"])),
                "health": float(data["timings"].get("health_s", 0.0)),
            }
        )
    return out


def cleanup(compose: list[str] | None, work: Path, env: dict[str, str]) -> None:
    if compose is not None and (work / "compose" / "docker-compose.yml").exists():
        subprocess.run(
            [*compose, "-p", COMPOSE_PROJECT, "down", "-t", "1"],
            cwd=work / "compose", env=env, capture_output=True, check=False,
        )  # fmt: skip
    for label in (f"castiron.app={APP}", f"{BENCH_LABEL}=yes"):
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={label}"],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)
    images = subprocess.run(
        ["docker", "images", "-q", "--filter", f"label={BENCH_LABEL}"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    if images:
        subprocess.run(
            ["docker", "rmi", "-f", *sorted(set(images))], capture_output=True, check=False
        )


def step(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = cpu_model("?")
    docker = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return (
        f"{os.cpu_count()} CPU, {cpu}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, Docker {docker or '?'}"
    )


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="redeploys under load per tool")
    parser.add_argument("--runs", type=int, default=5, help="container starts per mode")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args()
    if not Path("/bin/busybox").is_file():
        raise SystemExit("/bin/busybox is missing: apt-get install busybox-static")
    compose = compose_command()
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory(prefix="castiron-bench-docker-") as tmp:
        work = Path(tmp)
        project = work / "project"
        (project / "app" / "bin").mkdir(parents=True)
        shutil.copy("/bin/busybox", project / "app" / "bin" / "busybox")
        router_port = free_port()
        (project / "castiron.yaml").write_text(
            SPEC.format(
                app=APP, entrypoint=json.dumps(ENTRYPOINT), label=BENCH_LABEL, port=router_port
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
        env.update(
            {
                "NO_COLOR": "1",
                "CASTIRON_HOME": str(project / ".castiron"),
                "SOURCE_DATE_EPOCH": "1700000000",
            }
        )
        try:
            run([*CLI, "bake", "--tag", "v1"], env, project)
            run([*CLI, "deploy", "staging", "--yes"], {**env, "VERSION": "v0"}, project)
            from castiron.images.store import ImageStore
            from castiron.model import ImageRef

            store = ImageStore(project / ".castiron" / "images")
            digest = store.resolve("v1")
            image = ImageRef(digest, store.image(digest).config_digest, store.root)
            image_id = image.config_digest
            subprocess.run(["docker", "tag", image_id, IMAGE_TAG], check=True)

            # 1. redeploys under load
            step("castiron: redeploys under load")
            ours: list[Round] = []
            for n in range(args.rounds):
                cmd = [*CLI, "deploy", "staging", "--yes"]
                ours.append(
                    redeploy_under_load(router_port, args.rate, f"v{n + 1}", cmd, env, project)
                )
            theirs: list[Round] = []
            if compose is None:
                print("neither docker-compose nor `docker compose` found: skipping compose")
            else:
                step(f"{' '.join(compose)}: redeploys under load")
                compose_port = free_port()
                (work / "compose").mkdir()
                (work / "compose" / "docker-compose.yml").write_text(
                    COMPOSE.format(
                        image=IMAGE_TAG,
                        # compose interpolates $VAR itself: $$ reaches the shell as $
                        entrypoint=json.dumps(ENTRYPOINT).replace("$", "$$"),
                        label=BENCH_LABEL,
                        port=compose_port,
                    )
                )
                up = [*compose, "-p", COMPOSE_PROJECT, "up", "-d"]
                run(up, {**env, "VERSION": "v0"}, work / "compose")
                for n in range(args.rounds):
                    theirs.append(
                        redeploy_under_load(
                            compose_port, args.rate, f"v{n + 1}", up, env, work / "compose"
                        )
                    )

            # 2. container start
            step("container starts: docker run, DockerDriver.create, castiron deploy")
            plain = docker_run_start(image_id, args.runs)
            driver = driver_start(project / ".castiron", image, args.runs)
            deploys = castiron_start(env, project, args.runs)
        finally:
            subprocess.run([*CLI, "down", "staging", "--yes"], cwd=project, env=env,
                           capture_output=True, check=False)  # fmt: skip
            subprocess.run([*CLI, "agent", "stop"], cwd=project, env=env,
                           capture_output=True, check=False)  # fmt: skip
            cleanup(compose, work, env)

    print(f"\nredeploy under load ({args.rate:g} req/s, new connection per request), "
          f"{args.rounds} round(s) each")  # fmt: skip
    print(f"{'tool':<34}{'failed':>8}{'requests':>10}{'converge':>11}{'command':>10}")
    rows = [("castiron deploy (blue-green)", ours)]
    if theirs:
        rows.append(("docker-compose up -d (recreate)", theirs))
    for name, rounds in rows:
        failed = sum(r.failed for r in rounds)
        total = sum(r.requests for r in rounds)
        converge = statistics.median(r.converge_s for r in rounds)
        command = statistics.median(r.command_s for r in rounds)
        print(f"{name:<34}{failed:>8}{total:>10}{converge * 1000:>8.0f} ms{command:>8.2f} s")
        for r in rounds:
            if r.errors:
                print(f"  errors: {', '.join(r.errors)} ({r.failed})")
    if theirs:
        a = statistics.median(r.converge_s for r in ours)
        b = statistics.median(r.converge_s for r in theirs)
        print(f"converge: castiron / compose = {a / b:.2f}x")

    base = statistics.median(plain)
    print(f"\ncontainer start to first 200 (median of {args.runs})")
    print(f"  docker run -d --network host      {ms(plain)}  1.00x")
    print(
        f"  castiron DockerDriver.create      {ms(driver)}  {statistics.median(driver) / base:.2f}x"
    )
    print(f"    of which the start window         {START_WINDOW * 1000:.0f} ms (early-exit watch)")
    walls = [d["wall"] for d in deploys]
    switches = [d["switch"] for d in deploys]
    healths = [d["health"] for d in deploys]
    print(
        f"  castiron deploy (CLI wall)        {ms(walls)}  {statistics.median(walls) / base:.2f}x"
    )
    print(f"    of which start -> switch        {ms(switches)}")
    print(f"    of which health wait            {ms(healths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
