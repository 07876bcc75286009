"""Health checks: is an instance ready for traffic?

Owns the probes (``http`` path answering 2xx, ``tcp`` connect, ``command`` exiting 0) and the
judgement over time (start period, consecutive successes, deadline) of one
:class:`~castiron.model.HealthCheck`. Probes do real I/O on loopback; the judgement
(:class:`HealthTracker`) is pure and takes the clock as input.

Both the engine (deployments) and the host agent (replacements, flips) use it, so it knows
neither: it imports only the model and the HTTP/1.1 codec (:mod:`castiron.httpcodec`).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

from castiron.httpcodec import BlockingResponse, HttpParseError, encode_request_head
from castiron.model import Address, HealthCheck
from castiron.values import value


@value
class ProbeResult:
    """The outcome of one probe."""

    ok: bool
    detail: str


def _split(address: str) -> tuple[str, int]:
    parsed = Address.parse(address)
    return parsed.host, parsed.port


def probe_http(address: str, path: str, timeout: float) -> ProbeResult:
    """GET ``path`` from ``address``; 2xx is healthy.

    A plain HTTP/1.1 exchange on a socket (``Connection: close``) through the shared codec:
    ``http.client`` would cost a warm rollback ~25 ms of imports (ssl, email) for one status
    line. The rest of a framed body (up to 64 KiB) is read before closing, so that closing
    does not reset a server still writing; a server that keeps the connection open is not
    waited for.
    """
    host, port = _split(address)
    try:
        request = encode_request_head(
            "GET",
            path,
            [("Host", address), ("User-Agent", "castiron-health"), ("Connection", "close")],
        )
    except ValueError as exc:
        return ProbeResult(False, f"GET {path}: {exc}")
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            response = BlockingResponse(sock)
            response.drain(65536)
    except OSError as exc:
        return ProbeResult(False, f"GET {path}: {exc or type(exc).__name__}")
    except HttpParseError as exc:
        return ProbeResult(False, f"GET {path}: {exc.reason}")
    status = response.status
    if 200 <= status < 300:
        return ProbeResult(True, f"GET {path}: {status}")
    return ProbeResult(False, f"GET {path}: {status} {response.reason}".rstrip())


def probe_tcp(address: str, timeout: float) -> ProbeResult:
    """Open a TCP connection to ``address``."""
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ProbeResult(True, f"tcp {address}: connected")
    except OSError as exc:
        return ProbeResult(False, f"tcp {address}: {exc}")


def probe_command(
    argv: list[str], timeout: float, env: Mapping[str, str] | None = None
) -> ProbeResult:
    """Run ``argv``; exit 0 is healthy."""
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ProbeResult(False, f"command timed out after {timeout:g}s")
    except OSError as exc:
        return ProbeResult(False, f"command failed to start: {exc}")
    if proc.returncode == 0:
        return ProbeResult(True, "command exited 0")
    tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return ProbeResult(False, f"command exited {proc.returncode}: {tail[0]}")


def probe(check: HealthCheck, address: str, env: Mapping[str, str] | None = None) -> ProbeResult:
    """Run the probe ``check`` describes against ``address``."""
    if check.kind == "http":
        return probe_http(address, check.target, check.timeout)
    if check.kind == "command":
        argv = [str(a) for a in json.loads(check.target)]
        full_env = {**(env or {}), "INSTANCE_ADDRESS": address}
        return probe_command(argv, check.timeout, full_env)
    # tcp, and "none": without a declared check, a listening port is the least we require.
    return probe_tcp(address, check.timeout)


@dataclass
class HealthTracker:
    """Judges one instance's health from probe results over time (pure; clock injected).

    An instance becomes healthy after ``healthy_after`` consecutive successes. Failures during
    ``start_period`` do not count against it; after that, any failure resets the streak.
    """

    check: HealthCheck
    started_at: float
    streak: int = 0
    healthy: bool = False
    last: ProbeResult | None = None
    history: list[ProbeResult] = field(default_factory=list)

    def record(self, result: ProbeResult, now: float) -> bool:
        """Record one probe result at time ``now``; returns whether the instance is healthy."""
        self.last = result
        self.history = [*self.history[-9:], result]
        if result.ok:
            self.streak += 1
            if self.streak >= self.check.healthy_after:
                self.healthy = True
        else:
            self.streak = 0
            if now - self.started_at >= self.check.start_period or self.healthy:
                self.healthy = False
        return self.healthy
