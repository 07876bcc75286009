"""The agent's side of HTTP/1.1: reading a request, writing a response, dispatching to handlers.

Owns the request limits (head size, body size, head timeout), the JSON error answers and the
status each error type maps to (404 not found, 400 usage, 409 refused, 500 internal). Heads
are parsed and written by :mod:`castiron.httpcodec`, with the router's rules. The
control API and the metrics listener both speak through it. It knows nothing of instances,
routes or watches: handlers are handed to it as a table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from castiron.agent.wire import API_VERSION
from castiron.errors import CastironError, NotFoundError, UsageError
from castiron.httpcodec import (
    HttpParseError,
    encode_response_head,
    message_framing,
    parse_request_head,
)

log = logging.getLogger("castiron.agent")

_MAX_BODY = 1024 * 1024
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0


class HttpError(Exception):
    """An HTTP error answer: ``status`` and a reason for ``{"error": ...}``."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


@dataclass(frozen=True)
class Request:
    """One parsed request."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes


async def read_request(reader: asyncio.StreamReader) -> Request:
    """Read one HTTP/1.x request (``Content-Length`` bodies only), parsed by the shared codec.

    Raises:
        HttpError: for malformed, oversized or chunked requests.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(413, "request head too large") from None
    except asyncio.IncompleteReadError:
        raise HttpError(400, "incomplete request") from None
    if len(head) > MAX_HEAD:
        raise HttpError(413, "request head too large")
    try:
        method, target, _, headers = parse_request_head(head[:-4])
        if any(name.lower() == b"transfer-encoding" for name, _ in headers):
            raise HttpError(411, "chunked request bodies are not supported; send Content-Length")
        _, length = message_framing(headers)
    except HttpParseError as exc:
        raise HttpError(exc.status, exc.reason) from None
    length = length or 0
    if length > _MAX_BODY:
        raise HttpError(413, f"body larger than {_MAX_BODY} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise HttpError(400, "body shorter than its Content-Length") from None
    split = urllib.parse.urlsplit(target.decode("latin-1"))
    query: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
        query[key] = value
    return Request(
        method=method.decode("latin-1"),
        path=urllib.parse.unquote(split.path),
        query=query,
        body=body,
    )


def response_bytes(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response."""
    fields = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(headers or {}).items(),
    ]
    return encode_response_head(status, fields) + body


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def json_body(request: Request) -> object:
    if not request.body:
        raise HttpError(400, "body: a JSON object is required")
    try:
        return json.loads(request.body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"body: invalid JSON: {exc}") from None


def query_number(request: Request, name: str, default: float, low: float, high: float) -> float:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise HttpError(400, f"query {name}: {text!r} is not a number") from None
    if not low <= value <= high:
        raise HttpError(400, f"query {name}: must be between {low:g} and {high:g}")
    return value


Handler = Callable[[Request, "asyncio.StreamWriter", dict[str, str]], Awaitable[object]]
"""A handler: the request, the connection (to stream an answer) and the path's parameters; it
returns a JSON value, ``(status, value)``, or :data:`STREAMED`."""


class _Streamed:
    """Marker: the handler wrote its own response."""


STREAMED = _Streamed()


class Endpoints:
    """The control API's routes: a path pattern (under ``/v1``) and a handler per method."""

    def __init__(self, table: list[tuple[str, dict[str, Handler]]]) -> None:
        self._endpoints = [(re.compile(pattern), methods) for pattern, methods in table]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one connection: read its request, dispatch it, write the JSON answer."""
        status, payload, headers = 200, b"", {}
        try:
            try:
                request = await asyncio.wait_for(read_request(reader), HEAD_TIMEOUT)
                result = await self.dispatch(request, writer)
                if isinstance(result, _Streamed):
                    return
                if isinstance(result, tuple):
                    status, obj = result
                else:
                    obj = result
                payload = json.dumps(obj, sort_keys=True).encode()
            except TimeoutError:
                status, payload = 408, b'{"error": "request head not received in time"}'
            except HttpError as exc:
                status, headers = exc.status, exc.headers
                payload = json.dumps({"error": exc.reason}).encode()
            except NotFoundError as exc:
                status, payload = 404, json.dumps({"error": str(exc)}).encode()
            except UsageError as exc:
                status, payload = 400, json.dumps({"error": str(exc)}).encode()
            except CastironError as exc:
                status, payload = 409, json.dumps({"error": str(exc)}).encode()
            except Exception as exc:
                log.error("internal error: %s", "".join(traceback.format_exception(exc)))
                status = 500
                payload = json.dumps({"error": f"internal error: {exc!r}"}).encode()
            writer.write(response_bytes(status, payload, headers=headers))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def dispatch(self, request: Request, writer: asyncio.StreamWriter) -> object:
        """The answer of the handler ``request`` goes to.

        Raises:
            HttpError: 404 for an unknown path, 405 for a method the path does not take.
        """
        prefix = f"/{API_VERSION}"
        if not request.path.startswith(prefix + "/"):
            raise HttpError(404, f"no such endpoint: {request.path} (the API lives under {prefix})")
        path = request.path[len(prefix) :]
        for pattern, methods in self._endpoints:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            handler = methods.get(request.method)
            if handler is None:
                allowed = ", ".join(sorted(methods))
                raise HttpError(
                    405,
                    f"{request.method} not allowed on {request.path}; use {allowed}",
                    {"Allow": allowed},
                )
            return await handler(request, writer, match.groupdict())
        raise HttpError(404, f"no such endpoint: {request.path}")
