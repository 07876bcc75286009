"""Builtin-proxy specifics: bounded memory while streaming, parser parity, counters maths."""

from __future__ import annotations

import http.client
import json
import math
import tracemalloc
from collections.abc import Callable

import pytest

from castiron.errors import RouterError
from castiron.httpcodec import (
    HttpParseError,
    RequestHead,
    ResponseHead,
    make_request_parser,
    make_response_parser,
)
from castiron.traffic.base import Limits, RouteConfig
from castiron.traffic.proxy import BuiltinRouter
from castiron.traffic.stats import ReleaseStats, estimate_percentile, prometheus_text
from traffic.backends import HttpBackend
from traffic.conftest import LoopThread, bset

MB = 1024 * 1024


def test_fifty_megabytes_stream_through_in_bounded_memory(
    loop_thread: LoopThread, backends: Callable[[str], HttpBackend]
) -> None:
    a = backends("a")
    router = BuiltinRouter()
    limits = Limits(max_body_bytes=64 * MB)
    config = RouteConfig("web", "127.0.0.1:0", stable=bset("A", a), limits=limits)
    loop_thread.run(router.apply(config))
    host, port = loop_thread.call(lambda: router.address("web"))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        c = http.client.HTTPConnection(host, port, timeout=60)
        c.request("GET", f"/stream?n={50 * MB}&delay=0.0002")
        r = c.getresponse()
        total = 0
        while chunk := r.read(64 * 1024):
            total += len(chunk)
        down_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        c.request(
            "POST", "/echo?slow_read=0.0002", body=iter([b"z" * MB] * 50), encode_chunked=True
        )
        got = json.loads(c.getresponse().read())
        up_peak = tracemalloc.get_traced_memory()[1]
        c.close()
    finally:
        tracemalloc.stop()
        loop_thread.run(router.close())
    assert total == 50 * MB and got["body_len"] == 50 * MB
    # the whole process (client, backend and router) never held more than a few MB at once
    assert down_peak < 12 * MB, down_peak
    assert up_peak < 12 * MB, up_peak


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_request(self, head: RequestHead) -> None:
        # the header list itself: a parser must not append trailers to it later
        self.events.append(
            ("head", (head.method, head.target, head.chunked, head.content_length, head.headers))
        )

    def on_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def on_request_end(self) -> None:
        self.events.append(("end", None))


GOOD = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n0\r\nT: v\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://x:80/a HTTP/1.1\r\nHost: X:80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nX-Request-Id: abc\r\n\r\n",
]
BAD = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    b"G\x01T / HTTP/1.1\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"v" * 5000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET http://a/x HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length\r\n\r\n",
]


def _parse(kind: str, data: bytes, step: int) -> list[tuple[str, object]]:
    rec = _Recorder()
    parser = make_request_parser(kind, rec, 4096)  # type: ignore[arg-type]
    for i in range(0, len(data), step):
        parser.feed(data[i : i + step])
    merged: list[tuple[str, object]] = []
    for ev in rec.events:
        if ev[0] == "body" and merged and merged[-1][0] == "body":
            merged[-1] = ("body", merged[-1][1] + ev[1])  # type: ignore[operator]
        else:
            merged.append(ev)
    return merged


@pytest.mark.parametrize("data", GOOD)
@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_both_parsers_agree_on_good_requests(data: bytes, step: int) -> None:
    assert _parse("python", data, step) == _parse("httptools", data, step)


@pytest.mark.parametrize("data", BAD)
@pytest.mark.parametrize("kind", ["python", "httptools"])
def test_both_parsers_refuse_bad_requests(data: bytes, kind: str) -> None:
    with pytest.raises(HttpParseError) as info:
        _parse(kind, data, 10_000)
    assert info.value.status in (400, 431, 501)


class _ResponseRecorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def on_response(self, head: ResponseHead) -> None:
        self.events.append(
            (
                "head",
                (
                    head.status,
                    head.reason,
                    head.minor,
                    head.headers,
                    head.keep_alive,
                    head.chunked,
                    head.content_length,
                    head.until_close,
                    head.no_body,
                ),
            )
        )

    def on_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)  # type: ignore[operator]
        else:
            self.events.append(("body", data))

    def on_response_end(self) -> None:
        self.events.append(("end", None))


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
RESPONSES: list[tuple[list[tuple[bytes, bool]], bool]] = [
    # (messages: (bytes, answers a HEAD request)), then the backend closes
    ([(OK5, False)], False),
    (
        [(OK5, False), (b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", True), (OK5, False)],
        False,
    ),
    (
        [
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\nT: v\r\n\r\n",
                False,
            )
        ],
        False,
    ),
    ([(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nuntil the end", False)], True),
    (
        [
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                False,
            )
        ],
        False,
    ),
    (
        [
            (b"HTTP/1.1 204 No Content\r\n\r\n", False),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False),
        ],
        False,
    ),
    ([(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", False)], False),
    ([(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", False)], False),
]


def _parse_responses(
    kind: str, messages: list[tuple[bytes, bool]], eof: bool, step: int
) -> list[tuple[str, object]]:
    rec = _ResponseRecorder()
    parser = make_response_parser(kind, rec)  # type: ignore[arg-type]
    for data, head_request in messages:
        parser.head_request = head_request
        for i in range(0, len(data), step):
            assert parser.feed(data[i : i + step]) is None
    if eof:
        rec.events.append(("eof", parser.feed_eof()))
    return rec.events


@pytest.mark.parametrize(("messages", "eof"), RESPONSES)
@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_both_response_parsers_agree(
    messages: list[tuple[bytes, bool]], eof: bool, step: int
) -> None:
    python = _parse_responses("python", messages, eof, step)
    assert python == _parse_responses("httptools", messages, eof, step)
    assert python.count(("end", None)) == len(messages)
    if eof:  # a read-until-close body ends when the backend closes
        assert python[-2:] == [("end", None), ("eof", True)]


@pytest.mark.parametrize("kind", ["python", "httptools"])
def test_a_101_response_hands_over_the_rest(kind: str) -> None:
    rec = _ResponseRecorder()
    parser = make_response_parser(kind, rec)  # type: ignore[arg-type]
    rest = parser.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"\r\n\x81\x05hello"
    )
    assert rest == b"\x81\x05hello"
    assert [e[0] for e in rec.events] == ["head"]


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SMTP ready\r\n\r\n",
    ],
)
@pytest.mark.parametrize("kind", ["python", "httptools"])
def test_both_response_parsers_refuse_bad_responses(data: bytes, kind: str) -> None:
    parser = make_response_parser(kind, _ResponseRecorder())  # type: ignore[arg-type]
    with pytest.raises(HttpParseError) as info:
        parser.feed(data)
    assert info.value.status == 502


def test_percentiles_interpolate_within_buckets() -> None:
    stats = ReleaseStats("r")
    for ms in [3.0] * 50 + [7.0] * 45 + [30.0] * 5:
        stats.observe(200, ms)
    snap = stats.snapshot()
    assert snap.histogram[-1] == (math.inf, 100)
    assert snap.latency.p50_ms == pytest.approx(5.0)
    assert 5.0 < snap.latency.p95_ms <= 10.0
    assert 25.0 < snap.latency.p99_ms <= 50.0
    assert estimate_percentile((), 0.5) == 0.0


def test_prometheus_text_is_well_formed() -> None:
    stats = ReleaseStats('we"ird')
    stats.requests = 2
    stats.observe(200, 0.5)
    stats.observe(503, 20000)
    text = prometheus_text({"prod": [stats.snapshot()]})
    assert "# TYPE castiron_request_duration_seconds histogram" in text
    assert 'release="we\\"ird"' in text
    assert 'le="0.001"} 1' in text and 'le="+Inf"} 2' in text
    assert 'class="5xx"} 1' in text
    assert "castiron_request_duration_seconds_count" in text


def test_bad_listen_address_is_a_router_error(loop_thread: LoopThread) -> None:
    router = BuiltinRouter()
    with pytest.raises(RouterError, match="listen address 'nowhere'"):
        loop_thread.run(router.apply(RouteConfig("web", "nowhere")))
    with pytest.raises(RouterError, match="environment web: cannot listen"):
        loop_thread.run(router.apply(RouteConfig("web", "192.0.2.1:1")))
