"""The object every command receives: settings and consoles, built once per invocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console

from castiron.cli.render import make_console
from castiron.settings import Settings


@dataclass
class CliContext:
    """Per-invocation state shared by commands (no globals)."""

    settings: Settings
    console: Console = field(init=False)
    err_console: Console = field(init=False)

    def __post_init__(self) -> None:
        self.console = make_console(color=self.settings.color)
        self.err_console = make_console(color=self.settings.color, stderr=True)

    def spec_file(self, given: Path | None) -> Path:
        """The spec file to read: the one given on the command line, else the settings' one."""
        return given if given is not None else self.settings.spec_path


pass_cli = click.make_pass_decorator(CliContext)
"""Decorator that hands a command the :class:`CliContext`."""
