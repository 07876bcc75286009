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
    """An append-only, size-rotated access log file.

    Several processes may write one file (router workers serving one listener): lines are
    gathered in memory and written whole, in one ``write`` to an ``O_APPEND`` file, so lines of
    different processes never interleave; the size that triggers rotation is the file's own,
    and a process that finds the file already rotated by another just opens the new one.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 10 * 1024 * 1024,
        keep: int = 5,
        buffer_bytes: int = 65536,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.buffer_bytes = buffer_bytes
        self._fd: int | None = None
        self._lines: list[str] = []
        self._buffered = 0
        self._size = 0
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, line: str) -> None:
        """Append one line (rotating first when the file is full); never raises on I/O errors:
        a full disk must not stop traffic."""
        if self._fd is None:
            return
        if self._size + self._buffered >= self.max_bytes:
            self.flush()
            if self._size >= self.max_bytes:
                self.rotate()
                if self._fd is None:
                    return
        self._lines.append(line + "\n")
        self._buffered += len(line) + 1
        if self._buffered >= self.buffer_bytes:
            self.flush()

    def rotate(self) -> None:
        """Close the file, shift ``.1``…``.keep-1`` up by one, and start a new file (or open
        the new file when another process rotated it already)."""
        fd = self._fd
        rotated_elsewhere = False
        if fd is not None:
            with contextlib.suppress(OSError):
                rotated_elsewhere = os.stat(self.path).st_ino != os.fstat(fd).st_ino
        self.close()
        if not rotated_elsewhere:
            with contextlib.suppress(OSError):
                for i in range(self.keep - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{i}")
                    if older.exists():
                        os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        with contextlib.suppress(OSError):
            self._open()

    def flush(self) -> None:
        """Write buffered lines to the file (one ``write`` of whole lines)."""
        fd = self._fd
        if fd is None or not self._lines:
            return
        data = "".join(self._lines).encode("utf-8")
        self._lines = []
        self._buffered = 0
        with contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._size = os.fstat(fd).st_size

    def close(self) -> None:
        """Flush and close (``write`` does nothing afterwards until reopened by ``rotate``)."""
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
