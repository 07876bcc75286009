"""The routers' access log: one JSON line per request, in a file rotated by size.

This module owns the access log's line (``time``, ``client``, ``method``, ``path``,
``status``, ``bytes``, ``upstream``, ``release``, ``duration_ms``) and its file: appended
with a buffer, flushed by the router's housekeeping (at least every ``flush_interval``),
rotated when it passes ``max_bytes`` (``ENV.log`` becomes ``ENV.log.1``, ``.1`` becomes
``.2``, … and the oldest of ``keep`` is removed). Files are 0600.

It knows nothing of sockets, HTTP parsing or event loops: routers call :meth:`AccessLog.write`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import IO

__all__ = ["AccessLog", "access_line"]


def access_line(
    *,
    at: float,
    client: str,
    method: str,
    path: str,
    status: int,
    sent: int,
    upstream: str | None,
    release: str | None,
    duration_ms: float,
) -> str:
    """One access log line (JSON, no newline); ``at`` is a Unix time."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    return json.dumps(
        {
            "time": stamp,
            "client": client,
            "method": method,
            "path": path,
            "status": status,
            "bytes": sent,
            "upstream": upstream,
            "release": release,
            "duration_ms": round(duration_ms, 3),
        },
        separators=(",", ":"),
    )


class AccessLog:
    """An append-only, size-rotated access log file."""

    def __init__(self, path: Path, *, max_bytes: int = 10 * 1024 * 1024, keep: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._file: IO[str] | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=65536)
        self._size = os.fstat(fd).st_size

    def write(self, line: str) -> None:
        """Append one line (rotating first when the file is full); never raises on I/O errors:
        a full disk must not stop traffic."""
        if self._file is None:
            return
        if self._size >= self.max_bytes:
            self.rotate()
            if self._file is None:
                return
        try:
            self._file.write(line + "\n")
        except OSError:
            return
        self._size += len(line) + 1

    def rotate(self) -> None:
        """Close the file, shift ``.1``…``.keep-1`` up by one, and start a new file."""
        self.close()
        with contextlib.suppress(OSError):
            for i in range(self.keep - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        with contextlib.suppress(OSError):
            self._open()

    def flush(self) -> None:
        """Write buffered lines to the file."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.flush()

    def close(self) -> None:
        """Flush and close (``write`` does nothing afterwards until reopened by ``rotate``)."""
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()
