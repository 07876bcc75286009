"""The router's names for the HTTP/1.1 codec, which lives in :mod:`castiron.httpcodec`.

Kept so that ``castiron.traffic.http`` goes on naming the parsers the router uses; it holds no
code of its own.
"""

from __future__ import annotations

from castiron.httpcodec import (
    HttpParseError,
    ParserKind,
    PythonRequestParser,
    PythonResponseParser,
    RequestHandler,
    RequestHead,
    RequestParser,
    ResponseHandler,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    httptools_available,
    make_request_parser,
    make_response_parser,
)

__all__ = [
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
    "httptools_available",
    "make_request_parser",
    "make_response_parser",
]
