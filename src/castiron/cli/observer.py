"""The CLI's step observer: progress lines on stderr, and the test-only pause at a journal step.

``CASTIRON_TEST_PAUSE_AT=STEP`` (read here from the captured environment, never below the CLI)
makes a deployment stop right after journaling STEP: it writes ``paused-at-STEP`` into the
state directory and sleeps, so a test can kill the process (or the agent, an instance, the
router) at that exact point; a ``resume-STEP`` file there lets it go on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from castiron.cli.context import CliContext
from castiron.redact import Redactor

if TYPE_CHECKING:
    from castiron.state.base import JsonObject

PAUSE_ENV = "CASTIRON_TEST_PAUSE_AT"
PAUSE_SECONDS = 300.0


class CliObserver:
    """Progress lines on stderr, and the test-only pause at a journal step."""

    def __init__(
        self,
        home: Path,
        pause_at: str | None,
        quiet: bool = False,
        redactor: Redactor | None = None,
    ) -> None:
        self.home = home
        self.pause_at = pause_at or None
        self.quiet = quiet
        self.redactor = redactor if redactor is not None else Redactor()
        self.started = time.monotonic()

    def step(self, step: str, data: JsonObject) -> None:
        if step == self.pause_at:
            marker = self.home / f"paused-at-{step}"
            marker.write_text(f"{step}\n")
            deadline = time.monotonic() + PAUSE_SECONDS
            resume = self.home / f"resume-{step}"
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def progress(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.monotonic() - self.started
            click.echo(f"[{elapsed:6.2f}s] {self.redactor.text(message)}", err=True)


def observer_for(cli: CliContext, quiet: bool = False) -> CliObserver:
    """The observer of one CLI invocation."""
    return CliObserver(
        cli.settings.home, cli.settings.environ.get(PAUSE_ENV), quiet, cli.settings.redactor
    )


__all__ = ["PAUSE_ENV", "PAUSE_SECONDS", "CliObserver", "observer_for"]
