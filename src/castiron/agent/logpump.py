"""The log pump: copies an instance's output into its log file with its secret values masked.

An instance with secrets does not write its log file itself: its stdout and stderr are a pipe
read by this tiny process, which masks every secret value (``***``, see
:class:`castiron.redact.StreamRedactor`) and appends to the log (``O_APPEND``, so the agent's
copy-truncate rotation goes on working). The values arrive on a descriptor given on the
command line (a pipe the supervisor writes and closes), never in ``argv`` or the environment,
which other local users may read.

The pump runs in its own session, so it outlives an agent that is killed; it exits when the
last process holding the pipe's write end (the instance and whatever it started) has exited.

Run as ``python -m castiron.agent.logpump --secrets-fd N`` with the pipe as stdin and the log
as stdout. It imports only the standard library and :mod:`castiron.redact`.
"""

from __future__ import annotations

import argparse
import json
import os
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


def pump(source: int, target: int, redactor: Redactor) -> None:
    """Copy ``source`` to ``target`` until end of file, masking ``redactor``'s values."""
    stream = redactor.stream()
    while chunk := os.read(source, _CHUNK):
        masked = stream.feed(chunk)
        if masked:
            _write_all(target, masked)
    _write_all(target, stream.flush())


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the values from ``--secrets-fd``, then pump stdin to stdout."""
    parser = argparse.ArgumentParser(prog="python -m castiron.agent.logpump")
    parser.add_argument("--secrets-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # Only the end of the pipe stops the pump: a terminal's signals are not for it.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    values = json.loads(_read_all(args.secrets_fd) or b"[]")
    os.close(args.secrets_fd)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        return 2
    pump(0, 1, Redactor(values))
    return 0


__all__ = ["main", "pump"]

if __name__ == "__main__":
    raise SystemExit(main())
