"""The HAProxy data plane: drives a system HAProxy through its runtime API, without reloads.

This module owns the HAProxy router: it renders one configuration (a frontend per environment,
two "slot" backends per environment, a map file per environment), runs HAProxy in master-worker
mode, and applies changes at runtime over the admin stats socket:

* servers are added with ``add server`` + ``enable server``, drained with
  ``set server ... state drain``, and removed with ``del server`` once idle (or cut at the
  drain deadline with ``shutdown sessions server``);
* the frontend picks its backend from the environment's map (``@stable``, ``@canary``,
  ``@weight``); ``set map`` changes one key atomically, so a stable switch is one atomic step;
* a new environment, a changed listener or changed static options need a seamless reload
  (``reload`` on the master CLI; listeners are passed with ``expose-fd listeners``). The
  configuration file always mirrors the whole current state, so a reload loses nothing but the
  old worker's counters since the last snapshot.

Counters come from ``show stat`` per server, mapped to releases. HAProxy keeps no latency
histogram: the percentiles reported are its average total time of the last 1024 requests
(``ttime``) and ``latency_is_average`` says so. This module knows nothing of runtimes, the spec
or the agent; it never imports the builtin proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import logging
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from castiron.errors import RouterError
from castiron.filemodes import make_private_dir
from castiron.traffic.accesslog import AccessLog, access_line
from castiron.traffic.base import ROUTER_RELEASE, LatencySummary, ReleaseCounters, RouteConfig
from castiron.traffic.proxy import parse_listen

__all__ = ["HaproxyRouter", "render_config"]

log = logging.getLogger("castiron.traffic.haproxy")
_RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
"""Waits between attempts to start HAProxy again after it died (the last one repeats)."""

_SLOTS = ("a", "b")


@dataclass
class _Server:
    name: str
    slot: str
    release: str
    address: str
    draining: bool = False
    cut_at: float = 0.0


@dataclass
class _Env:
    config: RouteConfig
    slot_of: dict[str, str] = field(default_factory=dict)
    """Live release -> slot letter."""
    servers: dict[str, _Server] = field(default_factory=dict)
    retired: dict[str, list[int]] = field(default_factory=dict)
    """Per release: counts of servers no longer in HAProxy (requests, 1xx..5xx, econ, cut)."""
    frontend_retired: list[int] = field(default_factory=lambda: [0] * 6)
    """The frontend's counts (requests, 1xx..5xx) from workers replaced by a reload."""


def _server_name(release: str, backend_id: str, address: str) -> str:
    digest = hashlib.sha256(f"{release}\0{backend_id}\0{address}".encode()).hexdigest()[:16]
    return f"s{digest}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def _backend(env: str, slot: str) -> str:
    return f"be_{_safe(env)}_{slot}"


def _static_key(cfg: RouteConfig) -> tuple[object, ...]:
    return (cfg.listen, cfg.sticky, cfg.timeouts, cfg.max_header_bytes, cfg.limits, cfg.access_log)


_REQUEST_ID = "^[A-Za-z0-9._:+/=-]{1,128}$"
"""A client's X-Request-Id is kept only when it is one header of this form (else replaced)."""

_FE_KEYS = ("req_tot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx")
_SERVER_KEYS = ("stot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx")


def _access_format(mp: Path) -> str:
    """What HAProxy sends for each request (the router turns it into the JSON access line)."""
    return f"%f %Ts %ms %ci %HM %HU %ST %B %si:%sp %Ta %[be_name,map({mp},-)]"


def parse_access(message: str, environments: dict[str, str]) -> tuple[str, str] | None:
    """(environment, JSON access line) of one HAProxy log message in :func:`_access_format`;
    None when it is not one (``environments`` maps frontend names to environments)."""
    parts = message.strip().split(" ")
    if len(parts) != 11 or parts[0] not in environments:
        return None
    fe, ts, ms, client, method, path, status, sent, upstream, duration, release = parts
    try:
        line = access_line(
            at=int(ts) + int(ms) / 1000.0,
            client=client,
            method=method,
            path=path,
            status=int(status),
            sent=int(sent),
            upstream=None if upstream.startswith(("-", "<")) else upstream,
            release=None if release == "-" else release,
            duration_ms=float(duration),
        )
    except ValueError:
        return None
    return environments[fe], line


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def _map_entries(env: _Env) -> dict[str, str]:
    cfg = env.config
    entries: dict[str, str] = {}
    for release, slot in env.slot_of.items():
        entries[release] = _backend(cfg.environment, slot)
        entries[_backend(cfg.environment, slot)] = release
    stable = cfg.stable or cfg.canary
    if stable is not None:
        entries["@stable"] = _backend(cfg.environment, env.slot_of[stable.release])
    if cfg.canary is not None and cfg.stable is not None:
        entries["@canary"] = _backend(cfg.environment, env.slot_of[cfg.canary.release])
    entries["@weight"] = str(cfg.canary_weight if cfg.canary is not None else 0)
    return entries


def _hardening(cfg: RouteConfig) -> list[str]:
    """Frontend rules that make HAProxy answer like the builtin router (RFC 9112 Host rules,
    hop-by-hop abuse, request ids, body and connection limits)."""
    limits = cfg.limits
    lines = [
        f"    http-request return status 503 content-type text/plain "
        f'string "too many connections" hdr Connection close '
        f"if {{ fe_conn gt {limits.max_connections} }}",
        "    http-request deny deny_status 400 if { req.fhdr_cnt(host) gt 1 }",
        "    http-request deny deny_status 400 if HTTP_1.1 !{ req.fhdr(host) -m found }",
        "    http-request deny deny_status 400 if "
        "{ req.hdr(connection) -i -m str host content-length transfer-encoding }",
        "    http-request deny deny_status 413 if "
        f"{{ req.hdr_val(content-length) gt {limits.max_body_bytes} }}",
    ]
    if not limits.allow_get_body:
        lines += [
            "    http-request deny deny_status 400 if METH_GET "
            "{ req.hdr_val(content-length) gt 0 }",
            "    http-request deny deny_status 400 if METH_GET "
            "{ req.hdr(transfer-encoding) -m found }",
        ]
    # the body's first buffer must come within body_timeout, before a server is chosen
    lines.append(f"    http-request wait-for-body time {_ms(limits.body_timeout)}")
    return lines


def render_config(workdir: Path, envs: dict[str, _Env]) -> str:
    """The whole HAProxy configuration for ``envs`` (pure: the same state gives the same text)."""
    max_header = max([e.config.max_header_bytes for e in envs.values()] + [15360])
    drain = max([e.config.drain_timeout for e in envs.values()] + [1.0])
    lines = [
        "global",
        f"    stats socket {workdir / 'admin.sock'} mode 600 level admin expose-fd listeners",
        f"    hard-stop-after {_ms(drain + 5)}",
        f"    tune.bufsize {max_header + 1024}",
        "    tune.maxrewrite 1024",
        "",
        "defaults",
        "    mode http",
        "    option http-keep-alive",
        # A server connection is never shared between client sessions: a backend that leaves
        # a body unread would otherwise parse its bytes as another client's request.
        "    http-reuse never",
        "    retries 3",
        "    option redispatch 1",
        "    timeout tunnel 1h",
        "",
        "backend be_none",
        '    http-request return status 503 content-type text/plain string "no backends"',
        "",
    ]
    for name in sorted(envs):
        env = envs[name]
        cfg = env.config
        t = cfg.timeouts
        mp = workdir / f"{_safe(name)}.map"
        lines += [
            f"frontend fe_{_safe(name)}",
            f"    bind {cfg.listen}",
            *(
                [
                    f"    log {workdir / 'log.sock'} format raw local0",
                    f'    log-format "{_access_format(mp)}"',
                ]
                if cfg.access_log
                else []
            ),
            f"    maxconn {cfg.limits.max_connections + 64}",
            f"    timeout client {_ms(min(t.idle, cfg.limits.body_timeout))}",
            f"    timeout http-request {_ms(t.header_read)}",
            f"    timeout http-keep-alive {_ms(t.idle)}",
            '    http-request set-header X-Forwarded-For "%[req.fhdr(x-forwarded-for)], %[src]" '
            "if { req.hdr(x-forwarded-for) -m found }",
            "    http-request set-header X-Forwarded-For %[src] "
            "unless { req.hdr(x-forwarded-for) -m found }",
            # HAProxy accepts control bytes in values and sizes headers by tune.bufsize only
            "    http-request deny deny_status 400 if "
            "{ req.hdrs -m reg [\\\\x00-\\\\x08\\\\x0b\\\\x0c\\\\x0e-\\\\x1f\\\\x7f] }",
            "    http-request deny deny_status 400 if "
            f"{{ req.hdrs,length gt {cfg.max_header_bytes} }}",
            *_hardening(cfg),
            "    http-request set-header X-Forwarded-Proto http",
            "    http-request set-header X-Forwarded-Host %[req.hdr(host)] "
            "if { req.hdr(host) -m found }",
            "    unique-id-format %[rand(4294967295),hex]%[rand(4294967295),hex]"
            "%[rand(4294967295),hex]%[rand(4294967295),hex]",
            "    http-request set-header X-Request-Id %[unique-id] unless "
            "{ req.fhdr_cnt(x-request-id) eq 1 } "
            f"{{ req.fhdr(x-request-id) -m reg {_REQUEST_ID} }}",
            f"    http-request set-var(txn.cw) str(@weight),map({mp},0)",
            "    http-request set-var(txn.r) rand(100),sub(txn.cw)",
        ]
        sticky = cfg.sticky
        if sticky is not None and sticky.kind == "cookie":
            lines.append(
                f"    http-request set-var(txn.be) req.cook({sticky.name}),map({mp}) "
                f"if {{ req.cook({sticky.name}),map({mp}) -m found }}"
            )
        elif sticky is not None:
            lines.append(
                f"    http-request set-var(txn.r) req.hdr({sticky.name}),crc32,mod(100),"
                f"sub(txn.cw) if {{ req.hdr({sticky.name}) -m found }}"
            )
        lines += [
            f"    http-request set-var(txn.be) str(@canary),map({mp}) "
            "if !{ var(txn.be) -m found } { var(txn.r) -m int lt 0 }",
            f"    http-request set-var(txn.be) str(@stable),map({mp}) "
            "if !{ var(txn.be) -m found }",
            "    use_backend %[var(txn.be)] if { var(txn.be) -m found }",
            "    default_backend be_none",
        ]
        if sticky is not None and sticky.kind == "cookie":
            lines.append(
                f'    http-response add-header Set-Cookie "{sticky.name}=%[be_name,map({mp})]; '
                'Path=/; HttpOnly" if { be_name,map(' + str(mp) + ") -m found }"
            )
        lines.append("")
        for slot in _SLOTS:
            lines += [
                f"backend {_backend(name, slot)}",
                "    balance roundrobin",
                f"    timeout connect {_ms(t.connect)}",
                f"    timeout server {_ms(t.backend_response)}",
                f"    errorfile 503 {workdir / '502.http'}",
            ]
            for server in sorted(env.servers.values(), key=lambda s: s.name):
                if server.slot == slot and not server.draining:
                    lines.append(f"    server {server.name} {server.address} weight 100")
            lines.append("")
    return "\n".join(lines) + "\n"


class _LogReceiver(asyncio.DatagramProtocol):
    """Receives HAProxy's access log messages on a Unix datagram socket."""

    def __init__(self, router: HaproxyRouter) -> None:
        self.router = router

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.router._on_log(data.decode("utf-8", errors="replace"))


class HaproxyRouter:
    """The HAProxy data plane (implements :class:`castiron.traffic.base.Router`)."""

    name = "haproxy"

    def __init__(
        self, workdir: Path, *, haproxy_bin: str = "haproxy", access_log_dir: Path | None = None
    ) -> None:
        self._dir = workdir
        self._bin = haproxy_bin
        self._access_dir = access_log_dir
        self._access: dict[str, AccessLog] = {}
        self._log_transport: asyncio.DatagramTransport | None = None
        self._envs: dict[str, _Env] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._drainer: asyncio.Task[None] | None = None
        self._log: io.BufferedWriter | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def _admin(self) -> Path:
        return self._dir / "admin.sock"

    @property
    def _master(self) -> Path:
        return self._dir / "master.sock"

    # --- runtime API -----------------------------------------------------------------------------
    async def _cli(self, command: str, sock: Path | None = None) -> str:
        """Send one command (or several, ``;``-separated) and return the answer.

        Raises:
            RouterError: when the socket cannot be reached.
        """
        path = sock or self._admin
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
        except (OSError, TimeoutError) as exc:
            raise RouterError(f"haproxy: cannot reach {path}: {exc}") from exc
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        except (OSError, TimeoutError) as exc:
            raise RouterError(f"haproxy: {command.split()[0]!r} failed: {exc}") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data.decode(errors="replace")

    def _cli_sync(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self._admin))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    async def _worker_pid(self) -> int | None:
        try:
            info = await self._cli("show info")
        except RouterError:
            return None
        for line in info.splitlines():
            if line.startswith("Pid:"):
                return int(line.split(":", 1)[1])
        return None

    # --- process ---
    def _write_files(self) -> None:
        make_private_dir(self._dir)
        (self._dir / "502.http").write_bytes(
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: 33\r\n"
            b"Connection: close\r\n\r\nno backend accepted the request.\n"
        )
        for name, env in self._envs.items():
            entries = _map_entries(env)
            text = "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))
            _atomic_write(self._dir / f"{_safe(name)}.map", text)
        _atomic_write(self._dir / "haproxy.cfg", render_config(self._dir, self._envs))

    async def _check(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            self._bin,
            "-c",
            "-q",
            "-f",
            str(self._dir / "haproxy.cfg"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RouterError(f"haproxy refused the configuration: {out.decode().strip()[-500:]}")

    async def _start(self) -> None:
        await self._check()
        self._log = (self._dir / "haproxy.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._bin,
                "-W",
                "-S",
                f"{self._master},mode,600",
                "-f",
                str(self._dir / "haproxy.cfg"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
            )
        except OSError as exc:
            raise RouterError(f"haproxy: cannot run {self._bin}: {exc}") from exc
        for _ in range(500):
            if self._proc.returncode is not None:
                break
            if await self._worker_pid() is not None:
                self._watcher = asyncio.get_running_loop().create_task(self._watch(self._proc))
                return
            await asyncio.sleep(0.02)
        tail = (self._dir / "haproxy.log").read_text(errors="replace")[-500:]
        await self._stop()
        raise RouterError(f"haproxy did not start: {tail.strip()}")

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Start HAProxy again when it dies by itself (killed, crashed): from the files that
        hold every environment's current routes, so traffic comes back without a command."""
        code = await proc.wait()
        async with self._lock:
            if self._proc is not proc or self._closed:
                return  # stopped on purpose, or already started again
            log.warning("haproxy exited with status %s: starting it again", code)
            await self._restart()

    async def _restart(self) -> None:
        """Start HAProxy again (call with the lock held), retrying with growing waits."""
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for attempt in range(1_000_000):
            if self._closed or not self._envs:
                return
            try:
                self._write_files()
                await self._start()
                return
            except (RouterError, OSError) as exc:
                delay = _RESTART_DELAYS[min(attempt, len(_RESTART_DELAYS) - 1)]
                log.error("haproxy could not be started again (%s); retrying in %ss", exc, delay)
                await asyncio.sleep(delay)

    async def _reload(self) -> None:
        await self._check()
        before = await self._worker_pid()
        await self._cli("reload", self._master)
        for _ in range(500):
            pid = await self._worker_pid()
            if pid is not None and pid != before:
                return
            await asyncio.sleep(0.02)
        raise RouterError("haproxy: the reload did not bring up a new worker (see haproxy.log)")

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)  # soft stop: finish in-flight requests
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                try:
                    await asyncio.wait_for(proc.wait(), wait)
                    break
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
            await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    # --- access log ---
    async def _open_log_socket(self) -> None:
        if self._log_transport is not None:
            return
        path = self._dir / "log.sock"
        self._dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _LogReceiver(self), local_addr=str(path), family=socket.AF_UNIX
            )
        except OSError as exc:
            raise RouterError(f"haproxy: cannot open the access log socket {path}: {exc}") from exc
        self._log_transport = transport

    def _on_log(self, message: str) -> None:
        frontends = {f"fe_{_safe(name)}": name for name in self._envs}
        parsed = parse_access(message, frontends)
        if parsed is None or self._access_dir is None:
            return
        env, line = parsed
        access = self._access.get(env)
        if access is None:
            access = self._access[env] = AccessLog(self._access_dir / f"{env}.log")
        access.write(line)
        access.flush()

    def _close_logs(self, keep: set[str]) -> None:
        for env in [e for e in self._access if e not in keep]:
            self._access.pop(env).close()

    # --- Router ---
    async def apply(self, config: RouteConfig) -> None:
        """Create the environment's listener if needed and switch to ``config`` atomically.

        Raises:
            RouterError: when HAProxy refuses the configuration or a command, or the listen
                address cannot be bound.
        """
        parse_listen(config.listen)
        for bset in (config.stable, config.canary):
            for backend in bset.backends if bset else ():
                parse_listen(backend.address)
        if config.access_log and self._access_dir is None:
            config = replace(config, access_log=False)  # nowhere to write it
        async with self._lock:
            if self._proc is not None and self._proc.returncode is not None:
                await self._restart()  # it died and its watcher has not seen it yet
            if config.access_log:
                await self._open_log_socket()
            env = self._envs.get(config.environment)
            if env is None or _static_key(env.config) != _static_key(config):
                await self._apply_with_reload(env, config)
            else:
                await self._apply_runtime(env, config)
            self._write_files()
            if self._drainer is None or self._drainer.done():
                self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    def _plan(self, env: _Env, config: RouteConfig) -> tuple[list[_Server], list[_Server]]:
        """Assign slots to the new releases; returns (servers to add, servers to drain)."""
        releases = [b.release for b in (config.stable, config.canary) if b is not None]
        slot_of = {r: env.slot_of[r] for r in releases if r in env.slot_of}
        for r in releases:
            if r not in slot_of:
                free = [s for s in _SLOTS if s not in slot_of.values()]
                slot_of[r] = free[0]
        wanted: dict[str, _Server] = {}
        for bset in (config.stable, config.canary):
            if bset is None:
                continue
            for b in bset.backends:
                name = _server_name(bset.release, b.id, b.address)
                wanted[name] = _Server(name, slot_of[bset.release], bset.release, b.address)
        add = [s for n, s in wanted.items() if n not in env.servers or env.servers[n].draining]
        drain = [s for n, s in env.servers.items() if n not in wanted and not s.draining]
        env.slot_of = slot_of
        env.config = config
        return add, drain

    async def _apply_with_reload(self, env: _Env | None, config: RouteConfig) -> None:
        if env is None or env.config.listen != config.listen:
            _probe_bind(config)
        if env is not None:
            self._retire_all(env)
        new = _Env(config, retired=env.retired if env else {})
        add, _ = self._plan(new, config)
        for server in add:
            new.servers[server.name] = server
        old = dict(self._envs)
        self._envs[config.environment] = new
        try:
            self._write_files()
            if self._proc is None:
                await self._start()
            else:
                for other in self._envs.values():
                    if other is not new:
                        self._retire_all(other)
                await self._reload()
        except RouterError:
            self._envs = old
            self._write_files()
            raise

    async def _apply_runtime(self, env: _Env, config: RouteConfig) -> None:
        add, drain = self._plan(env, config)
        be = config.environment
        for server in add:
            backend = _backend(be, server.slot)
            if server.name in env.servers:  # was draining: bring it back
                await self._cmd(f"set server {backend}/{server.name} state ready")
            else:
                await self._cmd(f"add server {backend}/{server.name} {server.address} weight 100")
                await self._cmd(f"enable server {backend}/{server.name}")
            env.servers[server.name] = server
        mp = self._dir / f"{_safe(be)}.map"
        entries = _map_entries(env)
        current = await self._cli(f"show map {mp}")
        present = {}
        for line in current.splitlines():
            parts = line.split()
            if len(parts) >= 3:
                present[parts[1]] = parts[2]
        # Release lookups first, then the weight, then the stable pointer: each is atomic.
        order = sorted(entries, key=lambda k: (k == "@stable", k.startswith("@")))
        burst = []
        for key in order:
            if key in present:
                if present[key] != entries[key]:
                    burst.append(f"set map {mp} {key} {entries[key]}")
            else:
                burst.append(f"add map {mp} {key} {entries[key]}")
        for key in present:
            if key not in entries:
                burst.append(f"del map {mp} {key}")
        if burst:
            await self._cmd(";".join(burst))
        now = asyncio.get_running_loop().time()
        if drain:
            await self._cmd(
                ";".join(f"set server {_backend(be, s.slot)}/{s.name} state drain" for s in drain)
            )
        for server in drain:
            server.draining = True
            server.cut_at = now + config.drain_timeout

    async def _cmd(self, command: str) -> str:
        out = await self._cli(command)
        for line in out.splitlines():
            low = line.lower()
            if low.startswith(("no such", "unknown", "invalid", "require", "error")) or (
                "not found" in low or "can't" in low or "cannot" in low
            ):
                raise RouterError(f"haproxy refused {command.split(';')[0]!r}: {line.strip()}")
        return out

    async def _drain_loop(self) -> None:
        """Remove drained servers once idle; cut them at their deadline."""
        while True:
            await asyncio.sleep(0.1)
            pending = False
            async with self._lock:
                if self._proc is None:
                    return
                stats = await self._stats()
                now = asyncio.get_running_loop().time()
                for env in self._envs.values():
                    for server in list(env.servers.values()):
                        if not server.draining:
                            continue
                        pending = True
                        backend = _backend(env.config.environment, server.slot)
                        row = stats.get((backend, server.name))
                        active = int(row.get("scur") or 0) if row else 0
                        if active and now < server.cut_at:
                            continue
                        if active:
                            self._bump(env, server.release, 6, active)
                        await self._cli(
                            f"set server {backend}/{server.name} state maint;"
                            f"shutdown sessions server {backend}/{server.name}"
                        )
                        out = await self._cli(f"del server {backend}/{server.name}")
                        if "deleted" in out.lower():
                            if row:
                                self._retire(env, server.release, row)
                            del env.servers[server.name]
            if not pending:
                return

    # --- counters ---
    async def _stats(self) -> dict[tuple[str, str], dict[str, str]]:
        return _parse_stat(await self._cli("show stat"))

    @staticmethod
    def _bump(env: _Env, release: str, index: int, n: int) -> None:
        env.retired.setdefault(release, [0] * 8)[index] += n

    def _retire(self, env: _Env, release: str, row: dict[str, str]) -> None:
        for i, key in enumerate(
            ("stot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx")
        ):
            self._bump(env, release, i, int(row.get(key) or 0))
        self._bump(env, release, 7, sum(int(row.get(k) or 0) for k in ("econ", "wretr", "wredis")))

    def _retire_all(self, env: _Env) -> None:
        """Before a reload: fold the running worker's counters into the retired totals."""
        if self._proc is None:
            return
        try:
            stats = _parse_stat(self._cli_sync("show stat"))
        except OSError:
            return
        for server in env.servers.values():
            row = stats.get((_backend(env.config.environment, server.slot), server.name))
            if row:
                self._retire(env, server.release, row)
        fe = stats.get((f"fe_{_safe(env.config.environment)}", "FRONTEND"))
        for i, key in enumerate(_FE_KEYS):
            env.frontend_retired[i] += int((fe or {}).get(key) or 0)
        # the old worker finishes draining servers; the new configuration does not have them
        env.servers = {n: s for n, s in env.servers.items() if not s.draining}

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """Per-release counters (``show stat`` per server plus retired servers' totals)."""
        env = self._envs.get(environment)
        if env is None:
            return []
        totals = {r: list(v) for r, v in env.retired.items()}
        times: dict[str, list[tuple[int, int]]] = {}
        stats: dict[tuple[str, str], dict[str, str]] = {}
        if self._proc is not None:
            with contextlib.suppress(OSError):
                stats = _parse_stat(self._cli_sync("show stat"))
        for server in env.servers.values():
            row = stats.get((_backend(environment, server.slot), server.name))
            t = totals.setdefault(server.release, [0] * 8)
            if not row:
                continue
            for i, key in enumerate(
                ("stot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx")
            ):
                t[i] += int(row.get(key) or 0)
            t[7] += sum(int(row.get(k) or 0) for k in ("econ", "wretr", "wredis"))
            times.setdefault(server.release, []).append(
                (int(row.get("ttime") or 0), int(row.get("stot") or 0))
            )
        fe = stats.get((f"fe_{_safe(environment)}", "FRONTEND")) or {}
        front = [env.frontend_retired[i] + int(fe.get(k) or 0) for i, k in enumerate(_FE_KEYS)]
        # what the frontend answered that no server did: refusals, limits, no backends
        own = [max(0, front[i] - sum(t[i] for t in totals.values())) for i in range(6)]
        result = []
        for release, t in sorted(totals.items()):
            weighted = times.get(release, [])
            n = sum(w for _, w in weighted)
            avg = float(sum(v * w for v, w in weighted) / n) if n else 0.0
            result.append(
                ReleaseCounters(
                    release=release,
                    requests=t[0],
                    responses_2xx=t[2],
                    responses_3xx=t[3],
                    responses_4xx=t[4],
                    responses_5xx=t[5],
                    connect_errors=t[7],
                    drained_cut=t[6],
                    latency=LatencySummary(avg, avg, avg),
                    latency_is_average=True,
                )
            )
        if any(own):  # listed after the releases
            result.append(
                ReleaseCounters(
                    release=ROUTER_RELEASE,
                    requests=sum(own[1:]),
                    responses_2xx=own[2],
                    responses_3xx=own[3],
                    responses_4xx=own[4],
                    responses_5xx=own[5],
                    connect_errors=0,
                    drained_cut=0,
                    latency=LatencySummary(0.0, 0.0, 0.0),
                    latency_is_average=True,
                )
            )
        return result

    async def remove(self, environment: str) -> None:
        """Drop the environment's frontend and backends with a seamless reload."""
        async with self._lock:
            if self._envs.pop(environment, None) is None:
                return
            if not self._envs:
                await self._stop()
                return
            self._write_files()
            await self._reload()

    async def close(self) -> None:
        """Stop HAProxy: a soft stop lets in-flight requests finish (up to ``hard-stop-after``)."""
        self._closed = True
        async with self._lock:
            if self._drainer is not None:
                self._drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drainer
            await self._stop()
            self._envs.clear()
            if self._log_transport is not None:
                self._log_transport.close()
                self._log_transport = None
            self._close_logs(set())
            watcher, self._watcher = self._watcher, None
        if watcher is not None:  # it sees the process stopped on purpose and returns
            await watcher


def _parse_stat(text: str) -> dict[tuple[str, str], dict[str, str]]:
    text = text.lstrip("# ")
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows[(row.get("pxname", ""), row.get("svname", ""))] = row
    return rows


def _probe_bind(config: RouteConfig) -> None:
    host, port = parse_listen(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RouterError(
                f"environment {config.environment}: cannot listen on {config.listen}: "
                f"{exc.strerror or exc}"
            ) from exc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
