"""``castiron doctor``: what this host is missing for each runtime and router, and how to get it.

A thin edge over :mod:`castiron.engine.doctor`: it renders the checks (one line each, the fix
under it) or prints them as one JSON object, and exits 1 when a required check failed.
"""

from __future__ import annotations

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import ExitCode


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
@click.pass_context
def doctor_cmd(ctx: click.Context, cli: CliContext, as_json: bool) -> None:
    """Check the host for what each runtime and router needs (Python, bubblewrap, Docker,
    HAProxy, free ports, the state directory, the agent, enforced instance limits) and say how
    to install what is missing. Exits 1 when something required is missing."""
    from castiron.engine.doctor import diagnose, failed

    loaded, checks = diagnose(cli.settings)
    missing = failed(checks)
    if as_json:
        emit_json(
            {
                "ok": not missing,
                "spec": str(loaded.path) if loaded is not None else None,
                "home": str(cli.settings.home),
                "checks": [c.to_json() for c in checks],
            }
        )
    else:
        spec = str(loaded.path) if loaded is not None else "none (host checks only)"
        click.echo(f"spec: {spec}")
        for check in checks:
            need = "required" if check.required else "optional"
            click.echo(f"{check.status:<8} {check.name:<16} {need:<9} {check.detail}")
            if check.fix and check.status != "ok":
                click.echo(f"{'':<8} {'':<16} {'':<9} fix: {check.fix}")
        if missing:
            names = ", ".join(c.name for c in missing)
            click.echo(f"{len(missing)} required check(s) failed: {names}")
        else:
            click.echo("everything required is here")
    if missing:
        ctx.exit(int(ExitCode.FAILED))


commands: list[click.Command] = [doctor_cmd]
