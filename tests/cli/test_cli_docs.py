"""Every CLI command has help text and is documented in docs/cli.md."""

from __future__ import annotations

from pathlib import Path

import click

from castiron.cli.main import cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _walk(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        full = f"{prefix}{name}"
        found.append((full, command))
        if isinstance(command, click.Group):
            found.extend(_walk(command, full + " "))
    return found


def test_all_commands_are_found() -> None:
    names = {name for name, _ in _walk(cli)}
    assert {"version", "validate", "audit verify", "lock status"} <= names


def test_every_command_has_help() -> None:
    missing = [name for name, cmd in _walk(cli) if not (cmd.help or "").strip()]
    assert missing == []


def test_every_command_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name, _ in _walk(cli) if f"`castiron {name}" not in text]
    assert missing == [], f"add these to docs/cli.md: {missing}"


def test_every_option_has_help() -> None:
    missing = [
        f"{name} {param.name}"
        for name, cmd in _walk(cli)
        for param in cmd.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == []


def test_declared_command_names_match_modules() -> None:
    import importlib

    from castiron.cli.commands import COMMAND_MODULES

    for module_name, names in COMMAND_MODULES.items():
        module = importlib.import_module(f"castiron.cli.commands.{module_name}")
        assert sorted(c.name for c in module.commands) == sorted(names), module_name
