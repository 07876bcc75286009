"""``castiron state``: where state lives, and moving it from SQLite to PostgreSQL.

A thin edge over :mod:`castiron.state.store` and :func:`castiron.state.postgres.import_state`:
parses the two locations, opens both stores, renders what moved. A PostgreSQL password is
never printed (locations are shown with ``***``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import UsageError
from castiron.state.store import describe_location, open_state


@click.group("state")
def state_group() -> None:
    """Where state lives (SQLite in the home, or PostgreSQL shared by a team)."""


@state_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def show(cli: CliContext, as_json: bool) -> None:
    """Show where state lives and its applied migrations (a password is shown as ***)."""
    settings = cli.settings
    location = describe_location(settings)
    migrations: list[dict[str, str]] = []
    if settings.state_present():
        with open_state(settings) as store:
            migrations = [{"name": n, "applied_at": at} for n, at in store.schema_migrations()]
    if as_json:
        emit_json(
            {
                "location": location,
                "backend": "postgresql" if settings.shared_state else "sqlite",
                "migrations": migrations,
            }
        )
        return
    click.echo(f"state: {location}")
    for m in migrations:
        click.echo(f"  {m['name']}  applied {m['applied_at'][:19]}Z")


@state_group.command("migrate")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="sqlite:PATH",
    help="The SQLite state database to move (e.g. sqlite:.castiron/state.db).",
)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="URL",
    help="The empty PostgreSQL database to move it into (postgresql://USER@HOST/DB).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def migrate(cli: CliContext, source: str, target: str, as_json: bool) -> None:
    """Move a home's history and audit chain from SQLite into an empty PostgreSQL database.

    The chain is verified first, copied whole in one transaction (nothing is written if any
    step fails) and continues there, signed with the same key (the one beside the SQLite
    file). A target that already holds state is refused. Exit 1 on any failure.
    """
    from castiron.settings import load_settings
    from castiron.state.postgres import import_state

    if not source.startswith("sqlite:") or not source.removeprefix("sqlite:"):
        raise UsageError(f"--from: {source!r} is not sqlite:PATH")
    if not target.startswith(("postgresql://", "postgres://")):
        raise UsageError("--to: must be a postgresql:// URL")
    path = Path(source.removeprefix("sqlite:"))
    path = path if path.is_absolute() else Path.cwd() / path
    if not path.is_file():
        raise UsageError(f"--from: {path} does not exist")
    base = cli.settings
    key = path.with_name("audit.key")
    from_settings = replace(base, state=f"sqlite:{path}")
    to_settings = load_settings(
        base.environ, spec_path=base.spec_path, home=base.home, state=target
    )
    to_settings = replace(to_settings, state_password_env=base.state_password_env)
    with (
        open_state(from_settings, key_path=key) as src,
        open_state(to_settings, key_path=key) as dst,
    ):
        from castiron.state.postgres import PostgresStateStore

        if not isinstance(dst, PostgresStateStore):  # pragma: no cover - checked above
            raise UsageError("--to: must be a postgresql:// URL")
        moved = import_state(src, f"sqlite:{path}", dst)
        report = dst.verify_audit()
    where = describe_location(to_settings)
    if as_json:
        emit_json(
            {
                "from": f"sqlite:{path}",
                "to": where,
                "entries": moved.entries,
                "rows": moved.rows,
                "verified": report.ok,
                "chain_entries": report.entries,
            }
        )
    else:
        total = sum(moved.rows.values())
        click.echo(
            f"migrated {total} rows ({moved.entries} audit entries) from sqlite:{path} to "
            f"{where}; the chain verifies with {report.entries} entries"
        )
    if not report.ok:
        from castiron.errors import AuditError

        raise AuditError(f"the migrated chain does not verify: {report.reason}", report.bad_seq)


commands: list[click.Command] = [state_group]
