"""``castiron lock``: show, take, release and break environment locks.

A thin edge over :class:`castiron.state.locks.LockManager`. ``lock acquire`` takes a manual
(maintenance) lock with no heartbeat, Kamal-style; deployments take their own heartbeat leases.
"""

from __future__ import annotations

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.options import confirm, yes_option
from castiron.cli.render import emit_json
from castiron.errors import UsageError
from castiron.model import is_name
from castiron.spec.schema import parse_duration
from castiron.state.base import format_time_short
from castiron.state.locks import MANUAL_TTL, LockManager, LockStatus, describe
from castiron.state.store import open_state


def _env(value: str) -> str:
    if not is_name(value):
        raise UsageError(
            f"{value!r} is not an environment name (1-63 lowercase letters, digits and '-')"
        )
    return value


def _ttl(value: str | None) -> float:
    if value is None:
        return MANUAL_TTL
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if seconds <= 0:
        raise UsageError("--ttl must be positive")
    return seconds


def _status_line(status: LockStatus) -> str:
    text = describe(status.lease)
    if status.live:
        if status.lease.kind == "manual":
            return text
        return f"{text}; lease expires {format_time_short(status.lease.expires)}"
    return f"{text}; no longer holds ({status.reason})"


@click.group("lock")
def lock_group() -> None:
    """Environment locks: one mutator at a time per environment."""


@lock_group.command("status")
@click.argument("environment", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def status(cli: CliContext, environment: str | None, as_json: bool) -> None:
    """Show who holds the lock of ENVIRONMENT (default: every locked environment)."""
    if environment is not None:
        _env(environment)
    with open_state(cli.settings) as store:
        found = LockManager(store).status(environment)
    if as_json:
        emit_json({"locks": [s.as_json() for s in found]})
        return
    if not found:
        click.echo(
            f"environment {environment!r} is not locked"
            if environment
            else "no environment is locked"
        )
    for item in found:
        click.echo(_status_line(item))


@lock_group.command("acquire")
@click.argument("environment")
@click.option("-m", "--message", required=True, help="Why (shown to anyone who is blocked).")
@click.option(
    "--ttl",
    default=None,
    metavar="DURATION",
    help="How long the lock holds unless released (e.g. 30m, 2h; default 1h).",
)
@click.option(
    "--lock-wait",
    type=click.FloatRange(min=0),
    default=0.0,
    metavar="SECONDS",
    help="Wait up to SECONDS for the current holder instead of failing at once (exit 4).",
)
@pass_cli
def acquire(
    cli: CliContext, environment: str, message: str, ttl: str | None, lock_wait: float
) -> None:
    """Take a maintenance lock on ENVIRONMENT so nobody deploys until it is released."""
    _env(environment)
    seconds = _ttl(ttl)
    if not message.strip():
        raise UsageError("-m/--message must say why the environment is locked")
    with open_state(cli.settings) as store:
        lease = LockManager(store).acquire_manual(
            environment,
            message,
            ttl=seconds,
            wait=lock_wait,
            on_wait=lambda held: click.echo(
                f"{describe(held)}; waiting up to {lock_wait:g}s", err=True
            ),
        )
    click.echo(
        f"locked environment {environment!r} until {format_time_short(lease.expires)}: "
        f"release with `castiron lock release {environment}`"
    )


@lock_group.command("release")
@click.argument("environment")
@pass_cli
def release(cli: CliContext, environment: str) -> None:
    """Release your own maintenance lock on ENVIRONMENT."""
    _env(environment)
    with open_state(cli.settings) as store:
        LockManager(store).release_manual(environment)
    click.echo(f"released the lock on environment {environment!r}")


@lock_group.command("break")
@click.argument("environment")
@click.option("--reason", default="", help="Why, recorded in the audit entry.")
@yes_option
@pass_cli
def break_(cli: CliContext, environment: str, reason: str, yes: bool) -> None:
    """Remove ENVIRONMENT's lock whoever holds it (audited); use when a holder is stuck."""
    _env(environment)
    confirm(cli, f"break the lock on {environment} whoever holds it?", yes)
    with open_state(cli.settings) as store:
        lease = LockManager(store).break_lock(environment, reason)
    click.echo(f"broke the lock of {lease.holder} on environment {environment!r}")


commands: list[click.Command] = [lock_group]
