"""``castiron version``: print the version (``--json`` for scripts)."""

from __future__ import annotations

import platform

import click

from castiron import __version__
from castiron.cli.render import emit_json


@click.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def version(as_json: bool) -> None:
    """Show castiron's version and the Python it runs on."""
    if as_json:
        emit_json({"version": __version__, "python": platform.python_version()})
    else:
        click.echo(f"castiron {__version__} (Python {platform.python_version()})")


commands: list[click.Command] = [version]
