"""Helpers every test package uses: a free loopback port, and polling for a condition."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest


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
