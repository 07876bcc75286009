"""The object every command receives: settings, and consoles made on first use.

rich is only imported when a command asks for a console, which keeps plain-text and ``--json``
commands (``status``, ``rollback``, ``version``) quick to start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from castiron.settings import Settings

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class CliContext:
    """Per-invocation state shared by commands (no globals)."""

    settings: Settings
    _console: Console | None = field(default=None, init=False, repr=False)
    _err_console: Console | None = field(default=None, init=False, repr=False)

    @property
    def console(self) -> Console:
        """A rich console on stdout (made on first use)."""
        if self._console is None:
            from castiron.cli.render import make_console

            self._console = make_console(color=self.settings.color)
        return self._console

    @property
    def err_console(self) -> Console:
        """A rich console on stderr (made on first use)."""
        if self._err_console is None:
            from castiron.cli.render import make_console

            self._err_console = make_console(color=self.settings.color, stderr=True)
        return self._err_console

    def spec_file(self, given: Path | None) -> Path:
        """The spec file to read: the one given on the command line, else the settings' one."""
        return given if given is not None else self.settings.spec_path


pass_cli = click.make_pass_decorator(CliContext)
"""Decorator that hands a command the :class:`CliContext`."""
