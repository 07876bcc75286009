"""Options and confirmation shared by the mutating commands: ``--yes``, ``--lock-wait``, and
asking on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from castiron.cli.context import CliContext
from castiron.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])

def confirm(cli: CliContext, question: str, yes: bool) -> None:
    """Ask ``question`` on a terminal unless ``--yes``; refuse without a terminal.

    Raises:
        UsageError: without a terminal and without ``--yes``.
        click.Abort: when the answer is no.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} needs confirmation: pass --yes (no terminal to ask on)")
    if not click.confirm(question, default=False, err=True):
        raise click.Abort()


def yes_option(f: F) -> F:
    """The ``--yes`` option of a command that asks for confirmation (see :func:`confirm`)."""
    return click.option(
        "--yes", is_flag=True, help="Do not ask for confirmation (needed without a TTY)."
    )(f)


def accept_yes_option(f: F) -> F:
    """The ``--yes`` option of a mutating command that never asks (accepted so scripts can
    pass ``--yes`` to every mutating command)."""
    return click.option(
        "--yes", is_flag=True, help="Accepted for scripts; this command never asks."
    )(f)


def lock_wait_option(help_text: str) -> Callable[[F], F]:
    """The ``--lock-wait S`` option (seconds to wait for a lock, default 0), with ``help_text``."""

    def decorate(f: F) -> F:
        return click.option(
            "--lock-wait",
            type=click.FloatRange(min=0),
            default=0.0,
            metavar="S",
            help=help_text,
        )(f)

    return decorate


__all__ = ["accept_yes_option", "confirm", "lock_wait_option", "yes_option"]
