"""Router hardening, the same on every data plane: no response reaches another client than the
one whose request caused it (request smuggling through unread bodies), strict Host rules,
request ids, and limits (body size, body idle time, connections) counted in the metrics."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from castiron.traffic.base import ROUTER_RELEASE, Limits, RouteConfig
from castiron.traffic.proxy import BuiltinRouter
from testkit import wait_for
from traffic.backends import HttpBackend, NaiveBackend
from traffic.conftest import Harness, LoopThread, bset

MakeBackend = Callable[[str], HttpBackend]

SMUGGLE = (
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 34\r\n\r\nGET /version HTTP/1.1\r\nX-Ignore: "
)
"""The attack as reported. Its body is 33 bytes, one short of its Content-Length."""
SMUGGLE_COMPLETE = SMUGGLE.replace(b"Content-Length: 34", b"Content-Length: 33")
"""The same attack with a complete body: the form that reaches a backend whole."""


def exchange(port: int, raw: bytes, sock: socket.socket | None = None) -> tuple[int, bytes]:
    """Send ``raw`` on ``sock`` (a new connection when None) and read one response."""
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(raw)
        r = http.client.HTTPResponse(s)
        try:
            r.begin()
            return r.status, r.read()
        finally:
            r.close()
    finally:
        if sock is None:
            s.close()


def smuggling_rounds(h: Harness, backends: list[NaiveBackend], attack: bytes) -> int:
    """20 rounds: an attacker sends ``attack`` 4 times on one connection and leaves, then a
    victim sends 4 requests (with a session cookie) on a new connection. Returns the rounds in
    which a victim got a response to another request than its own."""
    mixed = 0
    for i in range(20):
        attacker = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        for _ in range(4):
            if exchange(h.port, attack, attacker)[0] != 200:  # refused: the router closed it
                attacker.close()
                attacker = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        attacker.close()
        with socket.create_connection(("127.0.0.1", h.port), timeout=10) as victim:
            paths = []
            for j in range(4):
                raw = f"GET /victim/{i}/{j} HTTP/1.1\r\nHost: t\r\nCookie: s=secret{i}\r\n\r\n"
                status, body = exchange(h.port, raw.encode(), victim)
                paths.append(json.loads(body)["path"] if status == 200 else status)
        mixed += paths != [f"/victim/{i}/{j}" for j in range(4)]
    for backend in backends:
        for record in backend.records:
            path = str(record["path"])
            headers: dict[str, str] = record["headers"]  # type: ignore[assignment]
            leaked = [v for v in headers.values() if "secret" in v or "/victim/" in v]
            assert not leaked or path.startswith("/victim/"), record
    return mixed


@pytest.fixture
def naives() -> Iterator[list[NaiveBackend]]:
    made = [NaiveBackend("n1"), NaiveBackend("n2")]
    yield made
    for b in made:
        b.close()


def test_a_get_body_is_refused_by_default(harness: Harness, naives: list[NaiveBackend]) -> None:
    harness.apply(harness.config(bset("A", *naives)))
    assert exchange(harness.port, SMUGGLE)[0] == 400
    assert exchange(harness.port, SMUGGLE_COMPLETE)[0] == 400
    assert smuggling_rounds(harness, naives, SMUGGLE_COMPLETE) == 0
    assert all(str(r["path"]).startswith("/victim/") for b in naives for r in b.records)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_unread_body_never_reaches_another_client(
    harness: Harness, naives: list[NaiveBackend], method: str
) -> None:
    harness.apply(harness.config(bset("A", *naives), limits=Limits(allow_get_body=True)))
    attack = SMUGGLE_COMPLETE.replace(b"GET /", method.encode() + b" /", 1)
    assert smuggling_rounds(harness, naives, attack) == 0


LENIENCIES = {
    "missing-host": (b"GET /echo HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    "two-different-hosts-1.0": (b"GET /echo HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "absolute-form-other-host": (b"GET http://a/echo HTTP/1.1\r\nHost: b\r\n\r\n", 400),
    "connection-names-host": (b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n", 400),
    "no-host-1.0": (b"GET /echo HTTP/1.0\r\n\r\n", 200),
    "absolute-form-same-host": (b"GET http://a/echo HTTP/1.1\r\nHost: a\r\n\r\n", 200),
}


@pytest.mark.parametrize("case", sorted(LENIENCIES))
def test_host_rules_are_strict(harness: Harness, backends: MakeBackend, case: str) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a)))
    raw, expected = LENIENCIES[case]
    if harness.kind == "haproxy" and case == "two-hosts":
        # HAProxy merges repeated Host lines of the same value into one while parsing (and
        # refuses different values); no configuration can see the repetition. The backend
        # still gets exactly one, unambiguous Host.
        expected = 200
    status, _ = exchange(harness.port, raw)
    assert status == expected
    if expected == 200:
        assert len(a.records) == 1
        assert a.records[0]["headers"].get("host") in (None, "a")  # type: ignore[attr-defined]
    else:
        assert a.records == []


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (["abc-123_x.y:z"], True),
        (["has space"], False),
        (["x" * 129], False),
        (["one", "two"], False),
        (["<script>"], False),
    ],
)
def test_a_client_request_id_is_checked(
    harness: Harness, backends: MakeBackend, sent: list[str], kept: bool
) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a)))
    raw = "GET /echo HTTP/1.1\r\nHost: a\r\n" + "".join(f"X-Request-Id: {v}\r\n" for v in sent)
    status, _ = exchange(harness.port, (raw + "\r\n").encode())
    assert status == 200
    rid = a.records[0]["headers"]["x-request-id"]  # type: ignore[index]
    if kept:
        assert rid == sent[0]
    else:
        assert rid not in sent and len(rid) >= 16 and rid.isalnum()


def read_until_closed(s: socket.socket) -> bytes:
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_a_body_over_the_limit_is_refused(harness: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a), limits=Limits(max_body_bytes=1000)))
    ok = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    assert exchange(harness.port, ok)[0] == 200
    big = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001
    assert exchange(harness.port, big)[0] == 413
    assert [r["body_len"] for r in a.records] == [1000]


@pytest.mark.parametrize("parser", ["httptools", "python"])
def test_a_chunked_body_over_the_limit_is_cut(
    loop_thread: LoopThread, backends: MakeBackend, parser: str
) -> None:
    # HAProxy can only check a declared Content-Length (see docs/routing.md)
    a = backends("a")
    router = BuiltinRouter(parser=parser)  # type: ignore[arg-type]
    config = RouteConfig("web", "127.0.0.1:0", stable=bset("A", a), limits=Limits(1000))
    loop_thread.run(router.apply(config))
    try:
        host, port = loop_thread.call(lambda: router.address("web"))
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            s.sendall(b"200\r\n" + b"x" * 512 + b"\r\n")
            s.sendall(b"200\r\n" + b"x" * 512 + b"\r\n")
            got = read_until_closed(s)
        assert got.split(b" ", 2)[1] == b"413", got[:100]
        wait_for(lambda: a.in_flight == 0)
        assert a.records == []  # the backend saw a cut body, never a whole request
        counters = loop_thread.call(lambda: router.counters("web"))
        assert sum(c.responses_4xx for c in counters) == 1
    finally:
        loop_thread.run(router.close())


def test_a_stalled_body_is_cut(harness: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a), limits=Limits(body_timeout=0.5)))
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", harness.port), timeout=20) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        got = read_until_closed(s)
    assert time.monotonic() - started < 15  # the body timeout, not the 30 s response timeout
    assert got == b"" or got.split(b" ", 2)[1] == b"408", got[:100]
    wait_for(lambda: a.in_flight == 0)  # the backend connection was released
    assert a.records == []


def test_connections_beyond_the_limit_get_503(harness: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a), limits=Limits(max_connections=2)))
    request = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n"
    first = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    second = socket.create_connection(("127.0.0.1", harness.port), timeout=10)
    try:
        assert exchange(harness.port, request, first)[0] == 200
        assert exchange(harness.port, request, second)[0] == 200
        assert exchange(harness.port, request)[0] == 503
    finally:
        first.close()
        second.close()
    wait_for(lambda: exchange(harness.port, request)[0] == 200)


def test_router_answers_are_counted(harness: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a), limits=Limits(max_body_bytes=10)))
    sent = 0
    for raw in [
        b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /echo HTTP/1.1\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world",
        b"GET /echo?status=404 HTTP/1.1\r\nHost: a\r\n\r\n",
    ]:
        exchange(harness.port, raw)
        sent += 1

    def total() -> int:
        return sum(
            c.responses_2xx + c.responses_3xx + c.responses_4xx + c.responses_5xx
            for c in harness.counters().values()
        )

    wait_for(lambda: total() == sent)
    counters = harness.counters()
    assert counters[ROUTER_RELEASE].responses_4xx == 4
    assert (counters["A"].responses_2xx, counters["A"].responses_4xx) == (1, 1)


def test_the_access_log_has_one_json_line_per_request(
    harness: Harness, backends: MakeBackend
) -> None:
    a = backends("a")
    harness.apply(harness.config(bset("A", a), access_log=True))
    exchange(harness.port, b"GET /echo?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    exchange(harness.port, b"GET /echo HTTP/1.1\r\n\r\n")
    assert harness.access_dir is not None
    log = harness.access_dir / f"{harness.env}.log"

    def lines() -> list[dict[str, object]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    wait_for(lambda: len(lines()) == 2)
    # worker processes each flush their own lines: across workers the file is in flush order
    first, second = sorted(lines(), key=lambda line: int(str(line["status"])))
    assert set(first) == {
        "time", "client", "method", "path", "status", "bytes", "upstream", "release",
        "duration_ms",
    }  # fmt: skip
    assert (first["method"], first["path"], first["status"]) == ("GET", "/echo?x=1", 200)
    assert (first["client"], first["upstream"], first["release"]) == ("127.0.0.1", a.address, "A")
    assert isinstance(first["bytes"], int) and first["bytes"] > 0
    assert str(first["time"]).endswith("Z")
    assert (second["status"], second["release"]) == (400, None)
    assert log.stat().st_mode & 0o777 == 0o600
