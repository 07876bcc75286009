"""HTTP to one registry: connections, TLS, the plain-HTTP rule, retries with backoff.

Owns kept-alive connections (a small pool per origin, safe to share between threads), the TLS
context (system CAs plus a CA file for the registry: given, or found in a ``certs.d``
directory laid out as Docker's ``<dir>/<host:port>/*.crt``), and the rule that plain HTTP is
only ever tried for a loopback registry or one named insecure, and then only after HTTPS failed
to shake hands. Connection errors and 5xx/429 answers are retried with exponential backoff.

Uses only the standard library (``http.client``, ``ssl``). Knows nothing of the distribution
API's paths, of credentials, of the store or of any runtime.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from castiron.errors import RegistryError
from castiron.images.registry.reference import is_loopback, split_host

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_TIMEOUT = 60.0
USER_AGENT = "castiron"


@dataclass(frozen=True)
class TransportOptions:
    """How to reach registries: retries, timeouts, CA files, which may speak plain HTTP."""

    insecure: frozenset[str] = frozenset()
    """Registries (``host[:port]``) that may be reached over plain HTTP or unverified TLS."""
    ca_file: Path | None = None
    """A CA bundle trusted (on top of the system CAs) for every registry."""
    certs_dirs: tuple[Path, ...] = ()
    """Directories holding ``<host:port>/*.crt`` CA files, as Docker's ``certs.d``."""
    attempts: int = 5
    """Tries per request (1 means no retry)."""
    backoff: float = 0.2
    """Seconds before the first retry; doubled each time (capped at 5 s)."""
    timeout: float = DEFAULT_TIMEOUT
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)


class Response:
    """A response whose body is either read (:attr:`body`) or still streaming (:meth:`stream`)."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        url: str,
        raw: http.client.HTTPResponse | None,
        release: Callable[[bool], None],
    ) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.url = url
        self._raw = raw
        self._release = release
        self.body = b""

    def header(self, name: str) -> str | None:
        """A header by (case-insensitive) name."""
        return self.headers.get(name.lower())

    def read_all(self, limit: int) -> bytes:
        """Read the whole body (at most ``limit`` bytes; more is an error) and release.

        Raises:
            RegistryError: when the body is longer than ``limit``.
        """
        if self._raw is None:
            return self.body
        try:
            data = self._raw.read(limit + 1)
            if len(data) > limit:
                self.close(reuse=False)
                raise RegistryError(f"{self.url}: response is larger than {limit} bytes")
            self._raw.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close(reuse=False)
            raise ConnectionError(str(exc) or type(exc).__name__) from exc
        self.body = data
        self.close(reuse=True)
        return data

    def stream(self, block: int = 1 << 20) -> Iterator[bytes]:
        """Yield the body in blocks; connection errors surface as :class:`OSError` or
        :class:`http.client.HTTPException` (the caller decides whether to resume)."""
        assert self._raw is not None
        try:
            while chunk := self._raw.read1(block):
                yield chunk
        except BaseException:
            self.close(reuse=False)
            raise
        self.close(reuse=True)

    def close(self, reuse: bool = False) -> None:
        """Give the connection back (``reuse``) or drop it."""
        if self._raw is None:
            return
        raw, self._raw = self._raw, None
        will_close = raw.will_close
        raw.close()  # the response's file only; the connection stays open for reuse
        self._release(reuse and not will_close)


class Transport:
    """Sends requests to one registry host; used by one :class:`RegistryClient`."""

    def __init__(self, host: str, options: TransportOptions) -> None:
        self.host = host
        self.options = options
        self._insecure = host in options.insecure
        self._may_fallback = self._insecure or is_loopback(host)
        self.scheme = "https"
        self._scheme_known = False
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None  # loading the system CAs costs; on use

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = self._tls_context()
        return self._context

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        files: list[Path] = []
        if self.options.ca_file is not None:
            files.append(self.options.ca_file)
        for base in self.options.certs_dirs:
            folder = base / self.host
            if folder.is_dir():
                files.extend(sorted(folder.glob("*.crt")))
        for f in files:
            try:
                ctx.load_verify_locations(cafile=str(f))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"cannot load CA file {f}: {exc}") from None
        if self._insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @property
    def base_url(self) -> str:
        """``https://host`` (or ``http://host`` once plain HTTP was chosen)."""
        return f"{self.scheme}://{self.host}"

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            conns = [c for pool in self._idle.values() for c in pool]
            self._idle.clear()
        for c in conns:
            c.close()

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        with self._lock:
            pool = self._idle.get((scheme, netloc))
            if pool:
                return pool.pop()
        host, port = split_host(netloc)
        if scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=self.options.timeout, context=self._tls()
            )
        return http.client.HTTPConnection(host, port, timeout=self.options.timeout)

    def _give_back(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault((scheme, netloc), []).append(conn)

    def once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        stream: bool,
    ) -> Response:
        """One attempt, no retry: connection errors surface as :class:`OSError` or
        :class:`http.client.HTTPException` (for callers that resume rather than repeat)."""
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._connection(parts.scheme, parts.netloc)
        sent = {"User-Agent": USER_AGENT, **headers}
        if body is not None:
            sent["Content-Length"] = str(len(body))
        try:
            conn.request(method, target or "/", body=body, headers=sent)
            raw = conn.getresponse()
        except BaseException:
            conn.close()
            raise

        def release(reuse: bool) -> None:
            if reuse:
                self._give_back(parts.scheme, parts.netloc, conn)
            else:
                conn.close()

        resp = Response(raw.status, dict(raw.getheaders()), url, raw, release)
        if method == "HEAD":
            resp.close(reuse=True)
        elif not stream or raw.status >= 300:
            resp.read_all(1 << 20 if raw.status >= 300 else 1 << 26)
        return resp

    def _choose_scheme(self) -> None:
        """Plain HTTP may only be used for a loopback or insecure registry, and only when it
        does not speak TLS: a bare handshake (no certificate check, no CA loading) tells."""
        if self._scheme_known:
            return
        if not self._may_fallback:
            self._scheme_known = True
            return
        host, port = split_host(self.host)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        try:
            with (
                socket.create_connection((host, port or 443), timeout=self.options.timeout) as raw,
                probe.wrap_socket(raw, server_hostname=host),
            ):
                pass
        except socket.gaierror:
            raise RegistryError(
                f"unknown registry {self.host}: its host name does not resolve"
            ) from None
        except (ssl.SSLError, ConnectionResetError):
            self.scheme = "http"  # it answered, but not with TLS
        except OSError:
            return  # unreachable for now: the request itself reports (and retries) that
        self._scheme_known = True

    def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        *,
        stream: bool = False,
    ) -> Response:
        """Send one request (``url`` absolute, or a path on this registry), retrying
        connection errors and 5xx/429 answers with backoff. With ``stream`` a 2xx body is left
        unread for :meth:`Response.stream`.

        Raises:
            RegistryError: when every attempt failed to connect, or the registry kept
                failing (the last status is named).
        """
        self._choose_scheme()
        if url.startswith("/"):
            url = self.base_url + url
        delay = self.options.backoff
        last = ""
        for attempt in range(1, max(1, self.options.attempts) + 1):
            try:
                resp = self.once(method, url, headers or {}, body, stream)
            except ssl.SSLCertVerificationError as exc:
                raise RegistryError(
                    f"registry {self.host}: TLS certificate not trusted ({exc.verify_message})"
                ) from None
            except socket.gaierror:
                raise RegistryError(
                    f"unknown registry {self.host}: its host name does not resolve"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                last = _describe(exc)
            else:
                if resp.status not in RETRY_STATUSES:
                    return resp
                last = f"HTTP {resp.status}"
            if attempt < self.options.attempts:
                self.options.sleep(min(delay, 5.0))
                delay *= 2
        raise RegistryError(
            f"registry {self.host}: {method} {urllib.parse.urlsplit(url).path} failed after "
            f"{self.options.attempts} attempt(s): {last}"
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text or type(exc).__name__


__all__ = ["RETRY_STATUSES", "Response", "Transport", "TransportOptions"]
