"""The HTTP/1.1 codec on its own: request and status lines, headers and their limits, framing
(Content-Length, Transfer-Encoding, chunked bodies), head serialisation and the blocking
reader; and that the router, the agent's server and client and the health probe all go
through it rather than keep parsers of their own."""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from castiron.httpcodec import (
    BlockingResponse,
    HttpParseError,
    ParserKind,
    RequestHead,
    ResponseHead,
    encode_request_head,
    encode_response_head,
    httptools_available,
    make_request_parser,
    make_response_parser,
    message_framing,
    parse_headers,
    parse_request_head,
    parse_status_line,
    reason_phrase,
)

KINDS: list[ParserKind] = ["python", "httptools"] if httptools_available() else ["python"]


class Requests:
    """A request handler that records what the parser reports."""

    def __init__(self) -> None:
        self.heads: list[RequestHead] = []
        self.body = b""
        self.ended = 0

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_request_end(self) -> None:
        self.ended += 1


class Responses:
    """A response handler that records what the parser reports."""

    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.body = b""
        self.ended = 0

    def on_response(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ended += 1


def feed_request(kind: ParserKind, raw: bytes, max_header_bytes: int = 65536) -> Requests:
    handler = Requests()
    make_request_parser(kind, handler, max_header_bytes).feed(raw)
    return handler


def refused(kind: ParserKind, raw: bytes, max_header_bytes: int = 65536) -> int:
    with pytest.raises(HttpParseError) as info:
        feed_request(kind, raw, max_header_bytes)
    return info.value.status


# --- request lines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"GET / HTTP/1.1", (b"GET", b"/", 1)),
        (b"POST /v1/routes/web?x=1 HTTP/1.0", (b"POST", b"/v1/routes/web?x=1", 0)),
        (b"OPTIONS * HTTP/1.1", (b"OPTIONS", b"*", 1)),
        (b"GET http://a.example/x HTTP/1.1", (b"GET", b"http://a.example/x", 1)),
    ],
)
def test_valid_request_lines(line: bytes, expected: tuple[bytes, bytes, int]) -> None:
    method, target, minor, headers = parse_request_head(line + b"\r\nHost: a")
    assert (method, target, minor) == expected
    assert headers == [(b"Host", b"a")]


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/1.2", 505),
        (b"GET /  HTTP/1.1", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"GET /", 400),
        (b"GET / http/1.1", 400),
        (b"G(T / HTTP/1.1", 400),
        (b"GET /a b HTTP/1.1", 400),
        (b"GET /\x00 HTTP/1.1", 400),
        (b"", 400),
    ],
)
def test_invalid_request_lines(line: bytes, status: int) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_request_head(line + b"\r\nHost: a")
    assert info.value.status == status


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/1.2", b"G(T / HTTP/1.1", b"GET /a b HTTP/1.1", b"GET / HTTP/1.1 x"],
)
def test_the_incremental_parsers_refuse_invalid_request_lines(
    kind: ParserKind, line: bytes
) -> None:
    assert refused(kind, line + b"\r\nHost: a\r\n\r\n") == 400


# --- status lines --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"HTTP/1.1 200 OK", (1, 200, b"OK")),
        (b"HTTP/1.0 404 Not Found", (0, 404, b"Not Found")),
        (b"HTTP/1.1 204", (1, 204, b"")),
        (b"HTTP/1.1 503 ", (1, 503, b"")),
    ],
)
def test_valid_status_lines(line: bytes, expected: tuple[int, int, bytes]) -> None:
    assert parse_status_line(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 20 OK",
        b"HTTP/2 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 200 O\nK",
        b"200 OK",
        b"",
    ],
)
def test_invalid_status_lines(line: bytes) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_status_line(line)
    assert info.value.status == 502


@pytest.mark.parametrize("kind", KINDS)
def test_the_response_parsers_refuse_an_invalid_status_line(kind: ParserKind) -> None:
    parser = make_response_parser(kind, Responses())
    with pytest.raises(HttpParseError) as info:
        parser.feed(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n")
    assert info.value.status == 502


# --- headers -------------------------------------------------------------------------------------


def test_headers_are_split_and_their_values_stripped() -> None:
    assert parse_headers([b"Host: a", b"X-Empty:", b"X-Blank: \t v w \t"]) == [
        (b"Host", b"a"),
        (b"X-Empty", b""),
        (b"X-Blank", b"v w"),
    ]


@pytest.mark.parametrize(
    "line",
    [
        b" folded continuation",
        b"\tfolded",
        b"Name : value",
        b"No colon here",
        b": no name",
        b"Na me: value",
        b"Name: va\x00lue",
        b"Name: va\nlue",
        b"Name: va\rlue",
    ],
)
def test_invalid_header_lines_are_refused(line: bytes) -> None:
    with pytest.raises(HttpParseError) as info:
        parse_headers([b"Host: a", line])
    assert info.value.status == 400


@pytest.mark.parametrize("kind", KINDS)
def test_obs_fold_is_refused(kind: ParserKind) -> None:
    assert refused(kind, b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n") == 400


@pytest.mark.parametrize("kind", KINDS)
def test_a_bare_lf_is_refused(kind: ParserKind) -> None:
    assert refused(kind, b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n") == 400


@pytest.mark.parametrize("kind", KINDS)
def test_a_head_over_the_limit_is_refused_with_431(kind: ParserKind) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * 2000 + b"\r\n\r\n"
    assert refused(kind, raw, max_header_bytes=1024) == 431
    assert len(feed_request(kind, raw, max_header_bytes=4096).heads) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_an_unfinished_head_over_the_limit_is_refused_with_431(kind: ParserKind) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Many: y\r\n" * 200
    assert refused(kind, raw, max_header_bytes=1024) == 431


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_or_repeated_host_is_refused(kind: ParserKind) -> None:
    assert refused(kind, b"GET / HTTP/1.1\r\n\r\n") == 400
    assert refused(kind, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400
    assert feed_request(kind, b"GET / HTTP/1.0\r\n\r\n").heads[0].minor == 0


# --- framing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], (False, None)),
        ([(b"Content-Length", b"12")], (False, 12)),
        ([(b"transfer-encoding", b"Chunked")], (True, None)),
    ],
)
def test_message_framing(headers: list[tuple[bytes, bytes]], expected: tuple[bool, int]) -> None:
    assert message_framing(headers) == expected


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")], 400),
        ([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"0")], 400),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], 400),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"5")], 400),
        ([(b"Content-Length", b"-5")], 400),
        ([(b"Content-Length", b"5, 5")], 400),
        ([(b"Content-Length", b"0x10")], 400),
        ([(b"Content-Length", b"1" * 19)], 400),
        ([(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")], 400),
        ([(b"Transfer-Encoding", b"gzip")], 501),
        ([(b"Transfer-Encoding", b"gzip, chunked")], 501),
    ],
)
def test_conflicting_or_invalid_framing_is_refused(
    headers: list[tuple[bytes, bytes]], status: int
) -> None:
    with pytest.raises(HttpParseError) as info:
        message_framing(headers)
    assert info.value.status == status


@pytest.mark.parametrize("kind", KINDS)
def test_content_length_and_transfer_encoding_together_are_refused(kind: ParserKind) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert refused(kind, raw) == 400


@pytest.mark.parametrize("kind", KINDS)
def test_a_content_length_body_is_delivered_whole_byte_by_byte(kind: ParserKind) -> None:
    handler = Requests()
    parser = make_request_parser(kind, handler, 65536)
    raw = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    for i in range(len(raw)):
        parser.feed(raw[i : i + 1])
    assert [h.target for h in handler.heads] == [b"/x", b"/"]
    assert handler.body == b"hello"
    assert handler.ended == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_chunked_body_is_decoded(kind: ParserKind) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    handler = feed_request(kind, raw)
    assert handler.heads[0].chunked and handler.heads[0].content_length is None
    assert handler.body == b"hello 0123456789"
    assert handler.ended == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX\r\n0\r\n\r\n",
    ],
)
def test_malformed_chunk_sizes_and_framing_are_refused(kind: ParserKind, chunks: bytes) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert refused(kind, head + chunks) == 400


@pytest.mark.parametrize("kind", KINDS)
def test_responses_are_framed_by_length_chunks_or_close(kind: ParserKind) -> None:
    handler = Responses()
    parser = make_response_parser(kind, handler)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
    assert handler.ended == 2
    assert parser.feed_eof()
    assert handler.ended == 3
    assert handler.body == b"okabcuntil close"
    assert [h.until_close for h in handler.heads] == [False, False, True]


# --- serialising ---------------------------------------------------------------------------------


def test_response_heads_are_written_with_their_reason() -> None:
    assert encode_response_head(404, [("Content-Length", "0")]) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    assert (
        encode_response_head(599, [], reason_phrase(599, "Error")) == b"HTTP/1.1 599 Error\r\n\r\n"
    )
    assert reason_phrase(431) == "Request Header Fields Too Large"


def test_request_heads_are_written_and_parse_back() -> None:
    raw = encode_request_head("PUT", "/v1/routes/web", [("Host", "h"), ("Content-Length", "2")])
    assert raw == b"PUT /v1/routes/web HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"
    assert parse_request_head(raw[:-4]) == (
        b"PUT",
        b"/v1/routes/web",
        1,
        [(b"Host", b"h"), (b"Content-Length", b"2")],
    )


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", []),
        ("GET", "", []),
        ("G T", "/", []),
        ("GET", "/", [("X-A", "b\r\nX-Injected: 1")]),
        ("GET", "/", [("X A", "b")]),
        ("GET", "/", [("X-A:", "b")]),
    ],
)
def test_heads_that_would_change_meaning_are_not_written(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        encode_request_head(method, target, headers)


def test_a_response_header_injection_is_not_written() -> None:
    with pytest.raises(ValueError):
        encode_response_head(200, [("X-A", "b\r\n\r\nbody")])


# --- the blocking reader -------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def serve(sock: socket.socket, *pieces: bytes, close: bool = True) -> threading.Thread:
    def run() -> None:
        # the reader may stop early (a refused head) and the test close the pair meanwhile
        with contextlib.suppress(OSError):
            for piece in pieces:
                sock.sendall(piece)
            if close:
                sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_blocking_reader_reads_a_content_length_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(
        server,
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n",
        b"Content-Length: 7\r\n\r\n{",
        b'"a":1}',
    )
    response = BlockingResponse(client)
    assert (response.status, response.reason, response.length) == (201, "Created", 7)
    assert response.headers["content-type"] == "application/json"
    assert response.read() == b'{"a":1}'
    assert response.complete


def test_the_blocking_reader_skips_interim_responses_and_decodes_chunks(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(
        server,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3\r\nabc\r\n",
        b"2\r\nde\r\n0\r\n\r\n",
    )
    response = BlockingResponse(client)
    assert response.status == 200
    assert response.read() == b"abcde"


def test_the_blocking_reader_streams_a_body_that_runs_to_the_close(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(server, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst")
    response = BlockingResponse(client)
    assert response.until_close
    pieces = []
    while piece := response.read1(65536):
        pieces.append(piece)
    assert b"".join(pieces) == b"first"


def test_the_blocking_reader_refuses_a_short_body(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(server, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    response = BlockingResponse(client)
    with pytest.raises(ConnectionError, match="shorter than its Content-Length"):
        response.read()


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", ConnectionError),
        (b"HTTP/1.1 200 OK\r\nContent-Le", ConnectionError),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", HttpParseError),
        (b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", HttpParseError),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", HttpParseError),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 5000 + b"\r\n\r\n", HttpParseError),
    ],
)
def test_the_blocking_reader_refuses_bad_heads(
    pair: tuple[socket.socket, socket.socket], raw: bytes, error: type[Exception]
) -> None:
    client, server = pair
    serve(server, raw)
    with pytest.raises(error):
        BlockingResponse(client, max_head=1024)


def test_the_blocking_reader_drains_a_framed_body_and_ignores_what_follows(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(server, b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusyNOT HTTP AT ALL\r\n\r\n")
    response = BlockingResponse(client)
    assert (response.status, response.reason) == (503, "Busy")
    response.drain(65536)
    assert response.complete


def test_the_blocking_reader_does_not_wait_for_a_body_without_framing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server = pair
    serve(server, b"HTTP/1.1 200 OK\r\n\r\nand the server keeps the connection", close=False)
    client.settimeout(0.5)
    response = BlockingResponse(client)
    response.drain(65536)  # returns at once: no TimeoutError, nothing read past the head
    assert not response.complete


# --- the codec's users ---------------------------------------------------------------------------

USERS = [
    "castiron.traffic.proxy",
    "castiron.agent.http",
    "castiron.agent.client",
    "castiron.health",
]
GONE = {
    "castiron.traffic.proxy": ["_REASONS"],
    "castiron.agent.http": ["_REASONS"],
    "castiron.agent.client": ["_Response"],
    "castiron.health": ["_drain"],
}


def _source(module: ModuleType) -> str:
    """A module's Python source (also when it runs compiled: the ``.py`` beside the extension)."""
    path = Path(inspect.getfile(module))
    return path.with_name(path.name.split(".", 1)[0] + ".py").read_text()


@pytest.mark.parametrize("name", USERS)
def test_each_user_imports_the_shared_codec(name: str) -> None:
    module = importlib.import_module(name)
    tree = ast.parse(_source(module))
    sources = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "castiron.httpcodec" in sources
    for private in GONE[name]:
        assert not hasattr(module, private), f"{name}.{private} should be in castiron.httpcodec"


def test_the_router_has_no_codec_module_of_its_own() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("castiron.traffic.http")


@pytest.mark.parametrize("name", USERS)
def test_no_user_parses_a_status_or_request_line_itself(name: str) -> None:
    text = _source(importlib.import_module(name))
    for private in ('startswith("HTTP/', 'split(" ", 2)', "_REQUEST_LINE", "_STATUS_LINE"):
        assert private not in text, f"{name} contains {private}"


# --- the version and keep-alive of each message, whatever its Connection headers say -----------
VERSIONS = [
    # (version, Connection headers, minor, keep-alive)
    (b"1.1", b"", 1, True),
    (b"1.1", b"Connection: close\r\n", 1, False),
    (b"1.1", b"Connection: keep-alive\r\n", 1, True),
    (b"1.1", b"cOnNeCtIoN: Close\r\n", 1, False),
    (b"1.0", b"", 0, False),
    (b"1.0", b"Connection: keep-alive\r\n", 0, True),
    (b"1.0", b"Connection: close\r\n", 0, False),
    (b"1.0", b"Connection: x-hop\r\nConnection: Keep-Alive\r\n", 0, True),
]


def _first_head(kind: ParserKind, side: str, version: bytes, connection: bytes) -> tuple[int, bool]:
    """(minor, keep_alive) of the one request or response (``side``) with these headers."""
    if side == "request":
        raw = b"GET / HTTP/" + version + b"\r\nHost: a\r\n" + connection + b"\r\n"
        requests = feed_request(kind, raw)
        assert len(requests.heads) == 1
        return requests.heads[0].minor, requests.heads[0].keep_alive
    raw = b"HTTP/" + version + b" 200 OK\r\nContent-Length: 2\r\n" + connection + b"\r\nok"
    responses = Responses()
    make_response_parser(kind, responses).feed(raw)
    assert len(responses.heads) == 1 and responses.ended == 1
    return responses.heads[0].minor, responses.heads[0].keep_alive


@pytest.mark.parametrize(("version", "connection", "minor", "keep_alive"), VERSIONS)
@pytest.mark.parametrize("side", ["request", "response"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_messages_version_and_keep_alive(
    kind: ParserKind, side: str, version: bytes, connection: bytes, minor: int, keep_alive: bool
) -> None:
    assert _first_head(kind, side, version, connection) == (minor, keep_alive)


@pytest.mark.parametrize("kind", KINDS)
def test_nothing_of_one_heads_connection_header_carries_to_the_next(kind: ParserKind) -> None:
    requests = feed_request(
        kind,
        b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.0\r\nHost: a\r\n\r\n",
    )
    assert [(h.minor, h.keep_alive) for h in requests.heads] == [(0, True), (1, True), (0, False)]
    responses = Responses()
    make_response_parser(kind, responses).feed(
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert [(h.minor, h.keep_alive) for h in responses.heads] == [(0, True), (1, True), (0, False)]
