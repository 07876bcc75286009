"""``castiron doctor``: what this host can and cannot do for the local runtime, in plain words.

Each check is a value (:class:`Check`) built from what the runtime itself uses: the cgroup
layout that enforces instance limits (:mod:`castiron.agent.cgroups`, with a trial group made
and removed) and the bubblewrap sandbox (:func:`castiron.drivers.local.probe_bwrap`). Nothing
is changed on the host.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json


@dataclass(frozen=True)
class Check:
    """One thing the host can or cannot do."""

    name: str
    ok: bool
    detail: str


def check_limits() -> Check:
    """Whether ``memory:`` and ``cpus:`` of local instances are enforced (cgroups)."""
    from castiron.agent import cgroups

    host = cgroups.probe(cgroups.find_host())
    if host.problem is None:
        return Check("limits", True, f"memory and cpus are enforced: {host.describe()}")
    return Check(
        "limits",
        False,
        f"memory and cpus of local instances are NOT enforced: {host.problem}",
    )


def check_sandbox(path_env: str) -> Check:
    """Whether ``isolation: sandbox`` works (bubblewrap installed and allowed here)."""
    from castiron.drivers.local import find_bwrap, probe_bwrap

    bwrap = find_bwrap(path_env)
    if bwrap is None:
        return Check("sandbox", False, "bubblewrap (bwrap) is not installed: isolation is none")
    problem = probe_bwrap(bwrap)
    if problem is not None:
        return Check("sandbox", False, f"{problem}: isolation is none")
    return Check("sandbox", True, f"instances run sandboxed by {bwrap}")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
@click.pass_context
def doctor_cmd(ctx: click.Context, cli: CliContext, as_json: bool) -> None:
    """Check what this host enforces for local instances (limits, sandbox); changes nothing."""
    checks = [
        check_limits(),
        check_sandbox(cli.settings.environ.get("PATH", os.defpath)),
    ]
    if as_json:
        emit_json({"checks": [asdict(c) for c in checks]})
    else:
        for c in checks:
            click.echo(f"{c.name:<8}  {'ok' if c.ok else 'NO':<2}  {c.detail}")
    if not all(c.ok for c in checks):
        ctx.exit(1)


commands: list[click.Command] = [doctor_cmd]
