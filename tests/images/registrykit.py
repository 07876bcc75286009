"""Real registries for the push/pull tests: Debian's ``docker-registry`` (distribution) on
127.0.0.1 with a free port, plain HTTP or TLS (a CA made here) with htpasswd Basic auth, and a
fault-injecting proxy that sits in front of one.

The registry's access log is kept so tests can count what was really sent (``PUT``, ``HEAD``,
``PATCH`` lines).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.testkit import wait_for

from castiron.ports import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
USER = "ci-bot"
PASSWORD = "s3cret-pass"


@dataclass
class Registry:
    """A running registry."""

    host: str
    """``127.0.0.1:PORT``."""
    root: Path
    log: Path
    ca_file: Path | None = None

    def log_lines(self) -> list[str]:
        """The access log so far (one request a line)."""
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if '"' in line and ' HTTP/1.1" ' in line
        ]

    def requests(self, method: str, fragment: str = "") -> list[str]:
        """Access-log lines of ``method`` requests whose path holds ``fragment``."""
        return [
            line
            for line in self.log_lines()
            if f'"{method} ' in line and fragment in line.split('"')[1]
        ]


def need_registry() -> None:
    """Skip (a failure in CI, see tests/conftest.py) without Debian's docker-registry."""
    if not Path(REGISTRY_BIN).is_file():
        pytest.skip("docker-registry is not installed (apt-get install docker-registry)")


def make_tls(tmp: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1: (ca.crt, server.crt, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "castiron test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    tmp.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = tmp / "ca.crt", tmp / "server.crt", tmp / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@contextlib.contextmanager
def run_registry(tmp: Path, *, tls: bool = False) -> Iterator[Registry]:
    """Start ``docker-registry`` on 127.0.0.1 (TLS + htpasswd Basic auth when ``tls``)."""
    need_registry()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    host = f"127.0.0.1:{port}"
    root = tmp / "data"
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {root}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {host}",
    ]
    ca_file = None
    if tls:
        if shutil.which("htpasswd") is None:
            pytest.skip("htpasswd is not installed (apt-get install apache2-utils)")
        ca_file, cert, key = make_tls(tmp / "tls")
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        htpasswd = tmp / "htpasswd"
        subprocess.run(
            ["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD],
            check=True,
            capture_output=True,
        )
        lines += ["auth:", "  htpasswd:", "    realm: castiron-test", f"    path: {htpasswd}"]
    config = tmp / "config.yml"
    config.write_text("\n".join(lines) + "\n")
    log = tmp / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    try:

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True

        wait_for(ready, timeout=30, what=f"docker-registry on {host}")
        yield Registry(host, root, log, ca_file)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


Rule = Callable[[str, str], "Fault | None"]
"""Given (method, path) of a request, the fault to inject (or None to pass it on)."""


@dataclass
class Fault:
    """What the proxy does to one response."""

    kind: str
    """``drop`` (close mid-body after ``after`` bytes), ``corrupt`` (flip a byte of the body),
    ``close`` (hang up without answering), ``swallow`` (pass the request on, then hang up
    without answering), ``huge`` (announce a 5 MiB manifest) or ``status`` (answer ``status``
    without asking the registry)."""
    after: int = 0
    status: int = 503


@dataclass
class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of a plain-HTTP registry; ``rule`` decides
    which responses to break. Every request line it saw is kept in :attr:`seen`."""

    upstream: str
    rule: Rule
    host: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    bearer: tuple[str, str] | None = None
    """(user, password): answer like a registry with a token service (401 + a Bearer
    challenge; ``GET /token`` gives a token for those Basic credentials)."""
    referrers_api: bool = False
    """Answer ``GET /v2/<repo>/referrers/<digest>`` (OCI 1.1) from the fallback tag."""
    tokens: list[str] = field(default_factory=list)
    """The scopes tokens were asked for."""
    _server: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> FaultProxy:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        srv.settimeout(0.2)
        self._server = srv
        self.host = f"127.0.0.1:{srv.getsockname()[1]}"
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        if self._server is not None:
            self._server.close()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    @staticmethod
    def _send(conn: socket.socket, status: str, body: bytes, extra: str = "") -> None:
        conn.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def _answer_auth(self, conn: socket.socket, path: str, headers: dict[str, str]) -> bool:
        """True when the request was answered here (a token, or a challenge)."""
        import base64
        import json
        import urllib.parse

        assert self.bearer is not None
        token = "tok-" + base64.b64encode(":".join(self.bearer).encode()).decode()[:12]
        if path.startswith("/token"):
            basic = "Basic " + base64.b64encode(":".join(self.bearer).encode()).decode()
            if headers.get("authorization") != basic:
                self._send(conn, "401 Unauthorized", b'{"errors":[{"code":"UNAUTHORIZED"}]}')
                return True
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
            self.tokens.append(" ".join(query.get("scope", [])))
            self._send(conn, "200 OK", json.dumps({"token": token}).encode())
            return True
        if headers.get("authorization") == f"Bearer {token}":
            return False
        challenge = f'WWW-Authenticate: Bearer realm="http://{self.host}/token",service="test"\r\n'
        self._send(conn, "401 Unauthorized", b'{"errors":[{"code":"UNAUTHORIZED"}]}', challenge)
        return True

    def _answer_referrers(self, conn: socket.socket, path: str) -> None:
        import http.client

        repo, _, digest = path.removeprefix("/v2/").partition("/referrers/")
        up = http.client.HTTPConnection(*self.upstream.split(":"), timeout=30)
        try:
            up.request(
                "GET",
                f"/v2/{repo}/manifests/{digest.replace(':', '-')}",
                headers={"Accept": "application/vnd.oci.image.index.v1+json"},
            )
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        if resp.status != 200:
            data = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
            data += b'"manifests":[]}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )

    def _serve(self, conn: socket.socket) -> None:
        import http.client

        conn.settimeout(30)
        reader = conn.makefile("rb")  # buffered: peek works
        try:
            if reader.peek(1)[:1] == b"\x16":  # a TLS ClientHello: answer as Go's server does
                conn.sendall(
                    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request "
                    b"to an HTTPS server.\n"
                )
                return
            while not self._stop.is_set():
                line = reader.readline(65537)
                if not line:
                    return
                try:
                    method, path, _ = line.decode("latin-1").split(" ", 2)
                except ValueError:
                    return
                headers: list[tuple[str, str]] = []
                length = 0
                while True:
                    h = reader.readline(65537).decode("latin-1")
                    if h in ("\r\n", "\n", ""):
                        break
                    name, _, value = h.partition(":")
                    value = value.strip()
                    if name.lower() == "content-length":
                        length = int(value)
                    headers.append((name, value))
                body = reader.read(length) if length else b""
                self.seen.append((method, path))
                sent = {k.lower(): v for k, v in headers}
                if self.bearer is not None and self._answer_auth(conn, path, sent):
                    continue
                if self.referrers_api and "/referrers/" in path:
                    self._answer_referrers(conn, path)
                    continue
                fault = self.rule(method, path)
                if fault is not None and fault.kind == "close":
                    return  # no answer at all
                if fault is not None and fault.kind == "huge":
                    conn.sendall(
                        f"HTTP/1.1 200 OK\r\nContent-Type: {MANIFEST}\r\n"
                        f"Content-Length: {5 << 20}\r\n\r\n".encode()
                        + b"{"
                        + b" " * 4096
                    )
                    return
                if fault is not None and fault.kind == "status":
                    msg = b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'
                    conn.sendall(
                        f"HTTP/1.1 {fault.status} Injected\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(msg)}\r\n\r\n".encode()
                        + msg
                    )
                    continue
                up = http.client.HTTPConnection(*self.upstream.split(":"), timeout=30)
                try:
                    fwd = {k: v for k, v in headers if k.lower() not in ("host", "connection")}
                    up.request(method, path, body=body if body or length else None, headers=fwd)
                    resp = up.getresponse()
                    data = resp.read()
                    out_headers = [
                        (k, v)
                        for k, v in resp.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")
                    ]
                finally:
                    up.close()
                if fault is not None and fault.kind == "corrupt" and data:
                    data = bytes([data[0] ^ 0x01]) + data[1:]
                head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n"
                head += "".join(
                    f"{k}: {v.replace(self.upstream, self.host)}\r\n" for k, v in out_headers
                )
                head += f"Content-Length: {len(data)}\r\n\r\n"
                if fault is not None and fault.kind == "drop":
                    conn.sendall(head.encode() + data[: fault.after])
                    return
                if fault is not None and fault.kind == "swallow":
                    return  # the registry has it; the client never hears so
                conn.sendall(head.encode() + (b"" if method == "HEAD" else data))
        except OSError:
            return
        finally:
            reader.close()
            conn.close()


@contextlib.contextmanager
def fault_proxy(upstream: str, rule: Rule, **options: object) -> Iterator[FaultProxy]:
    """Run a :class:`FaultProxy` in front of ``upstream`` for the block."""
    proxy = FaultProxy(upstream, rule, **options).start()  # type: ignore[arg-type]
    try:
        yield proxy
    finally:
        proxy.stop()
