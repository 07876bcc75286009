"""Output for the CLI: one JSON object on stdout for ``--json``, rich text otherwise.

Owns colours (``NO_COLOR``) and the ``error: ...`` line. Knows nothing of the engine.
rich is imported only when a console is made, so commands that print plain lines or JSON
start without it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def make_console(*, color: bool, stderr: bool = False) -> Console:
    """A rich console that honours ``NO_COLOR`` (``color=False``) and never wraps JSON."""
    from rich.console import Console

    return Console(
        stderr=stderr,
        no_color=not color,
        highlight=False,
        soft_wrap=True,
        force_terminal=None if color else False,
    )


def emit_json(obj: Mapping[str, Any]) -> None:
    """Print ``obj`` as one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def emit_error(message: str) -> None:
    """Print ``error: <message>`` on stderr (continuation lines indented)."""
    lines = message.splitlines() or [""]
    sys.stderr.write(f"error: {lines[0]}\n")
    for line in lines[1:]:
        sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()
