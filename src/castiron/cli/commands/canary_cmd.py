"""``castiron abort`` and the canary parts of ``castiron deploy``: ``--continue`` and ``--watch``.

``abort`` and ``deploy --continue`` talk to a deployment running in another process through
the state store (:func:`castiron.engine.canary.request_control`): the running canary polls
its journal for them. When the process that ran the deployment died, ``abort`` recovers the
environment itself (the engine's recovery undoes a canary that was not yet promoted).

The live view of a canary (:class:`WatchObserver`): on a terminal a rich ``Live`` table of
the step, the weight and each release's request rate, error rate and p95; otherwise one plain
line a second. Nothing here decides anything; the engine is imported inside the commands.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.observer import CliObserver, observer_for
from castiron.cli.options import accept_yes_option
from castiron.cli.render import emit_json
from castiron.errors import CanaryAbortedError, DeployFailedError, NotFoundError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from castiron.engine.canary import CanaryProgress

PLAIN_EVERY = 1.0
"""Seconds between two plain progress lines of a canary (without a terminal)."""

ABORT_POLL = 0.1
"""Seconds between two looks at the deployment an abort was asked of."""


class WatchObserver(CliObserver):
    """Progress lines plus a live view of a canary (rich on a terminal, plain lines else)."""

    def __init__(self, base: CliObserver, console: Console | None) -> None:
        super().__init__(base.home, base.pause_at, base.quiet, base.redactor)
        self.started = base.started
        self.console = console
        self.live: Live | None = None
        self.last_line = -PLAIN_EVERY

    def progress(self, message: str) -> None:
        if self.live is not None and not self.quiet:
            elapsed = time.monotonic() - self.started
            self.live.console.print(
                f"[{elapsed:6.2f}s] {self.redactor.text(message)}", markup=False
            )
            return
        super().progress(message)

    def canary(self, progress: CanaryProgress) -> None:
        """Show where the canary stands (called at every poll of a step)."""
        final = progress.state == "aborted" or (
            progress.state == "passed" and progress.step == progress.steps
        )
        if self.console is None:
            from castiron.engine.canary import describe

            now = time.monotonic()
            if final or progress.state == "passed" or now - self.last_line >= PLAIN_EVERY:
                self.last_line = now
                super().progress(describe(progress))
            return
        if self.live is None:
            from rich.live import Live

            self.live = Live(console=self.console, auto_refresh=False, transient=False)
            self.live.start()
        self.live.update(_table(progress), refresh=True)
        if final:
            self.live.stop()
            self.live = None


def _table(progress: CanaryProgress) -> Table:
    from rich.table import Table

    pause = "manual" if progress.pause is None else f"{progress.pause:g}s"
    table = Table(
        title=(
            f"canary step {progress.step}/{progress.steps}: weight {progress.weight}%, "
            f"{progress.state} ({progress.elapsed:.1f}s of {pause})"
        ),
        title_justify="left",
    )
    for column in ("release", "", "req/s", "requests", "errors", "p95 ms"):
        table.add_column(column, justify="left" if column in ("release", "") else "right")
    for name, w in (("canary", progress.canary), ("stable", progress.stable)):
        table.add_row(
            w.release,
            name,
            f"{w.rate:.1f}",
            str(w.requests),
            f"{w.error_rate:.2%}",
            f"{w.p95_ms:.1f}" + ("*" if w.latency_is_average else ""),
        )
    return table


def watch_observer(cli: CliContext, watch: bool | None, as_json: bool) -> CliObserver:
    """The observer of ``castiron deploy``: with ``--watch`` (the default on a terminal,
    unless ``--json``) it also shows a canary's progress live."""
    base = observer_for(cli)
    if watch is None:
        watch = sys.stderr.isatty() and not as_json
    if not watch:
        return base
    tty = sys.stderr.isatty() and not as_json
    return WatchObserver(base, cli.err_console if tty else None)


@contextlib.contextmanager
def report_abort(environment: str, as_json: bool) -> Iterator[None]:
    """With ``--json``, print the final object of an aborted canary before its error."""
    try:
        yield
    except CanaryAbortedError as exc:
        if as_json:
            emit_json(
                {
                    "environment": environment,
                    "outcome": "aborted",
                    "error": exc.message.splitlines()[0],
                    **exc.details,
                }
            )
        raise


def continue_deployment(cli: CliContext, environment: str, as_json: bool) -> None:
    """``castiron deploy ENV --continue``: end the running canary's current pause.

    Raises:
        NotFoundError: when no deployment of ENV is running.
        UsageError: when the running deployment is not a canary.
    """
    from castiron.engine.canary import request_control
    from castiron.state.store import open_state

    store = open_state(cli.settings)
    try:
        deployment = request_control(store, environment, "continue")
    finally:
        store.close()
    if as_json:
        emit_json(
            {"environment": environment, "deployment": deployment.id, "requested": "continue"}
        )
        return
    click.echo(f"asked deployment {deployment.id} of {environment} to continue")


@click.command("abort")
@click.argument("environment")
@click.option(
    "--wait",
    "wait",
    type=click.FloatRange(min=0),
    default=120.0,
    show_default=True,
    metavar="S",
    help="Wait up to S seconds for the deployment to be undone (0: only ask).",
)
@accept_yes_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def abort_cmd(cli: CliContext, environment: str, wait: float, yes: bool, as_json: bool) -> None:
    """Abort ENVIRONMENT's running deployment (a canary at any step): traffic back on the
    stable release, the new instances destroyed."""
    from castiron.compose import open_engine
    from castiron.engine.canary import request_control

    with open_engine(cli.settings, observer=observer_for(cli)) as engine:
        deployment = request_control(engine.store, environment, "abort")
        # When the deploying process died, nobody polls the request: recover here (only
        # possible when its lock is free; a live deployment keeps it and undoes itself).
        engine.housekeeping(environment)
        deadline = time.monotonic() + wait
        row = engine.store.get_deployment(deployment.id)
        tidied = time.monotonic()
        while row is not None and row.outcome == "running" and time.monotonic() < deadline:
            time.sleep(ABORT_POLL)
            if time.monotonic() - tidied >= 1.0:  # the deploying process may have died since
                tidied = time.monotonic()
                engine.housekeeping(environment)
            row = engine.store.get_deployment(deployment.id)
    if row is None:
        raise NotFoundError(f"deployment {deployment.id} of {environment!r} disappeared")
    result: dict[str, Any] = {
        "environment": environment,
        "deployment": row.id,
        "outcome": row.outcome,
        "release": row.from_release,
    }
    if row.outcome == "running":
        if as_json:
            emit_json(result)
        if wait == 0:
            if not as_json:
                click.echo(f"asked deployment {row.id} of {environment} to abort")
            return
        raise DeployFailedError(
            f"asked deployment {row.id} of {environment!r} to abort, but it is still running "
            f"after {wait:g}s (a canary honours it between and during steps)"
        )
    if as_json:
        emit_json(result)
    if row.outcome != "aborted":
        raise DeployFailedError(
            f"deployment {row.id} of {environment!r} finished as {row.outcome} before the "
            "abort took effect (use `castiron rollback` to go back)"
        )
    if not as_json:
        back = row.from_release or "nothing"
        click.echo(f"aborted deployment {row.id} of {environment}: traffic on release {back}")


commands: list[click.Command] = [abort_cmd]
