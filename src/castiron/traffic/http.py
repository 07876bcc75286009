"""HTTP/1.1 message framing for the builtin router: incremental request and response parsers.

This module owns the wire format only: request lines, status lines, header syntax, message
framing (``Content-Length``, ``chunked``, read-until-close, upgrades) and what counts as a
malformed message. Requests and responses each have two parsers that produce the same events:
one on ``httptools`` (llhttp) when it is installed, one in pure Python; they must agree on every
accepted and refused input. The framing of a response depends on the request method (``HEAD``),
which llhttp cannot be told, so the llhttp response parser hands the response to a ``HEAD``
request to the Python one (an upstream connection carries one exchange at a time, so the
switch always happens between two messages).

It knows nothing of routing, backends, releases or asyncio. Parsers are push parsers: the
caller feeds bytes and receives callbacks on a handler; a parser never buffers a body.
"""

from __future__ import annotations

import functools
import operator
import re
from typing import Literal, NamedTuple, Protocol

__all__ = [
    "HttpParseError",
    "PythonRequestParser",
    "PythonResponseParser",
    "RequestHandler",
    "RequestHead",
    "RequestParser",
    "ResponseHandler",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "httptools_available",
    "make_request_parser",
    "make_response_parser",
]

ParserKind = Literal["auto", "httptools", "python"]

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_REQUEST_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/1\.([01])\Z"
)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?\Z")
_HOST = re.compile(rb"(?:(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?)?\Z")
"""A Host value: reg-name or IPv4 or [IPv6], optional port (RFC 9110 section 7.2); may be
empty when the target has no authority."""
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#@]*)(?:[/?#][\x21-\x7e\x80-\xff]*)?\Z")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[\t\x20-\x7e\x80-\xff]*)?\Z")


class HttpParseError(Exception):
    """A malformed HTTP message; ``status`` is what the router answers (400, 431, 501)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RequestHead(NamedTuple):
    """The request line and headers of one request, with its framing decided.

    A named tuple rather than a frozen dataclass: one is built per request, and a frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost four times as much."""

    method: bytes
    target: bytes
    minor: int
    """HTTP/1.``minor`` (0 or 1)."""
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    upgrade: bool
    chunked: bool
    content_length: int | None
    connection: frozenset[bytes] = frozenset()
    """The lower-cased tokens of the ``Connection`` header(s) (hop-by-hop header names)."""


class ResponseHead(NamedTuple):
    """The status line and headers of one response, with its framing decided (a named
    tuple, like :class:`RequestHead`)."""

    status: int
    reason: bytes
    minor: int
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    chunked: bool
    content_length: int | None
    until_close: bool
    """The body ends when the backend closes the connection."""
    no_body: bool


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


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
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


_SPECIAL = frozenset({b"connection", b"content-length", b"transfer-encoding", b"upgrade"})
_HOP_FORBIDDEN = frozenset({b"host", b"content-length", b"transfer-encoding"})
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
        lname = name.lower()
        if lname == b"host":
            hosts += 1
            host = value
        elif lname in _SPECIAL:
            special = True
    if hosts != 1 or target[:1] != b"/" or not _valid_host(host or b""):
        _check_host(target, minor, host, hosts)  # raises unless an HTTP/1.0 or absolute form
    if not special:  # the common case: no framing or hop-by-hop headers at all
        return RequestHead(method, target, minor, headers, minor == 1, False, False, None)
    chunked, length = _framing(headers)
    tokens = frozenset(_connection_tokens(headers))
    if tokens & _HOP_FORBIDDEN:
        raise HttpParseError(400, "Connection header names an end-to-end header")
    keep_alive = (b"close" not in tokens) if minor == 1 else (b"keep-alive" in tokens)
    upgrade = b"upgrade" in tokens and any(n.lower() == b"upgrade" for n, _ in headers)
    return RequestHead(method, target, minor, headers, keep_alive, upgrade, chunked, length, tokens)


# --- body framing, shared by the Python request and response parsers ---------------------------

(_HEAD, _LENGTH, _CHUNK_SIZE_LINE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _TUNNEL) = (
    range(8)
)
_INTERIM = -1  # an interim (1xx) response: the next head follows, no message ended


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

    def _headers(self, lines: list[bytes]) -> list[tuple[bytes, bytes]]:
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
        head = _request_head(m.group(1), m.group(2), int(m.group(3)), self._headers(lines[1:]))
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


_NAME_OF = operator.itemgetter(0)
_VALUE_OF = operator.itemgetter(1)


class _HttptoolsRequestParser:
    """The llhttp request parser through ``httptools``; same events as the Python one."""

    def __init__(self, handler: RequestHandler, max_header_bytes: int) -> None:
        import httptools

        self._ht = httptools
        self._handler = handler
        self._max = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._error: HttpParseError | None = None

    # httptools callbacks (no on_message_begin: a call per message that state reset where a
    # message's head is consumed and where it ends makes unnecessary)
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailers (after a chunked body) are dropped
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        p = self._parser
        minor = 1 if p.get_http_version() == "1.1" else 0
        headers = self._headers
        values = b"".join(map(_VALUE_OF, headers))
        size = len(self._url) + 16 + len(values) + sum(map(len, map(_NAME_OF, headers)))
        size += 4 * len(headers)
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
        except self._ht.HttpParserUpgrade as exc:
            return data[int(exc.args[0]) :]
        except self._ht.HttpParserError as exc:
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
        headers = self._headers(lines[1:])
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

        self._ht = httptools
        self._handler = handler
        self._parser = httptools.HttpResponseParser(self)
        self._python: PythonResponseParser | None = None
        self.head_request = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._until_close = False
        self._in_head = True

    # httptools callbacks (no on_message_begin, as in the request parser)
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # trailers (after a chunked body) are dropped
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        status = self._status = p.get_status_code()
        minor = 1 if p.get_http_version() == "1.1" else 0
        headers = self._headers
        reason = self._reason
        self._headers = []
        self._reason = b""
        chunked = False
        length: int | None = None
        tokens: set[bytes] = set()
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)  # llhttp has checked it
            elif lname == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif lname == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
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
        except self._ht.HttpParserUpgrade as exc:
            return data[int(exc.args[0]) :]
        except self._ht.HttpParserError as exc:
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
