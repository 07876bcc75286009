#!/usr/bin/env python3
"""Connections refused while the agent is SIGKILLed and restarted: fd keeper vs none.

Usage: python bench/agent_restart.py [--duration 4] [--kill-at 1]

For each mode (the default, with the fd keeper holding the listening sockets, and the peer,
``--no-keep-listeners``: a plain restart that binds anew) it starts an agent in a temporary
CASTIRON_HOME, one instance (a small Python HTTP server) and a route on loopback; then a client
makes HTTP requests on fresh connections in a tight loop, bounded in time, while the agent is
killed with SIGKILL and started again. It prints, per mode: requests made, requests served,
connections refused, other errors, the longest stall (the longest time a single request
waited or the longest run of failures), and how long the restarted agent took to answer.
Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from castiron.agent.client import SpawnRequest
from castiron.agent.lifecycle import agent_pid, ensure_agent, stop_agent
from castiron.agent.supervisor import process_start_time
from castiron.ports import free_port
from castiron.settings import load_settings

APP = textwrap.dedent(
    """
    import http.server, os
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "3"); self.end_headers()
            self.wfile.write(b"ok\\n")
        def log_message(self, *a): pass
    http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
    """
)


def one_request(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return "ok" if data.startswith(b"HTTP/1.1 200") else "error"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "error"


def run_mode(keep: bool, duration: float, kill_at: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="castiron-bench-") as tmp:
        home = Path(tmp) / "home"
        settings = load_settings({}, home=home)
        extra = () if keep else ("--no-keep-listeners",)
        agent = ensure_agent(settings, extra_args=extra)
        app = Path(tmp) / "app.py"
        app.write_text(APP)
        app_port, listen = free_port(), free_port()
        record = agent.spawn(
            SpawnRequest(
                id="app-1",
                environment="bench",
                release="r1",
                argv=(sys.executable, str(app)),
                env={"PORT": str(app_port)},
            )
        )
        try:
            deadline = time.monotonic() + 10
            while one_request(app_port) != "ok" and time.monotonic() < deadline:
                time.sleep(0.02)
            agent.put_route(
                "bench",
                {
                    "environment": "bench",
                    "listen": f"127.0.0.1:{listen}",
                    "stable": {
                        "release": "r1",
                        "backends": [{"id": "app-1", "address": f"127.0.0.1:{app_port}"}],
                    },
                },
            )
            counts = {"ok": 0, "refused": 0, "error": 0}
            stall = {"max": 0.0}
            stop = threading.Event()

            def load() -> None:
                bad_since: float | None = None
                end = time.monotonic() + duration
                while not stop.is_set() and time.monotonic() < end:
                    t0 = time.monotonic()
                    outcome = one_request(listen)
                    t1 = time.monotonic()
                    counts[outcome] += 1
                    stall["max"] = max(stall["max"], t1 - t0)
                    if outcome == "ok":
                        if bad_since is not None:
                            stall["max"] = max(stall["max"], t1 - bad_since)
                        bad_since = None
                    elif bad_since is None:
                        bad_since = t0

            thread = threading.Thread(target=load)
            thread.start()
            time.sleep(kill_at)
            pid = agent_pid(settings)
            assert pid
            os.kill(pid, signal.SIGKILL)
            while agent_pid(settings) is not None:
                time.sleep(0.001)
            t0 = time.monotonic()
            ensure_agent(settings, extra_args=extra)
            restart = time.monotonic() - t0
            thread.join(duration + 30)
            stop.set()
        finally:
            stop_agent(settings)
            if process_start_time(record.pid) == record.start_time:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record.pid, signal.SIGKILL)
        return {
            "requests": sum(counts.values()),
            "served": counts["ok"],
            "refused": counts["refused"],
            "errors": counts["error"],
            "max_stall_ms": round(stall["max"] * 1000, 1),
            "restart_ms": round(restart * 1000, 1),
        }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="Seconds of load per mode.")
    parser.add_argument("--kill-at", type=float, default=1.0, help="Seconds before the kill.")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU, {cpu_model()}, Linux {platform.release()}")
    results = {
        "fd keeper (castiron default)": run_mode(True, args.duration, args.kill_at),
        "plain restart (--no-keep-listeners)": run_mode(False, args.duration, args.kill_at),
    }
    header = f"{'mode':38} {'requests':>8} {'served':>7} {'refused':>7} {'errors':>6} "
    print(header + f"{'max stall ms':>12} {'restart ms':>10}")
    for mode, r in results.items():
        print(
            f"{mode:38} {r['requests']:>8} {r['served']:>7} {r['refused']:>7} {r['errors']:>6} "
            f"{r['max_stall_ms']:>12} {r['restart_ms']:>10}"
        )
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
