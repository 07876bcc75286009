"""The log pump: copies an instance's output into its log file with its secret values masked.

An instance with secrets does not write its log file itself: its stdout and stderr are two
pipes read by this tiny process, which masks every secret value in each (``***``, see
:class:`castiron.redact.StreamRedactor`) and appends to the log (``O_APPEND``, so the agent's
copy-truncate rotation goes on working). The values arrive on a descriptor given on the
command line (a pipe the supervisor writes and closes), never in ``argv`` or the environment,
which other local users may read.

The pump runs in its own session, so it outlives an agent that is killed; it exits when the
last process holding the pipes' write ends (the instance and whatever it started) has exited.

Run as ``python -m castiron.agent.logpump --secrets-fd N --source-fd A --source-fd B`` with the
log as stdout (without ``--source-fd``, stdin is the one source). It imports only the standard
library and :mod:`castiron.redact`.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal

from castiron.redact import Redactor

_CHUNK = 64 * 1024


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, _CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pump(sources: list[int], target: int, redactor: Redactor) -> None:
    """Copy every one of ``sources`` to ``target`` until each ends, masking ``redactor``'s
    values. Each source is masked as its own stream, so output on one (stderr) written between
    two pieces of a value on another (stdout) does not hide the value from the mask."""
    if len(sources) == 1:  # any descriptor, a regular file too (epoll refuses those)
        stream = redactor.stream()
        while chunk := os.read(sources[0], _CHUNK):
            _write_all(target, stream.feed(chunk))
        _write_all(target, stream.flush())
        return
    streams = {fd: redactor.stream() for fd in sources}
    with selectors.DefaultSelector() as selector:
        for fd in sources:
            selector.register(fd, selectors.EVENT_READ)
        while streams:
            for key, _ in selector.select():
                fd = int(key.fd)
                chunk = os.read(fd, _CHUNK)
                masked = streams[fd].feed(chunk) if chunk else streams.pop(fd).flush()
                if masked:
                    _write_all(target, masked)
                if not chunk:
                    selector.unregister(fd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the values from ``--secrets-fd``, then pump every ``--source-fd`` to
    stdout."""
    parser = argparse.ArgumentParser(prog="python -m castiron.agent.logpump")
    parser.add_argument("--secrets-fd", type=int, required=True)
    parser.add_argument("--source-fd", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    # Only the end of the pipes stops the pump: a terminal's signals are not for it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    values = json.loads(_read_all(args.secrets_fd) or b"[]")
    os.close(args.secrets_fd)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return 2
    pump(args.source_fd or [0], 1, Redactor(values))
    return 0


__all__ = ["main", "pump"]

if __name__ == "__main__":
    raise SystemExit(main())
