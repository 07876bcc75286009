"""Router benchmark: direct vs the builtin proxy vs HAProxy, on the same backend, in one run.

    python bench/router.py [--duration 10] [--connections 32] [--runs 3] [--busy]
                           [--workers N]

Needs wrk and haproxy on PATH. Everything stays on 127.0.0.1. Prints, side by side, for each
of ``--runs`` runs and then their medians: throughput and p99 latency (wrk -t2 -cN -dD
--latency) direct to the backend, through the builtin router as the agent runs it (worker
processes, one per CPU unless ``--workers``; ``WorkerPoolRouter``), through HAProxy (driven by
castiron's HaproxyRouter, with HAProxy's own defaults: one thread per CPU) and through one
builtin router process (``builtin-1``, the router inside the agent: ``--router-workers 0``);
the p99 added by each router at half of the builtin's maximum throughput; and, once, failed
requests across 50 backend-set switches under constant wrk load.

With each throughput figure goes the CPU time the router used per request (user and system,
its whole process tree: the workers, HAProxy's processes; for ``direct``, the backend's),
read from /proc. On a machine shared with others this moves much less than throughput does.
``--source`` adds a ``builtin-src`` row: the same worker pool running the router from its
Python source (``CASTIRON_COMPILED=0``), to see what the compiled per-request path gains.
``--pipe`` adds a ``pipe`` row: a byte pipe on the same event loop (as many processes as
builtin workers, one upstream connection per client, no HTTP), the floor under any Python
router here.

``--busy`` starts one CPU-bound Python process (pinned to no CPU) before all measurements and
stops it at the end: the machine shared with another tenant. The load average is printed
before and after each run.

The half-load run is an open-loop generator in this process (uvloop, asyncio Protocols,
64 keep-alive connections each sending on a fixed schedule; latency counts from each request's
scheduled time, so a stall is not hidden by fewer requests; the first second is not counted).
It prints its own CPU use so one can see it is not the bottleneck.

The backend is a tiny asyncio (uvloop when installed) server answering a fixed 200 with
keep-alive, run as its own process, as is each router.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from castiron.ports import free_port

HERE = Path(__file__).resolve().parent
BODY = b"hello, world\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\n" + BODY
PACED_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
WARMUP = 1.0
"""Seconds of open-loop load sent before latencies are counted."""


def _loop_policy() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# --- processes ---
class _Fixed(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.t.write(RESPONSE * n)  # type: ignore[attr-defined]
            buf = buf[buf.rfind(b"\r\n\r\n") + 4 :]
        self.buf = buf


def run_backend(port: int) -> None:
    _loop_policy()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Fixed, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    asyncio.run(main())


def run_router(kind: str, listen: str, backends: list[str], workdir: str) -> None:
    """A router process: applies release r0, then switches on each 'switch' line on stdin."""
    print(f"loop {_loop_policy()}", file=sys.stderr, flush=True)
    from castiron.traffic.base import Backend, BackendSet, RouteConfig

    async def main() -> None:
        router: Any
        if kind == "builtin:1proc":
            from castiron.traffic.proxy import BuiltinRouter

            router = BuiltinRouter()
        elif kind.startswith("builtin:"):
            from castiron.traffic.workers import WorkerPoolRouter

            router = WorkerPoolRouter(int(kind.split(":")[1]) or None)
        else:
            from castiron.traffic.haproxy import HaproxyRouter

            router = HaproxyRouter(Path(workdir), haproxy_bin=shutil.which("haproxy") or "haproxy")

        def config(i: int) -> RouteConfig:
            address = backends[i % len(backends)]
            return RouteConfig(
                environment="bench",
                listen=listen,
                stable=BackendSet(f"r{i}", (Backend(f"b{i}", address),)),
                drain_timeout=5,
            )

        await router.apply(config(0))
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        i = 0
        while line := await reader.readline():
            if line.strip() == b"switch":
                i += 1
                await router.apply(config(i))
                print("switched", flush=True)
        await router.close()

    asyncio.run(main())


class _PipeUp(asyncio.Protocol):
    def __init__(self, client: _PipeClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.client.t.write(data)


class _PipeClient(asyncio.Protocol):
    """A byte pipe: one upstream connection per client, bytes forwarded as they come."""

    backend = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up: _PipeUp | None = None
        self.pending: list[bytes] = []
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.up = await loop.create_connection(lambda: _PipeUp(self), "127.0.0.1", self.backend)
        self.up.t.writelines(self.pending)

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.t.write(data)


def run_pipe(listen: int, backend: int, processes: int) -> None:
    """``--pipe``: the floor under any Python router on this event loop (no HTTP at all)."""
    sock = socket.create_server(("127.0.0.1", listen), backlog=1024)
    _PipeClient.backend = backend
    for _ in range(processes - 1):
        if os.fork() == 0:
            break
    else:
        print("ready", flush=True)
    _loop_policy()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_PipeClient, sock=sock)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        await reader.read()  # every process exits when the benchmark closes stdin

    asyncio.run(main())


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__)), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise SystemExit(f"{args[0]} did not start: {line!r}")
    return proc


# --- load ---
def wrk(port: int, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "errors": errors, "total": total}


class _PacedConn(asyncio.Protocol):
    """One keep-alive connection sending on a fixed schedule (open loop, no streams).

    Request ``i`` is due at ``start + i / rate``; if the previous response is late, the next
    request goes out as soon as it arrives and its latency still counts from its due time, so
    a slow router cannot hide behind fewer requests (no coordinated omission).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        start: float,
        rate: float,
        count_from: float,
        end: float,
    ):
        self.loop = loop
        self.start = start
        self.rate = rate
        self.count_from = count_from
        self.end = end
        self.i = 0
        self.buf = b""
        self.latencies: list[float] = []
        self.errors = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.t: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._schedule()

    def due(self) -> float:
        return self.start + self.i / self.rate

    def _schedule(self) -> None:
        due = self.due()
        if due > self.end:
            if not self.done.done():
                self.done.set_result(None)
            return
        if due <= self.loop.time():
            self._send()
        else:
            self.loop.call_at(due, self._send)

    def _send(self) -> None:
        assert self.t is not None
        self.t.write(PACED_REQUEST)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0 or len(buf) < end + 4 + len(BODY):
            self.buf = buf
            return
        self.buf = buf[end + 4 + len(BODY) :]
        due = self.due()
        if due >= self.count_from:
            self.latencies.append((self.loop.time() - due) * 1000.0)
        self.i += 1
        self._schedule()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.errors += 1
            self.done.set_result(None)


async def _paced(port: int, rate: float, duration: float, conns: int) -> tuple[float, float, int]:
    """Open-loop load over ``conns`` connections at ``rate`` req/s in total.

    The first ``WARMUP`` seconds (the router opening its upstream connections) are sent but
    not counted.
    """
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    count_from = start + WARMUP
    end = count_from + duration
    made = [
        await loop.create_connection(
            lambda k=k: _PacedConn(loop, start + k / rate, rate / conns, count_from, end),
            "127.0.0.1",
            port,
        )
        for k in range(conns)
    ]
    protos = [p for _, p in made]
    await asyncio.gather(*(p.done for p in protos))
    for t, _ in made:
        t.close()
    latencies = sorted(x for p in protos for x in p.latencies)
    errors = sum(p.errors for p in protos)
    p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
    return len(latencies) / duration, p99, errors


def paced(port: int, rate: float, duration: float, conns: int) -> tuple[float, float, int, float]:
    """(achieved req/s, p99 ms, errors, the generator's own CPU use as a share of one core)."""
    _loop_policy()
    before = resource.getrusage(resource.RUSAGE_SELF)
    achieved, p99, errors = asyncio.run(_paced(port, rate, duration, conns))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / duration
    return achieved, p99, errors, cpu


def switches(router: subprocess.Popen[str], port: int, n: int = 50) -> dict[str, float]:
    assert router.stdin is not None and router.stdout is not None
    load = subprocess.Popen(
        ["wrk", "-t2", "-c16", "-d12s", "--latency", f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1)
    for _ in range(n):
        router.stdin.write("switch\n")
        router.stdin.flush()
        if router.stdout.readline().strip() != "switched":
            raise SystemExit("switch failed")
        time.sleep(0.1)
    out, _ = load.communicate(timeout=60)
    errors = 0
    for pat in (r"Non-2xx or 3xx responses:\s+(\d+)",):
        m = re.search(pat, out)
        if m:
            errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {"total": total, "errors": errors}


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the router's workers, HAProxy's processes)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += _tree(int(child))
    except OSError:
        pass
    return pids


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``pid`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick


def machine() -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    py = platform.python_version()
    return f"{os.cpu_count()} CPU ({cpu}), Linux {platform.release()}, Python {py}"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def busy() -> None:
    """The CPU-bound neighbour of ``--busy``: one process spinning, pinned to no CPU."""
    n = 0
    while True:
        n += 1


def one_run(
    ports: list[int],
    b_port: int,
    one_port: int,
    h_port: int,
    pipe_port: int,
    src_port: int,
    pids: dict[str, int],
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    d, c, pc = args.duration, args.connections, args.paced_connections
    print(f"\n== max throughput: wrk -t2 -c{c} -d{d}s --latency   (load average {loadavg()})")
    res: dict[str, dict[str, float]] = {}
    rows = [("direct", ports[0]), ("builtin", b_port), ("haproxy", h_port)]
    rows.append(("builtin-1", one_port))
    if "builtin-src" in pids:
        rows.append(("builtin-src", src_port))
    if "pipe" in pids:
        rows.append(("pipe", pipe_port))
    for name, port in rows:
        before = cpu_seconds(pids[name])
        res[name] = wrk(port, d, c)
        after = cpu_seconds(pids[name])
        r = res[name]
        r["user_us"] = (after[0] - before[0]) / max(1, r["total"]) * 1e6
        r["sys_us"] = (after[1] - before[1]) / max(1, r["total"]) * 1e6
        print(
            f"{name:10s} {r['rps']:10.0f} req/s   p99 {r['p99_ms']:7.2f} ms"
            f"   errors {r['errors']:.0f}   CPU/request {r['user_us'] + r['sys_us']:5.1f} us"
            f" (user {r['user_us']:.1f}, system {r['sys_us']:.1f})"
        )
    ratio = res["builtin"]["rps"] / res["haproxy"]["rps"]
    res["ratio"] = {"builtin": ratio, "builtin-1": res["builtin-1"]["rps"] / res["haproxy"]["rps"]}
    if "builtin-src" in res:
        res["ratio"]["builtin-src"] = res["builtin-src"]["rps"] / res["haproxy"]["rps"]
        print(f"builtin from source/haproxy ratio: {res['ratio']['builtin-src']:.2f}")
    print(
        f"builtin/haproxy throughput ratio: {ratio:.2f}"
        f"   (one builtin process: {res['ratio']['builtin-1']:.2f})"
    )
    rate = res["builtin"]["rps"] / 2
    print(f"\n== p99 at half the builtin's max ({rate:.0f} req/s, open loop, {pc} conns, {d}s)")
    base = None
    for name, port in (("direct", ports[0]), ("builtin", b_port), ("haproxy", h_port)):
        achieved, p99, errors, cpu = paced(port, rate, d, pc)
        base = p99 if base is None else base
        added = p99 - base
        res[name].update({"half_p99_ms": p99, "added_ms": added, "half_rate": rate})
        print(
            f"{name:8s} achieved {achieved:8.0f} req/s   p99 {p99:7.2f} ms"
            f"   added {added:6.2f} ms   errors {errors}   generator CPU {cpu:4.0%}"
        )
    print(f"(load average after the run: {loadavg()})")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="runs; medians are printed at the end")
    ap.add_argument(
        "--workers", type=int, default=0, help="builtin router workers (default: one per CPU)"
    )
    ap.add_argument(
        "--busy",
        action="store_true",
        help="start one CPU-bound process (pinned to no CPU) before all measurements",
    )
    ap.add_argument(
        "--paced-connections",
        type=int,
        default=64,
        help="connections of the open-loop run (enough that each sends rarely)",
    )
    ap.add_argument("--no-switches", action="store_true", help="skip the 50-switch run")
    ap.add_argument(
        "--pipe",
        action="store_true",
        help="add a row: a byte pipe on the same event loop, as many processes as workers",
    )
    ap.add_argument(
        "--source",
        action="store_true",
        help="add a row: the same worker pool run from its Python source (CASTIRON_COMPILED=0)",
    )
    args = ap.parse_args()
    for tool in ("wrk", "haproxy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    print(f"machine: {machine()}   load average {loadavg()}")
    from castiron import compiled

    print(f"builtin router: {compiled.status().reason}")
    ports = [free_port(), free_port()]
    procs = [spawn("backend", str(p)) for p in ports]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    workdir = tempfile.mkdtemp(prefix="castiron-bench-")
    neighbour = None
    try:
        if args.busy:
            neighbour = subprocess.Popen([sys.executable, str(Path(__file__)), "busy"])
            print("busy mode: one CPU-bound process runs during every measurement")
        b_port, one_port, h_port = free_port(), free_port(), free_port()
        kind = f"builtin:{args.workers}"
        builtin = spawn("router", kind, f"127.0.0.1:{b_port}", ",".join(addrs), workdir)
        one = spawn("router", "builtin:1proc", f"127.0.0.1:{one_port}", addrs[0], workdir)
        hap = spawn("router", "haproxy", f"127.0.0.1:{h_port}", ",".join(addrs), workdir)
        procs += [builtin, one, hap]
        pids = {"direct": procs[0].pid, "builtin": builtin.pid, "haproxy": hap.pid}
        pids["builtin-1"] = one.pid
        pipe_port = free_port()
        src_port = free_port()
        if args.source:
            env = {**os.environ, compiled.ENV: "0"}
            src = spawn("router", kind, f"127.0.0.1:{src_port}", ",".join(addrs), workdir, env=env)
            procs.append(src)
            pids["builtin-src"] = src.pid
        if args.pipe:
            workers = args.workers or min(os.cpu_count() or 1, 8)
            pipe = spawn("pipe", str(pipe_port), str(ports[0]), str(workers))
            procs.append(pipe)
            pids["pipe"] = pipe.pid
        runs = [
            one_run(ports, b_port, one_port, h_port, pipe_port, src_port, pids, args)
            for _ in range(args.runs)
        ]

        def med(name: str, key: str) -> str:
            values = [r[name][key] for r in runs]
            listed = ", ".join(f"{v:.2f}" for v in values)
            return f"{statistics.median(values):.2f} ({listed})"

        print(f"\n== medians of {len(runs)} runs (per-run values in brackets)")
        for name in ("direct", "builtin", "haproxy", "builtin-1", "builtin-src"):
            if name in pids:
                print(f"{name:10s} req/s {med(name, 'rps')}")
        for name in ("builtin", "haproxy", "builtin-1", "builtin-src", "pipe"):
            if name not in pids:
                continue
            print(f"{name:10s} CPU us/request user {med(name, 'user_us')}")
            print(f"{name:10s} CPU us/request system {med(name, 'sys_us')}")
        print(f"builtin/haproxy ratio {med('ratio', 'builtin')}")
        print(f"one builtin process/haproxy ratio {med('ratio', 'builtin-1')}")
        if "builtin-src" in pids:
            print(f"builtin from source/haproxy ratio {med('ratio', 'builtin-src')}")
        for name in ("direct", "builtin", "haproxy"):
            print(f"{name:10s} p99 at half load ms {med(name, 'half_p99_ms')}")
        for name in ("builtin", "haproxy"):
            print(f"{name:10s} added p99 ms {med(name, 'added_ms')}")
        if not args.no_switches:
            print("\n== 50 backend-set switches under constant load (wrk -t2 -c16 -d12s)")
            for name, proc, port in (("builtin", builtin, b_port), ("haproxy", hap, h_port)):
                s = switches(proc, port)
                print(f"{name:8s} {s['total']:.0f} requests, failed {s['errors']:.0f}")
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        for p in procs:
            if p.stdin:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "busy":
        busy()
    elif len(sys.argv) > 1 and sys.argv[1] == "backend":
        run_backend(int(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "pipe":
        run_pipe(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "router":
        run_router(sys.argv[2], sys.argv[3], sys.argv[4].split(","), sys.argv[5])
    else:
        main()
