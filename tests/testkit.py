"""Helpers every test package uses: a free loopback port, and polling for a condition."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 60.0,
    what: str = "",
    interval: float = 0.02,
) -> object:
    """Poll ``predicate`` until it returns something truthy and return that (an ``OSError``
    counts as "not yet"); fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
