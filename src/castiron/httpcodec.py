"""The one HTTP/1.1 codec: parsing, framing and serialising messages, for every castiron part.

This module owns the wire format only: request lines, status lines, header syntax, message
framing (``Content-Length``, ``chunked``, read-until-close, upgrades), what counts as a
malformed message and the limits on a head, and writing request and response heads. Its users
are the builtin router (:mod:`castiron.traffic.proxy`), the host agent's HTTP server
(:mod:`castiron.agent.http`), the agent's client (:mod:`castiron.agent.client`) and the
health prober (:mod:`castiron.health`); none of them parses or writes HTTP on its own.

Requests and responses each have two incremental parsers that produce the same events: one on
``httptools`` (llhttp) when it is installed, one in pure Python; they must agree on every
accepted and refused input. The framing of a response depends on the request method
(``HEAD``), which llhttp cannot be told, so the llhttp response parser hands the response to a
``HEAD`` request to the Python one (an upstream connection carries one exchange at a time, so
the switch always happens between two messages). Parsers are push parsers: the caller feeds
bytes and receives callbacks on a handler; a parser never buffers a body. Blocking callers
(one request, one ``Connection: close`` response) read through :class:`BlockingResponse`,
which drives the Python response parser from a socket. Heads that were read whole are parsed
by :func:`parse_request_head` and framed by :func:`message_framing`, with the same rules.

It knows nothing of routing, backends, releases, the agent's API or asyncio, and sits at the
bottom of the layers: it imports only the standard library (and ``httptools`` when present).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

__all__ = [
    "REASONS",
    "BlockingResponse",
    "HttpParseError",
    "ParserKind",
    "PythonRequestParser",
    "PythonResponseParser",
    "RequestHandler",
    "RequestHead",
    "RequestParser",
    "ResponseHandler",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "encode_request_head",
    "encode_response_head",
    "httptools_available",
    "make_request_parser",
    "make_response_parser",
    "message_framing",
    "parse_headers",
    "parse_request_head",
    "parse_status_line",
    "reason_phrase",
]

ParserKind = Literal["auto", "httptools", "python"]

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_REQUEST_LINE: Final = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/1\.([01])\Z"
)
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\Z")
_HOST: Final = re.compile(
    rb"(?:(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?)?\Z"
)
"""A Host value: reg-name or IPv4 or [IPv6], optional port (RFC 9110 section 7.2); may be
empty when the target has no authority."""
_ABSOLUTE: Final = re.compile(
    rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*)(?:[/?#][\x21-\x7e\x80-\xff]*)?\Z"
)
_CHUNK_SIZE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\Z")


class HttpParseError(Exception):
    """A malformed HTTP message; ``status`` is what the router answers (400, 431, 501)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead:
    """The request line and headers of one request, with its framing decided.

    A plain class with slots: one is built per request, and compiled (``castiron.compiled``)
    it is built without running any Python (a named tuple's ``__new__`` is Python code; a
    frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``)."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "minor",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        minor: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        upgrade: bool,
        chunked: bool,
        content_length: int | None,
        connection: frozenset[bytes] = frozenset(),
    ) -> None:
        self.method = method
        self.target = target
        self.minor = minor
        """HTTP/1.``minor`` (0 or 1)."""
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.chunked = chunked
        self.content_length = content_length
        self.connection = connection
        """The lower-cased tokens of the ``Connection`` header(s) (hop-by-hop header names)."""

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, HTTP/1.{self.minor})"


class ResponseHead:
    """The status line and headers of one response, with its framing decided (a plain class,
    like :class:`RequestHead`)."""

    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "minor",
        "no_body",
        "reason",
        "status",
        "until_close",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        minor: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        chunked: bool,
        content_length: int | None,
        until_close: bool,
        no_body: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.minor = minor
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.content_length = content_length
        self.until_close = until_close
        """The body ends when the backend closes the connection."""
        self.no_body = no_body

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, HTTP/1.{self.minor})"


class RequestHandler(Protocol):
    """What a request parser calls."""

    def on_request(self, head: RequestHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


class ResponseHandler(Protocol):
    """What a response parser calls."""

    def on_response(self, head: ResponseHead) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_response_end(self) -> None: ...


class RequestParser(Protocol):
    """An incremental request parser (``feed`` raises :class:`HttpParseError`)."""

    def feed(self, data: bytes) -> bytes | None:
        """Parse ``data``; returns the raw bytes that follow an upgrade request, else None."""
        ...


class ResponseParser(Protocol):
    """An incremental parser of one upstream connection's responses.

    ``head_request`` is set before each request is sent (a response to ``HEAD`` has no body).
    ``feed`` raises :class:`HttpParseError` (status 502) on a malformed response and returns
    the raw bytes that follow a ``101`` response, else None. ``feed_eof`` is called when the
    backend closes and returns True when that ended a read-until-close body.
    """

    head_request: bool

    def feed(self, data: bytes) -> bytes | None: ...

    def feed_eof(self) -> bool: ...


def encode_chunk(data: bytes) -> bytes:
    """The chunk-size line of one chunk of ``data`` (the caller writes data and CRLF)."""
    return b"%x\r\n" % len(data)


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def message_framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    """(chunked, content_length) of a request's headers.

    Raises:
        HttpParseError: on conflicting, repeated or invalid framing headers.
    """
    chunked = False
    length: int | None = None
    seen_te = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            v = value.strip()
            if not v.isdigit() or len(v) > 18:
                raise HttpParseError(400, "invalid Content-Length")
            if length is not None and length != int(v):
                raise HttpParseError(400, "conflicting Content-Length headers")
            if length is not None:
                raise HttpParseError(400, "duplicate Content-Length")
            length = int(v)
        elif lname == b"transfer-encoding":
            if seen_te:
                raise HttpParseError(400, "repeated Transfer-Encoding")
            seen_te = True
            if value.strip().lower() != b"chunked":
                raise HttpParseError(501, "unsupported Transfer-Encoding")
            chunked = True
    if chunked and length is not None:
        raise HttpParseError(400, "both Content-Length and Transfer-Encoding")
    return chunked, length


_SPECIAL: Final = frozenset({b"connection", b"content-length", b"transfer-encoding", b"upgrade"})
_SPECIAL_SIZES: Final = frozenset(len(name) for name in _SPECIAL)
_HOP_FORBIDDEN: Final = frozenset({b"host", b"content-length", b"transfer-encoding"})
"""End-to-end headers a ``Connection`` header may not declare hop-by-hop (dropping them
would change what the backend is asked)."""


@functools.lru_cache(maxsize=256)
def _valid_host(host: bytes) -> bool:
    # memoized: a listener sees few distinct Host values, and the regex is most of the check
    return _HOST.match(host) is not None


def _check_host(target: bytes, minor: int, host: bytes | None, hosts: int) -> None:
    """RFC 9112 section 3.2: one valid Host (HTTP/1.1), agreeing with an absolute-form target.

    Raises:
        HttpParseError: 400 on a missing, repeated, invalid or conflicting Host.
    """
    if hosts > 1:
        raise HttpParseError(400, "more than one Host header")
    if host is None:
        if minor == 1:
            raise HttpParseError(400, "missing Host header")
    elif not _valid_host(host):
        raise HttpParseError(400, "invalid Host header")
    if target[:1] != b"/" and target != b"*":
        m = _ABSOLUTE.match(target)
        if m is None:
            raise HttpParseError(400, "invalid request target")
        if host is not None and m.group(1).lower() != host.lower():
            raise HttpParseError(400, "Host header does not match the request target")


def _request_head(
    method: bytes, target: bytes, minor: int, headers: list[tuple[bytes, bytes]]
) -> RequestHead:
    """The request's head with its framing decided.

    Raises:
        HttpParseError: on bad framing or Host headers, or a ``CONNECT``.
    """
    if method == b"CONNECT":
        raise HttpParseError(405, "CONNECT is not proxied")
    special = False
    hosts = 0
    host: bytes | None = None
    for name, value in headers:
        size = len(name)
        if size == 4:
            if name.lower() == b"host":
                hosts += 1
                host = value
        elif size in _SPECIAL_SIZES and name.lower() in _SPECIAL:
            special = True
    if hosts != 1 or target[:1] != b"/" or not _valid_host(host or b""):
        _check_host(target, minor, host, hosts)  # raises unless an HTTP/1.0 or absolute form
    if not special:  # the common case: no framing or hop-by-hop headers at all
        return RequestHead(method, target, minor, headers, minor == 1, False, False, None)
    chunked, length = message_framing(headers)
    tokens = frozenset(_connection_tokens(headers))
    if tokens & _HOP_FORBIDDEN:
        raise HttpParseError(400, "Connection header names an end-to-end header")
    keep_alive = (b"close" not in tokens) if minor == 1 else (b"keep-alive" in tokens)
    upgrade = b"upgrade" in tokens and any(n.lower() == b"upgrade" for n, _ in headers)
    return RequestHead(method, target, minor, headers, keep_alive, upgrade, chunked, length, tokens)


def parse_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The ``(name, value)`` pairs of a head's header lines (values stripped of blanks).

    A line without a colon, a name that is not a token (which refuses obs-fold continuation
    lines and blanks before the colon) and a value with control characters are refused.

    Raises:
        HttpParseError: 400 on an invalid header name or value.
    """
    headers: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            raise HttpParseError(400, "invalid header name")
        value = value.strip(b" \t")
        if not _VALUE.match(value):
            raise HttpParseError(400, "invalid header value")
        headers.append((name, value))
    return headers


# --- body framing, shared by the Python request and response parsers ---------------------------

(_HEAD, _LENGTH, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _TUNNEL) = (
    range(8)
)
_INTERIM: Final = -1  # an interim (1xx) response: the next head follows, no message ended


class _Framer:
    """Splits a byte stream into heads and bodies; subclasses parse heads."""

    def __init__(self, max_head: int) -> None:
        self._max_head = max_head
        self._buf = b""
        self._state = _HEAD
        self._left = 0

    def _parse_head(self, block: bytes) -> tuple[int, int | None, bool]:
        """Handle a complete head; returns (next state, length, tunnel)."""
        raise NotImplementedError

    def _body(self, data: bytes) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError

    def feed(self, data: bytes) -> bytes | None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        n = len(buf)
        while pos < n:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if n - pos > self._max_head:
                        raise HttpParseError(431, "request headers too large")
                    self._buf = buf[pos:]
                    return None
                if end - pos > self._max_head:
                    raise HttpParseError(431, "request headers too large")
                block = buf[pos:end]
                pos = end + 4
                nxt, length, tunnel = self._parse_head(block)
                if tunnel:
                    self._state = _TUNNEL
                    return buf[pos:]
                if nxt == _INTERIM:
                    self._state = _HEAD
                    continue
                self._state = nxt
                if nxt == _LENGTH:
                    self._left = length or 0
                    if self._left == 0:
                        self._state = _HEAD
                        self._end()
                elif nxt == _HEAD:
                    self._end()
            elif state == _LENGTH:
                take = min(self._left, n - pos)
                self._body(buf[pos : pos + take] if (pos or take != n) else buf)
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _HEAD
                    self._end()
            elif state == _UNTIL_CLOSE:
                self._body(buf[pos:] if pos else buf)
                return None
            elif state == _CHUNK_SIZE_LINE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > 1024:
                        raise HttpParseError(400, "invalid chunk size line")
                    self._buf = buf[pos:]
                    return None
                m = _CHUNK_SIZE.match(buf, pos, end)
                if m is None:
                    raise HttpParseError(400, "invalid chunk size")
                size = int(m.group(1), 16)
                pos = end + 2
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._state = _CHUNK_DATA
                    self._left = size
            elif state == _CHUNK_DATA:
                take = min(self._left, n - pos)
                self._body(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if n - pos < 2:
                    self._buf = buf[pos:]
                    return None
                if buf[pos : pos + 2] != b"\r\n":
                    raise HttpParseError(400, "chunk not terminated by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE_LINE
            elif state == _TRAILERS:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > self._max_head:
                        raise HttpParseError(431, "trailers too large")
                    self._buf = buf[pos:]
                    return None
                line = buf[pos:end]
                pos = end + 2
                if not line:
                    self._state = _HEAD
                    self._end()
                elif b":" not in line or not _TOKEN.match(line.split(b":", 1)[0]):
                    raise HttpParseError(400, "invalid trailer")
            else:  # _TUNNEL: the caller stops feeding after an upgrade
                return buf[pos:]
        return None


class PythonRequestParser(_Framer):
    """The pure-Python request parser (strict: refuses what llhttp refuses)."""

    def __init__(self, handler: RequestHandler, max_header_bytes: int) -> None:
        super().__init__(max_header_bytes)
        self._handler = handler
        self._upgrade = False

    def _parse_head(self, block: bytes) -> tuple[int, int | None, bool]:
        lines = block.split(b"\r\n")
        m = _REQUEST_LINE.match(lines[0])
        if m is None:
            raise HttpParseError(400, "invalid request line")
        head = _request_head(m.group(1), m.group(2), int(m.group(3)), parse_headers(lines[1:]))
        self._handler.on_request(head)
        if head.chunked:
            nxt, length = _CHUNK_SIZE_LINE, None
        elif head.content_length:
            nxt, length = _LENGTH, head.content_length
        else:
            nxt, length = _HEAD, None
        if head.upgrade and nxt == _HEAD:
            self._handler.on_request_end()
            return _TUNNEL, None, True
        return nxt, length, False

    def _body(self, data: bytes) -> None:
        self._handler.on_body(data)

    def _end(self) -> None:
        self._handler.on_request_end()


class _HttptoolsRequestParser:
    """The llhttp request parser through ``httptools``; same events as the Python one."""

    def __init__(self, handler: RequestHandler, max_header_bytes: int) -> None:
        import httptools

        self._upgrade: type[Exception] = httptools.HttpParserUpgrade
        self._invalid: type[Exception] = httptools.HttpParserError
        self._handler = handler
        self._max = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._connection = False
        """The head has a ``Connection`` header."""
        self._error: HttpParseError | None = None

    # httptools callbacks (no on_message_begin: a call per message that state reset where a
    # message's head is consumed and where it ends makes unnecessary)
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailers (after a chunked body) are dropped
            self._headers.append((name, value))
            if len(name) == 10 and name.lower() == b"connection":
                self._connection = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        p = self._parser
        minor = _minor(p, self._connection)
        self._connection = False
        headers = self._headers
        size = len(self._url) + 16
        for name, value in headers:
            size += len(name) + len(value) + 4
        values = b"".join([value for _, value in headers])
        if size > self._max:
            self._error = HttpParseError(431, "request headers too large")
            raise self._error
        if not _VALUE.match(values):
            self._error = HttpParseError(400, "invalid header value")
            raise self._error
        try:
            head = _request_head(p.get_method(), self._url, minor, headers)
        except HttpParseError as exc:
            self._error = exc
            raise
        self._url = b""
        self._headers = []
        self._handler.on_request(head)

    def on_body(self, body: bytes) -> None:
        self._handler.on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._handler.on_request_end()

    def feed(self, data: bytes) -> bytes | None:
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except self._upgrade as exc:
            return data[int(exc.args[0]) :]
        except self._invalid as exc:
            if self._error is not None:
                raise self._error from None
            if isinstance(exc.__context__, HttpParseError):  # raised by the handler (a limit)
                raise exc.__context__ from None
            if self._in_head and self._head_bytes > self._max:
                raise HttpParseError(431, "request headers too large") from None
            raise HttpParseError(400, str(exc) or "malformed request") from None
        if self._in_head and self._head_bytes > self._max:
            raise HttpParseError(431, "request headers too large")
        return None


def _minor(parser: Any, connection: bool) -> int:
    """The minor HTTP version of the message ``parser`` (httptools) is in (0 or 1).

    Without a ``Connection`` header, llhttp keeps only an HTTP/1.1 connection alive, so its
    cheap keep-alive answer settles the common case; ``get_http_version`` formats a string."""
    if not connection and parser.should_keep_alive():
        return 1
    return 1 if parser.get_http_version() == "1.1" else 0


def httptools_available() -> bool:
    """Whether the llhttp-based parser can be used."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def make_request_parser(
    kind: ParserKind, handler: RequestHandler, max_header_bytes: int
) -> RequestParser:
    """A request parser of ``kind`` (``auto``: httptools when installed, else Python).

    Raises:
        ValueError: when ``kind`` is ``httptools`` and it is not installed.
    """
    if kind == "python" or (kind == "auto" and not httptools_available()):
        return PythonRequestParser(handler, max_header_bytes)
    if not httptools_available():
        raise ValueError("httptools is not installed")
    return _HttptoolsRequestParser(handler, max_header_bytes)


class PythonResponseParser(_Framer):
    """The pure-Python response parser (implements :class:`ResponseParser`)."""

    def __init__(self, handler: ResponseHandler, max_head: int = 65536) -> None:
        super().__init__(max_head)
        self._handler = handler
        self.head_request = False
        """Set before each request: a response to HEAD has no body."""
        self.upgraded = False

    def _parse_head(self, block: bytes) -> tuple[int, int | None, bool]:
        lines = block.split(b"\r\n")
        m = _STATUS_LINE.match(lines[0])
        if m is None:
            raise HttpParseError(502, "invalid status line from backend")
        status = int(m.group(2))
        minor = int(m.group(1))
        headers = parse_headers(lines[1:])
        tokens = _connection_tokens(headers)
        keep_alive = (b"close" not in tokens) if minor == 1 else (b"keep-alive" in tokens)
        chunked = False
        length: int | None = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"content-length":
                v = value.strip()
                if not v.isdigit():
                    raise HttpParseError(502, "invalid Content-Length from backend")
                length = int(v)
        if chunked:
            length = None
        if status == 101:
            if not any(n.lower() == b"upgrade" for n, _ in headers):
                raise HttpParseError(502, "101 response without Upgrade from backend")
            self.upgraded = True
            reason = m.group(3) or b""
            self._handler.on_response(
                ResponseHead(status, reason, minor, headers, False, False, None, False, True)
            )
            return _TUNNEL, None, True
        no_body = self.head_request or status < 200 or status in (204, 304)
        until_close = not no_body and not chunked and length is None
        if until_close:
            keep_alive = False
        head = ResponseHead(
            status=status,
            reason=m.group(3) or b"",
            minor=minor,
            headers=headers,
            keep_alive=keep_alive,
            chunked=chunked,
            content_length=length,
            until_close=until_close,
            no_body=no_body,
        )
        self._handler.on_response(head)
        if status < 200:
            return _INTERIM, None, False  # the final response follows
        if no_body:
            return _HEAD, None, False
        if chunked:
            return _CHUNK_SIZE_LINE, None, False
        if until_close:
            return _UNTIL_CLOSE, None, False
        return _LENGTH, length, False

    def _body(self, data: bytes) -> None:
        self._handler.on_body(data)

    def _end(self) -> None:
        self._handler.on_response_end()

    def feed_eof(self) -> bool:
        """The backend closed; returns True when that ended a read-until-close body."""
        if self._state == _UNTIL_CLOSE:
            self._state = _HEAD
            self._handler.on_response_end()
            return True
        return False


class _HttptoolsResponseParser:
    """The llhttp response parser (implements :class:`ResponseParser`); same events as the
    Python one, which it hands each response to a ``HEAD`` request."""

    def __init__(self, handler: ResponseHandler) -> None:
        import httptools

        self._upgrade: type[Exception] = httptools.HttpParserUpgrade
        self._invalid: type[Exception] = httptools.HttpParserError
        self._handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._python: PythonResponseParser | None = None
        self.head_request = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._until_close = False
        self._in_head = True
        self._connection = False

    # httptools callbacks (no on_message_begin, as in the request parser)
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailers (after a chunked body) are dropped
            self._headers.append((name, value))
            if len(name) == 10 and name.lower() == b"connection":
                self._connection = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        status = self._status = p.get_status_code()
        minor = _minor(p, self._connection)
        self._connection = False
        headers = self._headers
        reason = self._reason
        self._headers = []
        self._reason = b""
        chunked = False
        length: int | None = None
        tokens: set[bytes] = set()
        for name, value in headers:
            size = len(name)  # only the names of these lengths can matter: no lower() for others
            if size == 14 and name.lower() == b"content-length":
                length = int(value)  # llhttp has checked it
            elif size == 17 and name.lower() == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif size == 10 and name.lower() == b"connection":
                tokens.update([t.strip().lower() for t in value.split(b",")])
        if chunked:
            length = None
        keep_alive = (b"close" not in tokens) if minor == 1 else (b"keep-alive" in tokens)
        if status == 101:
            if not any(n.lower() == b"upgrade" for n, _ in headers):
                raise HttpParseError(502, "101 response without Upgrade from backend")
            head = ResponseHead(101, reason, minor, headers, False, False, None, False, True)
            self._handler.on_response(head)
            return
        no_body = status < 200 or status in (204, 304)
        until_close = self._until_close = not no_body and not chunked and length is None
        self._handler.on_response(
            ResponseHead(
                status,
                reason,
                minor,
                headers,
                keep_alive and not until_close,
                chunked,
                length,
                until_close,
                no_body,
            )
        )

    def on_body(self, body: bytes) -> None:
        self._handler.on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        if self._status >= 200:
            self._handler.on_response_end()

    def feed(self, data: bytes) -> bytes | None:
        if self.head_request:
            if self._python is None:
                self._python = PythonResponseParser(self._handler)
            self._python.head_request = True
            return self._python.feed(data)
        try:
            self._parser.feed_data(data)
        except self._upgrade as exc:
            return data[int(exc.args[0]) :]
        except self._invalid as exc:
            cause = exc.__context__
            if cause is not None:  # raised by a callback: ours or the handler's
                raise cause from None
            raise HttpParseError(502, f"invalid response from backend: {exc}") from None
        return None

    def feed_eof(self) -> bool:
        if self.head_request and self._python is not None:
            return self._python.feed_eof()
        if self._until_close:
            self._until_close = False
            self._handler.on_response_end()
            return True
        return False


def make_response_parser(kind: ParserKind, handler: ResponseHandler) -> ResponseParser:
    """A response parser of ``kind`` (``auto``: httptools when installed, else Python).

    Raises:
        ValueError: when ``kind`` is ``httptools`` and it is not installed.
    """
    if kind == "python" or (kind == "auto" and not httptools_available()):
        return PythonResponseParser(handler)
    if not httptools_available():
        raise ValueError("httptools is not installed")
    return _HttptoolsResponseParser(handler)


# --- whole heads: the agent's server reads a head, then parses it ------------------------------

_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")


def parse_request_head(block: bytes) -> tuple[bytes, bytes, int, list[tuple[bytes, bytes]]]:
    """``(method, target, minor, headers)`` of a request head read whole (without the blank
    line that ends it), with the request-line and header rules of the router's parsers.

    Raises:
        HttpParseError: 400 on an invalid request line or header, 505 on a well-formed request
            line of an HTTP version other than 1.0 and 1.1.
    """
    lines = block.split(b"\r\n")
    m = _REQUEST_LINE.match(lines[0])
    if m is None:
        parts = lines[0].split(b" ")
        if (
            len(parts) == 3
            and _TOKEN.match(parts[0])
            and _VERSION.match(parts[2])
            and parts[2] not in (b"HTTP/1.0", b"HTTP/1.1")
        ):
            version = parts[2].decode("ascii")
            raise HttpParseError(505, f"unsupported protocol {version!r}")
        raise HttpParseError(400, "invalid request line")
    return m.group(1), m.group(2), int(m.group(3)), parse_headers(lines[1:])


def parse_status_line(line: bytes) -> tuple[int, int, bytes]:
    """``(minor, status, reason)`` of a status line (without its CRLF).

    Raises:
        HttpParseError: 502 on an invalid status line.
    """
    m = _STATUS_LINE.match(line)
    if m is None:
        raise HttpParseError(502, "invalid status line from backend")
    return int(m.group(1)), int(m.group(2)), m.group(3) or b""


# --- writing heads ---------------------------------------------------------------------------

REASONS = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}
"""The reason phrases castiron writes, by status."""


def reason_phrase(status: int, default: str = "Unknown") -> str:
    """The reason phrase of ``status`` (``default`` for one castiron does not write)."""
    return REASONS.get(status, default)


def _header_lines(headers: Iterable[tuple[str, str]]) -> str:
    lines = []
    for name, value in headers:
        if _TOKEN.match(name.encode("latin-1")) is None or "\r" in value or "\n" in value:
            raise ValueError(f"invalid header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def encode_response_head(
    status: int, headers: Iterable[tuple[str, str]], reason: str | None = None
) -> bytes:
    """An HTTP/1.1 status line and ``headers``, up to and including the blank line.

    Raises:
        ValueError: on a header name that is not a token or a value holding CR or LF.
    """
    phrase = reason_phrase(status) if reason is None else reason
    return f"HTTP/1.1 {status} {phrase}\r\n{_header_lines(headers)}\r\n".encode("latin-1")


def encode_request_head(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 request line and ``headers``, up to and including the blank line.

    Raises:
        ValueError: on an invalid method or target, a header name that is not a token or a
            value holding CR or LF.
    """
    line = f"{method} {target} HTTP/1.1".encode("latin-1")
    if _REQUEST_LINE.match(line) is None:
        raise ValueError(f"invalid request line {line[:80]!r}")
    return line + b"\r\n" + (_header_lines(headers) + "\r\n").encode("latin-1")


# --- a blocking reader: one response on a socket ------------------------------------------------


class Receiver(Protocol):
    """What :class:`BlockingResponse` reads from (a connected socket)."""

    def recv(self, bufsize: int, /) -> bytes: ...


_R = TypeVar("_R", bound=Receiver)


class BlockingResponse(Generic[_R]):
    """One HTTP/1.x response read from a blocking socket, through the Python response parser.

    Made for one request and one ``Connection: close`` response (the agent's client, the
    health probe): reading the head on construction, then the body to its ``Content-Length``,
    through ``chunked`` or to the connection's end. Interim (1xx) responses are skipped. Bytes
    after the end of the response are ignored.

    Raises (on construction):
        ConnectionError: when the connection closes before the head is complete.
        HttpParseError: 502 on a malformed head, 431 on one larger than ``max_head``.
        OSError: as ``recv`` does (a timeout, a reset).
    """

    def __init__(self, sock: _R, *, max_head: int = 65536, head_request: bool = False) -> None:
        self.sock = sock
        self._pieces: list[bytes] = []
        self._head: ResponseHead | None = None
        self._done = False
        self._parser = PythonResponseParser(self, max_head)
        self._parser.head_request = head_request
        head = self._read_head()
        self.status: int = head.status
        self.reason: str = head.reason.decode("latin-1")
        self.minor: int = head.minor
        self.header_list: list[tuple[bytes, bytes]] = head.headers
        self.headers: dict[str, str] = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in head.headers
        }
        """The headers by lower-cased name (the last of repeated ones)."""
        self.length: int | None = head.content_length
        self.until_close: bool = head.until_close
        """The body runs to the end of the connection."""

    def _read_head(self) -> ResponseHead:
        # a method of its own: in __init__, a type checker (and mypyc) takes ``self._head`` for
        # the None assigned there, which ``on_response`` changes behind its back
        while self._head is None:
            if not self._receive(65536):
                raise ConnectionError("connection closed before the response head")
        return self._head

    # the parser's handler
    def on_response(self, head: ResponseHead) -> None:
        if head.status >= 200:
            self._head = head

    def on_body(self, data: bytes) -> None:
        self._pieces.append(data)

    def on_response_end(self) -> None:
        self._done = True

    def _receive(self, size: int) -> bool:
        """Feed the parser once; False at the end of the connection."""
        data = self.sock.recv(size)
        if not data:
            self._parser.feed_eof()  # ends a read-until-close body
            return False
        try:
            self._parser.feed(data)
        except HttpParseError:
            if not self._done:
                raise
        return True

    @property
    def complete(self) -> bool:
        """Whether the whole body has been received."""
        return self._done

    def read(self) -> bytes:
        """The whole (rest of the) body.

        Raises:
            ConnectionError: when the connection closes before the body's end.
            HttpParseError: 400 on a malformed chunked body.
            OSError: as ``recv`` does.
        """
        while not self._done:
            if not self._receive(65536):
                if self.length is not None:
                    raise ConnectionError("body shorter than its Content-Length")
                raise ConnectionError("connection closed before the end of the body")
        data = b"".join(self._pieces)
        self._pieces = []
        return data

    def read1(self, size: int) -> bytes:
        """The next piece of the body as it arrives (empty at its end or the connection's).

        Raises:
            HttpParseError: 400 on a malformed chunked body.
            OSError: as ``recv`` does.
        """
        while not self._pieces and not self._done:
            if not self._receive(size):
                break
        data = b"".join(self._pieces)
        self._pieces = []
        return data

    def drain(self, limit: int) -> None:
        """Read and drop the rest of a framed body, up to ``limit`` bytes of it, so that
        closing does not reset a server still writing. A body running to the connection's end
        is not waited for, nor is a server that stops early; errors are ignored."""
        left = limit
        try:
            while not self._done and not self.until_close and left > 0:
                left -= sum(map(len, self._pieces))
                self._pieces = []
                if not self._receive(min(left, 65536) or 1):
                    break
        except (OSError, HttpParseError):
            pass
        self._pieces = []
