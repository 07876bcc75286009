#!/usr/bin/env python3
"""Local runtime: time from "create an instance" to its first HTTP 200, and from a crash to
serving again; castiron's local driver (bubblewrap sandbox, and no isolation) vs ``docker run``.

Usage: python bench/local_runtime.py [--runs 10] [--crashes 3]

All modes run the same small standard-library HTTP server with the host's python3, from the
same read-only tree: castiron bakes it into a scratch image and unpacks it once; Docker runs a
tiny image (``FROM scratch`` + busybox, built here from /bin/busybox) with the host's ``/usr``,
``/lib*`` and ``/etc`` and the tree bind-mounted read-only, ``--network host``. Start: the time
from the call (``LocalDriver.create``, or ``docker run -d``) until a GET on loopback answers
200, median of ``--runs``. Crash: an instance is SIGKILLed; castiron's agent replaces it (after
its 1 s backoff, health-checked, routed) and the time until the route answers again is taken;
Docker restarts the container in place (``--restart=always``) and the time until its port
answers again is taken. Everything stays on 127.0.0.1; each wait is bounded (60 s).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from castiron.agent.lifecycle import ensure_agent, stop_agent
from castiron.drivers.local import LocalDriver, SandboxPolicy, find_bwrap
from castiron.images.build import BakeOptions, bake
from castiron.images.rootfs import unpack_release
from castiron.images.store import ImageStore
from castiron.model import ImageRef, InstanceSpec, Isolation, ReleaseId
from castiron.ports import free_port
from castiron.settings import load_settings
from castiron.spec.schema import ImageSection
from castiron.traffic.base import Backend, BackendSet, RouteConfig

SERVER = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""
DOCKER_IMAGE = "castiron-bench/busybox:latest"


def wait_ok(address: str, timeout: float = 60.0) -> float:
    """Seconds until GET http://address/ answers 200 (raises after ``timeout``)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{address}/", timeout=2) as r,
        ):
            if r.status == 200:
                return time.perf_counter() - start
        time.sleep(0.005)
    raise TimeoutError(f"{address} did not answer in {timeout}s")


def castiron_mode(
    home: Path, image: ImageRef, isolation: Isolation, runs: int, crashes: int
) -> tuple[list[float], list[float]]:
    settings = load_settings({}, home=home)
    agent = ensure_agent(settings)
    try:
        driver = LocalDriver(
            agent,
            settings.releases_path,
            lambda ref, root: unpack_release(ref.store, ref.digest, root),
            sandbox=SandboxPolicy(find_bwrap(os.environ.get("PATH", os.defpath))),
        )
        driver.ensure_image(image)
        starts: list[float] = []
        for n in range(runs):
            spec = InstanceSpec(
                id=f"b-{isolation}-{n}",
                app="bench",
                environment="bench",
                release=ReleaseId("r1"),
                image=image,
                command=("python3", "server.py"),
                env={},
                workdir="/app",
                port=0,
                isolation=isolation,
            )
            t0 = time.perf_counter()
            instance = driver.create(spec)
            wait_ok(instance.address)
            starts.append(time.perf_counter() - t0)
            if n < runs - 1:
                driver.destroy(instance, grace=2.0)
        listen = f"127.0.0.1:{free_port()}"
        agent.put_route(
            "bench",
            RouteConfig(
                environment="bench",
                listen=listen,
                stable=BackendSet("r1", (Backend(instance.id, instance.address),)),
                drain_timeout=1.0,
            ),
        )
        wait_ok(listen)
        recoveries: list[float] = []
        current = instance.id
        for _ in range(crashes):
            since = agent.events()[-1].seq
            t0 = time.perf_counter()
            os.kill(agent.instance(current).pid, signal.SIGKILL)
            while True:  # until the route points at the replacement and it answers
                replaced = [e for e in agent.events(since) if e.kind == "instance-replaced"]
                if replaced:
                    current = replaced[0].replaced_by
                    break
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError("no replacement within 60 s")
                time.sleep(0.005)
            wait_ok(listen)
            recoveries.append(time.perf_counter() - t0)
        return starts, recoveries
    finally:
        for record in agent.instances():
            with contextlib.suppress(Exception):
                agent.stop_instance(record.id, grace=1.0)
        stop_agent(settings)


def docker_mode(
    work: Path, app_dir: Path, runs: int, crashes: int
) -> tuple[list[float], list[float]]:
    ctx = work / "docker-ctx"
    ctx.mkdir()
    shutil.copy2("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sh"]\n'
    )
    subprocess.run(
        ["docker", "build", "-q", "--network", "host", "-t", DOCKER_IMAGE, str(ctx)],
        check=True,
        capture_output=True,
    )
    mounts: list[str] = []
    for d in ("/usr", "/lib", "/lib64", "/etc"):
        if os.path.exists(d):
            mounts += ["-v", f"{os.path.realpath(d)}:{d}:ro"]
    mounts += ["-v", f"{app_dir}:/app:ro"]

    def run(port: int, *extra: str) -> str:
        out = subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--network",
                "host",
                *extra,
                *mounts,
                "-w",
                "/app",
                "-e",
                f"PORT={port}",
                DOCKER_IMAGE,
                "/usr/bin/python3",
                "server.py",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    starts: list[float] = []
    recoveries: list[float] = []
    containers: list[str] = []
    try:
        for _ in range(runs):
            port = free_port()
            t0 = time.perf_counter()
            cid = run(port)
            containers.append(cid)
            wait_ok(f"127.0.0.1:{port}")
            starts.append(time.perf_counter() - t0)
            subprocess.run(["docker", "rm", "-f", cid], check=True, capture_output=True)
            containers.remove(cid)
        port = free_port()
        cid = run(port, "--restart=always")
        containers.append(cid)
        wait_ok(f"127.0.0.1:{port}")
        for _ in range(crashes):
            pid = int(
                subprocess.run(
                    ["docker", "inspect", "-f", "{{.State.Pid}}", cid],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
            )
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:  # the port closes first, then the restarted container opens it
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) != 0:
                        break
                if time.perf_counter() - t0 > 10:
                    break
                time.sleep(0.002)
            wait_ok(f"127.0.0.1:{port}")
            recoveries.append(time.perf_counter() - t0)
    finally:
        for cid in containers:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    return starts, recoveries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="Instances started per mode.")
    parser.add_argument("--crashes", type=int, default=3, help="Crashes per mode.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="castiron-bench-") as tmp:
        work = Path(tmp)
        (work / "app").mkdir()
        (work / "app" / "server.py").write_text(SERVER)
        section = ImageSection.model_validate(
            {"base": "scratch", "workdir": "/app", "entrypoint": ["python3", "server.py"]}
        )
        store = ImageStore(work / "images")
        result = bake(
            section,
            store,
            BakeOptions(
                context=work / "app",
                base_dir=work,
                source_date_epoch=1_700_000_000,
                environ={"PATH": os.environ.get("PATH", os.defpath)},
            ),
        )
        image = ImageRef(result.digest, result.config_digest, store.root)
        rows: list[tuple[str, list[float], list[float]]] = []
        for isolation in ("sandbox", "none"):
            starts, recov = castiron_mode(
                work / f"home-{isolation}",
                image,
                isolation,  # type: ignore[arg-type]
                args.runs,
                args.crashes,
            )
            rows.append((f"castiron local ({isolation})", starts, recov))
        rootfs_app = next((work / "home-none" / "releases").rglob("rootfs")) / "app"
        if shutil.which("docker"):
            starts, recov = docker_mode(work, rootfs_app, args.runs, args.crashes)
            rows.append(("docker run --network host", starts, recov))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(
        f"machine: {os.cpu_count()} CPU, {cpu}, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
    # Both back off between crashes that follow each other (castiron 1, 2, 4 s ...; Docker
    # 0.1, 0.2, 0.4 s ...): the first crash compares the two mechanisms, the later ones the
    # backoff policies.
    peer, peer_first = statistics.median(rows[-1][1]), rows[-1][2][0]
    header = f"{'mode':<28} {'start median':>12} {'vs docker':>9}"
    print(header + f" {'1st crash->200':>14} {'vs docker':>9}  later crashes")
    for name, starts, recov in rows:
        s = statistics.median(starts)
        later = ", ".join(f"{r:.2f}" for r in recov[1:])
        print(
            f"{name:<28} {s * 1000:>9.0f} ms {s / peer:>8.2f}x {recov[0] * 1000:>11.0f} ms "
            f"{recov[0] / peer_first:>8.2f}x  {later} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
