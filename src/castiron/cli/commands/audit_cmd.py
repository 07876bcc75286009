"""``castiron audit``: list, verify and export the tamper-evident audit chain.

A thin edge over :mod:`castiron.state.audit` and the state store: parses ``--since``, renders
entries, turns a failed verification into exit 1 naming the first bad entry.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import AuditError, UsageError
from castiron.state import audit
from castiron.state.base import AuditEntry
from castiron.state.store import open_state

_AGO_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_AGO_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: datetime) -> datetime:
    """``2h``/``30m``/``7d`` ago, or an ISO date/time (UTC when no zone is given).

    Raises:
        UsageError: for anything else.
    """
    value = text.strip()
    match = _AGO_RE.match(value)
    if match:
        return now - timedelta(seconds=float(match.group(1)) * _AGO_UNITS[match.group(2)])
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--since {text!r}: use a duration ago (30m, 2h, 7d) or an ISO date/time "
            "(2026-11-30 or 2026-11-30T10:00:00Z)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _line(entry: AuditEntry) -> str:
    change = ""
    if entry.from_ is not None or entry.to is not None:
        change = f" {entry.from_ or '-'} -> {entry.to or '-'}"
    where = f" [{entry.environment}]" if entry.environment else ""
    subject = f" {entry.subject}" if entry.subject else ""
    result = "" if entry.result == "ok" else f" ({entry.result})"
    return f"{entry.seq:>6}  {entry.time[:19]}Z  {entry.actor}  {entry.action}{where}{subject}" + (
        f"{change}{result}"
    )


@click.group("audit", invoke_without_command=True)
@click.option("--env", "environment", default=None, help="Only entries of this environment.")
@click.option(
    "--since",
    default=None,
    metavar="T",
    help="Only entries since T: an ISO date/time (2026-11-30T10:00Z) or a duration ago (2h).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
@click.pass_context
def audit_group(
    ctx: click.Context, cli: CliContext, environment: str | None, since: str | None, as_json: bool
) -> None:
    """List the audit log: who changed what, when, from what to what.

    Subcommands verify the hash chain and export it.
    """
    if ctx.invoked_subcommand is not None:
        return
    with open_state(cli.settings) as store:
        start = parse_since(since, store.clock.now()) if since else None
        entries = store.audit_entries(environment, start)
    if as_json:
        emit_json({"count": len(entries), "entries": [audit.entry_object(e) for e in entries]})
        return
    if not entries:
        click.echo("no audit entries")
        return
    for entry in entries:
        click.echo(_line(entry))


@audit_group.command("verify")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def verify(cli: CliContext, as_json: bool) -> None:
    """Check every entry's hash and link and the signed head; exit 1 naming the first bad seq."""
    with open_state(cli.settings) as store:
        report = store.verify_audit()
    if as_json:
        emit_json(report.as_json())
    if not report.ok:
        where = f"at seq {report.bad_seq}" if report.bad_seq is not None else ""
        raise AuditError(
            f"audit chain does not verify {where}: {report.reason}".replace("  ", " "),
            report.bad_seq,
        )
    if not as_json:
        click.echo(f"ok: {report.entries} entries")


@audit_group.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl"]),
    default="jsonl",
    show_default=True,
    help="Output format: one canonical JSON entry (with its hash) per line.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write to FILE (atomically) instead of stdout.",
)
@pass_cli
def export(cli: CliContext, fmt: str, output: Path | None) -> None:
    """Export the audit chain so anyone can verify it with a short script."""
    with open_state(cli.settings) as store:
        if output is None:
            _write_jsonl(store.audit_rows(), sys.stdout)
            sys.stdout.flush()
            return
        tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8", newline="\n") as out:
                count = _write_jsonl(store.audit_rows(), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, output)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UsageError(f"cannot write {output}: {exc.strerror}") from exc
    click.echo(f"exported {count} entries to {output}", err=True)


def _write_jsonl(rows: Iterable[audit.AuditRow], out: IO[str]) -> int:
    count = 0
    for row in rows:
        out.write(audit.canonical_json(audit.entry_object(audit.row_to_entry(row))) + "\n")
        count += 1
    return count


commands: list[click.Command] = [audit_group]
