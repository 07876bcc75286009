"""Router hardening, the same on every data plane: no response reaches another client than the
one whose request caused it (request smuggling through unread bodies), strict Host rules,
request ids, and limits (body size, body idle time, connections) counted in the metrics."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from castiron.traffic.base import ROUTER_RELEASE, Limits
from testkit import wait_for
from traffic.backends import HttpBackend, NaiveBackend
from traffic.conftest import Harness, bset

MakeBackend = Callable[[str], HttpBackend]

SMUGGLE = (
    b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 34\r\n\r\n"
    b"GET /version HTTP/1.1\r\nX-Ignore: "
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
