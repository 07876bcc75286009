"""``castiron drift``: find what differs from each instance's release, and fix it by replacement.

A thin edge over :mod:`castiron.engine.drift`: it reads the environment's ``drift`` section of
the spec (ignore patterns, watch schedule) when the spec file is there, builds an engine,
prints one finding per line (or one JSON object with ``--json``) and exits with 3 when drift
was found (0 when clean, or when ``--fix`` removed all of it). It also keeps the host agent's
drift watch of an environment in line with the spec, through the engine (audited; see
:mod:`castiron.engine.driftwatch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.options import accept_yes_option
from castiron.cli.render import emit_json
from castiron.errors import ExitCode, NotFoundError

if TYPE_CHECKING:
    from castiron.engine.drift import DriftFinding, DriftReport, FixResult

WATCHER_ENV = "CASTIRON_DRIFT_WATCH"
"""Set by the host agent on the drift checks it runs (so they do not re-register the watch)."""


def _line(f: DriftFinding) -> str:
    expected = "-" if f.expected is None else f.expected
    actual = "-" if f.actual is None else f.actual
    return f"{f.kind:<11} {f.instance}  {f.path}  expected {expected}  actual {actual}"


@click.command("drift")
@click.argument("environment", required=False)
@click.option("--full", is_flag=True, help="Re-hash every file instead of the fast stat scan.")
@click.option(
    "--fix",
    is_flag=True,
    help="Replace drifted instances with fresh ones (zero downtime), destroy strays.",
)
@click.option(
    "--lock-wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="With --fix: wait this long for the environment's lock.",
)
@accept_yes_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
@click.pass_context
def drift_cmd(
    ctx: click.Context,
    cli: CliContext,
    environment: str | None,
    full: bool,
    fix: bool,
    lock_wait: float,
    yes: bool,
    as_json: bool,
) -> None:
    """Compare what runs in ENVIRONMENT (default: every one) with its release.

    One line per finding: kind (image, config, filesystem, membership), instance, path or
    field, expected, actual. Exits 3 when drift is found, 0 when clean.
    """
    from castiron.compose import drift_dir, drift_rules, open_engine
    from castiron.engine.drift import (
        check_output,
        default_threads,
        detect_drift,
        fix_drift,
        record_detection,
    )

    settings = cli.settings
    if not settings.state_present():
        if environment is not None:
            raise NotFoundError(f"environment {environment!r} was never deployed")
        names: list[str] = []
    results: list[tuple[DriftReport, FixResult | None]] = []
    remaining = False
    quiet = as_json or not fix
    from castiron.cli.observer import observer_for

    with open_engine(settings, observer=observer_for(cli, quiet=quiet)) as engine:
        if settings.state_present():
            names = (
                [environment]
                if environment is not None
                else [e.name for e in engine.store.list_environments() if e.current_release]
            )
        for name in names:
            rules = drift_rules(settings, name)
            if environment is not None and not settings.environ.get(WATCHER_ENV):
                # Keep the agent's schedule in line with the spec (best effort: a check that
                # cannot reach the agent fails on its own below).
                engine.keep_drift_watch(name, rules)
            options: dict[str, Any] = {
                "baselines": drift_dir(settings),
                "rules": rules,
                "full": full,
                "threads": default_threads() if full else 1,
            }
            if fix:
                result = fix_drift(engine.context, name, lock_wait=lock_wait, **options)
                results.append((result.report, result))
            else:
                report = detect_drift(engine.context, name, **options)
                if settings.environ.get(WATCHER_ENV):
                    record_detection(engine.context, report, "agent watch")
                results.append((report, None))
                remaining = remaining or not report.clean
    output = check_output(results)
    findings = [f for report, _ in results for f in report.findings]
    reports: list[dict[str, Any]] = output["environments"]
    if as_json:
        emit_json(output)
    else:
        for f in findings:
            click.echo(_line(f))
        for data in reports:
            fixed = data.get("fixed")
            if fixed and (fixed["replaced"] or fixed["created"] or fixed["strays_destroyed"]):
                click.echo(
                    f"{data['environment']}: fixed: replaced {len(fixed['replaced'])}, "
                    f"created {len(fixed['created'])}, destroyed {len(fixed['destroyed'])} "
                    f"extra, {len(fixed['strays_destroyed'])} stray(s)"
                    + (", route re-applied" if fixed["route_reapplied"] else "")
                )
            elif fixed and fixed["route_reapplied"]:
                click.echo(f"{data['environment']}: fixed: route re-applied")
        if not findings:
            click.echo(f"no drift in {environment or 'any environment'}")
    if remaining:
        ctx.exit(int(ExitCode.DRIFT))


commands: list[click.Command] = [drift_cmd]
