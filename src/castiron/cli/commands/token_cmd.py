"""``castiron token``: API tokens of ``castiron serve`` (create, list, revoke).

A thin edge over :mod:`castiron.engine.access`. The secret is printed once, by ``create``;
the state store keeps only its SHA-256.
"""

from __future__ import annotations

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json


@click.group("token")
def token_group() -> None:
    """API tokens for `castiron serve`: each has a name and a role."""


@token_group.command("create")
@click.argument("name")
@click.option(
    "--role",
    required=True,
    metavar="ROLE",
    help="viewer (read), deployer (+deploy, rollback, promote, canary), approver (+approve) "
    "or admin (everything, including down).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def create(cli: CliContext, name: str, role: str, as_json: bool) -> None:
    """Create the API token NAME with ROLE and print its secret (shown only this once)."""
    from castiron.engine.access import create_token, token_json
    from castiron.state.store import open_state

    with open_state(cli.settings) as store:
        row, secret = create_token(store, name, role)
    if as_json:
        emit_json({**token_json(row), "token": secret})
        return
    click.echo(secret)
    click.echo(
        f"created API token {row.name} (role {row.role}); keep the secret above: it is not "
        "stored and cannot be shown again",
        err=True,
    )


@token_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def list_(cli: CliContext, as_json: bool) -> None:
    """List API tokens (names, roles, who made them; never secrets)."""
    from castiron.engine.access import token_json
    from castiron.state.store import open_state

    with open_state(cli.settings) as store:
        tokens = [token_json(t) for t in store.list_tokens()]
    if as_json:
        emit_json({"tokens": tokens})
        return
    if not tokens:
        click.echo("no API tokens (create one with `castiron token create NAME --role ROLE`)")
        return
    for t in tokens:
        state = f"revoked {t['revoked']}" if t["revoked"] else "active"
        click.echo(
            f"{t['name']}  {t['role']}  created {t['created']} by {t['created_by']}  {state}"
        )


@token_group.command("revoke")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def revoke(cli: CliContext, name: str, as_json: bool) -> None:
    """Revoke the API token NAME: it stops working at once."""
    from castiron.engine.access import revoke_token, token_json
    from castiron.state.store import open_state

    with open_state(cli.settings) as store:
        row = revoke_token(store, name)
    if as_json:
        emit_json(token_json(row))
        return
    click.echo(f"revoked API token {row.name}")


commands: list[click.Command] = [token_group]
