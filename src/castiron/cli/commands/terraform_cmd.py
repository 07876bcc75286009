"""``castiron terraform-provider`` and ``terraform-setup``: castiron's Terraform provider.

``terraform-provider`` is what Terraform runs (through the launcher that ``terraform-setup``
writes): it serves the plugin protocol on a socket and prints only the handshake line. The
provider needs the ``terraform`` extra (``pip install 'castiron[terraform]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from castiron.cli.render import emit_json
from castiron.errors import UsageError


@click.command("terraform-provider")
def terraform_provider_cmd() -> None:
    """Serve castiron's Terraform provider (Terraform runs this; see terraform-setup)."""
    try:
        from castiron.terraform.provider import serve
    except ImportError as exc:
        raise UsageError(
            f"the Terraform provider needs the terraform extra: pip install 'castiron[terraform]' "
            f"({exc})"
        ) from exc
    serve()


@click.command("terraform-setup")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--dev-overrides",
    "dev",
    is_flag=True,
    help="Write a dev_overrides setup (no `terraform init` needed) instead of a mirror.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def terraform_setup_cmd(directory: Path, dev: bool, as_json: bool) -> None:
    """Install the provider for Terraform under DIRECTORY: a filesystem mirror (or, with
    --dev-overrides, a dev_overrides directory) and a CLI configuration file to use with
    TF_CLI_CONFIG_FILE. No registry is ever contacted for castiron/castiron."""
    from castiron.terraform.setup import write_setup

    setup = write_setup(directory, sys.executable, "dev" if dev else "mirror")
    if as_json:
        emit_json(setup.to_json())
        return
    click.echo(f"wrote the castiron provider {setup.version} ({setup.mode}): {setup.provider}")
    click.echo(f"export TF_CLI_CONFIG_FILE={setup.config}")


commands: list[click.Command] = [terraform_provider_cmd, terraform_setup_cmd]
