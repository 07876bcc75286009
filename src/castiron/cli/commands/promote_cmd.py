"""``castiron promote`` and ``castiron approve``: thin edges over promotion and its gates.

``promote`` shows the plan with every gate of the destination (and what each would say now,
checks aside), asks for confirmation, then deploys through the gates; ``approve`` records one
approval. Both render results; the engine (:mod:`castiron.engine.promote`,
:mod:`castiron.engine.policy`) decides everything. :func:`render_gates` is also how ``plan``
and ``deploy`` show an environment's gates.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.observer import observer_for
from castiron.cli.options import accept_yes_option, lock_wait_option, yes_option
from castiron.cli.planview import confirm_plan
from castiron.cli.render import emit_json

PASSPHRASE_HELP = "Read the key's passphrase from this environment variable."

if TYPE_CHECKING:
    pass


@click.command("promote")
@click.argument("source", metavar="FROM")
@click.argument("environment", metavar="TO")
@click.option(
    "--release",
    "release",
    metavar="RELEASE",
    help="FROM's release id (or unique prefix) to promote (default: the one FROM serves).",
)
@yes_option
@lock_wait_option("Wait up to S seconds for TO's lock (default: fail at once, exit 4).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def promote_cmd(
    cli: CliContext,
    source: str,
    environment: str,
    release: str | None,
    yes: bool,
    lock_wait: float,
    as_json: bool,
) -> None:
    """Deploy the exact image FROM serves (or --release) to TO, with TO's config, through
    TO's policy gates (exit 5 when one refuses)."""
    from castiron.compose import open_engine, resolved_spec
    from castiron.engine.promote import prepare, promote

    settings = cli.settings
    spec = resolved_spec(settings)
    with open_engine(settings, observer=observer_for(cli)) as engine:
        promotion = prepare(engine.context, spec, source, environment, release=release)
        target = promotion.target
        plan = engine.plan(target)
        click.echo(
            f"promote {source} release {promotion.source_release.id} "
            f"({target.release.digest}) to {environment}",
            err=True,
        )
        confirm_plan(
            cli, engine, target, plan, f"promote release {target.release.id} to {environment}?", yes
        )
        result = promote(engine.context, promotion, lock_wait=lock_wait)
    if as_json:
        emit_json(result.to_json())
        return
    done = result.result
    if done.outcome == "unchanged":
        click.echo(f"{environment} already runs release {done.release}; nothing to do")
        return
    click.echo(
        f"promoted {done.digest[:19]} from {source} to {environment} as release "
        f"{done.release} in {done.duration_s:.2f}s: http://{target.policy.listen}/"
    )


@click.command("approve")
@click.argument("environment")
@click.argument("release")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Your private key (its public key must be listed in the environment's approvers).",
)
@click.option("--passphrase-env", metavar="VAR", default=None, help=PASSPHRASE_HELP)
@click.option("--comment", default="", metavar="TEXT", help="Why; kept with the approval.")
@accept_yes_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def approve_cmd(
    cli: CliContext,
    environment: str,
    release: str,
    key_path: Path,
    passphrase_env: str | None,
    comment: str,
    yes: bool,
    as_json: bool,
) -> None:
    """Approve RELEASE (a release id, as the plan of ENVIRONMENT shows it) for deployment to
    ENVIRONMENT, signed with --key (one of the environment's policy.approvers) and recorded
    with your OS user. One key, or one OS user, counts once; the deployer's own OS user never
    counts; $CASTIRON_ACTOR is only a label."""
    from castiron.cli.commands.sign_cmd import read_passphrase
    from castiron.compose import resolved_spec
    from castiron.engine.promote import approve
    from castiron.images.sign import load_signer
    from castiron.state.store import open_state

    settings = cli.settings
    policy = resolved_spec(settings).environment(environment).gates
    signer = load_signer(key_path, read_passphrase(cli, passphrase_env))
    with open_state(settings) as store:
        approval = approve(store, policy, release, signer, settings.os_user, comment)
    if as_json:
        emit_json(approval.to_json())
        return
    already = "" if approval.added else " (this key had already approved it; counted once)"
    who = ", ".join(
        f"{a.os_user or a.actor} ({a.identity or 'unsigned'})" for a in approval.approvals
    )
    click.echo(
        f"{approval.os_user} approved release {approval.release} for {environment} with key "
        f"{approval.identity.id}{already}; approvals: {who}"
    )


commands: list[click.Command] = [promote_cmd, approve_cmd]
