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
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from castiron.errors import RouterError
from castiron.filemodes import make_private_dir
from castiron.traffic.base import LatencySummary, ReleaseCounters, RouteConfig
from castiron.traffic.proxy import parse_listen

__all__ = ["HaproxyRouter", "render_config"]

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


def _server_name(release: str, backend_id: str, address: str) -> str:
    digest = hashlib.sha256(f"{release}\0{backend_id}\0{address}".encode()).hexdigest()[:16]
    return f"s{digest}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def _backend(env: str, slot: str) -> str:
    return f"be_{_safe(env)}_{slot}"


def _static_key(cfg: RouteConfig) -> tuple[object, ...]:
    return (cfg.listen, cfg.sticky, cfg.timeouts, cfg.max_header_bytes)


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
            f"    timeout client {_ms(t.idle)}",
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
            "    http-request set-header X-Forwarded-Proto http",
            "    http-request set-header X-Forwarded-Host %[req.hdr(host)] "
            "if { req.hdr(host) -m found }",
            "    unique-id-format %[rand(4294967295),hex]%[rand(4294967295),hex]"
            "%[rand(4294967295),hex]%[rand(4294967295),hex]",
            "    http-request set-header X-Request-Id %[unique-id] "
            "unless { req.hdr(x-request-id) -m found }",
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


class HaproxyRouter:
    """The HAProxy data plane (implements :class:`castiron.traffic.base.Router`)."""

    name = "haproxy"

    def __init__(self, workdir: Path, *, haproxy_bin: str = "haproxy") -> None:
        self._dir = workdir
        self._bin = haproxy_bin
        self._envs: dict[str, _Env] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._drainer: asyncio.Task[None] | None = None
        self._log: io.BufferedWriter | None = None

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
                return
            await asyncio.sleep(0.02)
        tail = (self._dir / "haproxy.log").read_text(errors="replace")[-500:]
        await self._stop()
        raise RouterError(f"haproxy did not start: {tail.strip()}")

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
        async with self._lock:
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
        async with self._lock:
            if self._drainer is not None:
                self._drainer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._drainer
            await self._stop()
            self._envs.clear()


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
