"""``castiron plan``, ``deploy``, ``rollback`` and ``down``: thin edges over the engine.

They resolve the spec once (the result is cached, see
:func:`castiron.engine.resolve.cached_resolve_spec`), read the settings, build an engine
(:mod:`castiron.compose`), show the plan, ask for confirmation on a terminal, and
render the result; progress goes to stderr so ``--json`` output on stdout stays one object.
The engine is imported inside the commands so CLI start-up stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.observer import observer_for
from castiron.cli.options import accept_yes_option, confirm, lock_wait_option, yes_option
from castiron.cli.planview import confirm_plan, render_plan, tag_of
from castiron.cli.render import emit_json
from castiron.errors import UsageError

if TYPE_CHECKING:
    from castiron.engine.deploy import Engine
    from castiron.engine.plan import Plan
    from castiron.engine.resolve import ResolvedSpec


def _from_registry(engine: Engine, image: str | None, environ: Any) -> str | None:
    """``--image`` as the store knows it: a registry reference is pulled and pinned by digest
    here, before the plan (see :mod:`castiron.engine.imageref`)."""
    from castiron.engine.imageref import resolve_image_reference

    return resolve_image_reference(engine.images, image, environ)


def _plan_json(plan: Plan, tag: str | None, why: str) -> dict[str, Any]:
    return {**plan.to_json(), "tag": tag, "image_chosen": why}


BAKED_WHY = "baked from the current spec and context (castiron bake)"


def choose_image(cli: CliContext, spec: ResolvedSpec, image: str | None) -> tuple[str, str]:
    """The image to deploy and why: ``--image`` when given, else the image baked from the
    current spec and context (the bake's source key), never merely the newest in the store.

    Raises:
        UsageError: when the current spec and context have not been baked.
        ImageError: when the context cannot be read.
    """
    if image is not None:
        return image, f"given by --image {image}"
    from castiron.images.build import BakeOptions, Recipe, baked_image, default_skips
    from castiron.images.store import ImageStore

    settings = cli.settings
    if spec.image is None:  # a spec read before it carried its image section
        from castiron.engine.resolve import resolve_spec
        from castiron.spec.load import load_spec

        spec = resolve_spec(load_spec(spec.path, settings.environ))
    assert spec.image is not None
    recipe = Recipe.from_json(spec.image)
    context = (spec.base_dir / recipe.context).resolve()
    options = BakeOptions(
        context=context,
        base_dir=spec.base_dir,
        environ=settings.environ,
        app=spec.app,
        port=spec.service_port,
        skip=default_skips(context, settings.spec_path, settings.home),
    )
    digest = baked_image(recipe, ImageStore(settings.images_path), options)
    if digest is None:
        raise UsageError(
            f"the current spec and context of app {spec.app!r} ({context}) are not "
            "baked yet; run castiron bake"
        )
    return digest, BAKED_WHY


@click.command("plan")
@click.argument("environment")
@click.option(
    "--image",
    "image",
    metavar="REF",
    help="Tag, digest or digest prefix to deploy, or a registry reference (pulled first).",
)
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when there is nothing to change, 2 when there are changes, 1 on error.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
@click.pass_context
def plan_cmd(
    ctx: click.Context,
    cli: CliContext,
    environment: str,
    image: str | None,
    detailed_exitcode: bool,
    as_json: bool,
) -> None:
    """Show what deploying to ENVIRONMENT would change; changes nothing."""
    from castiron.compose import open_engine, resolved_spec

    settings = cli.settings
    spec = resolved_spec(settings)
    ref, why = choose_image(cli, spec, image)
    with open_engine(settings, observer=observer_for(cli, quiet=True)) as engine:
        ref = _from_registry(engine, ref, settings.environ) or ref
        target = engine.resolve(spec, environment, ref)
        tag = tag_of(engine, target)
        plan = engine.plan(target)
        from castiron.cli.planview import gates_json, render_gates

        gates = gates_json(engine, target) if as_json else None
        gate_lines = [] if as_json else render_gates(engine, target)
    if as_json:
        emit_json({**_plan_json(plan, tag, why), "gates": gates})
    else:
        for line in [*render_plan(plan, tag, target.policy.keep_warm, why), *gate_lines]:
            click.echo(line)
    if detailed_exitcode and plan.has_changes:
        ctx.exit(2)


@click.command("deploy")
@click.argument("environment")
@click.option(
    "--image",
    "image",
    metavar="REF",
    help="Tag, digest or digest prefix to deploy, or a registry reference (pulled first).",
)
@yes_option
@lock_wait_option(
    "Wait up to S seconds for the environment's lock (default: fail at once, exit 4)."
)
@click.option(
    "--continue",
    "continue_",
    is_flag=True,
    help="Do not deploy: let ENVIRONMENT's running canary go on past its current pause.",
)
@click.option(
    "--watch/--no-watch",
    default=None,
    help="Show a canary's progress live (default: on a terminal, without --json).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash every file of a release tree already on disk before reusing it "
    "(default: only files whose stat changed since it was unpacked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def deploy_cmd(
    cli: CliContext,
    environment: str,
    image: str | None,
    yes: bool,
    lock_wait: float,
    continue_: bool,
    watch: bool | None,
    verify: bool,
    as_json: bool,
) -> None:
    """Deploy the image baked from the current spec and context (or --image) to ENVIRONMENT
    with zero downtime."""
    from castiron.cli.commands.canary_cmd import continue_deployment, report_abort, watch_observer
    from castiron.compose import open_engine, resolved_spec

    if continue_:
        continue_deployment(cli, environment, as_json)
        return
    settings = cli.settings
    spec = resolved_spec(settings)
    ref, why = choose_image(cli, spec, image)
    observer = watch_observer(cli, watch, as_json)
    with open_engine(settings, observer=observer, verify_trees=verify) as engine:
        ref = _from_registry(engine, ref, settings.environ) or ref
        target = engine.resolve(spec, environment, ref)
        plan = engine.plan(target)
        question = f"deploy release {target.release.id} to {environment}?"
        confirm_plan(cli, engine, target, plan, question, yes, why)
        with report_abort(environment, as_json):
            result = engine.deploy(target, lock_wait=lock_wait)
    if as_json:
        emit_json(result.to_json())
        return
    if result.outcome == "unchanged":
        click.echo(f"{environment} already runs release {result.release}; nothing to do")
        return
    click.echo(
        f"deployed release {result.release} ({result.digest[:19]}) to {environment} "
        f"in {result.duration_s:.2f}s: http://{target.policy.listen}/"
    )


@click.command("rollback")
@click.argument("environment")
@click.option(
    "--to",
    "to",
    metavar="RELEASE",
    help="Release id (or unique prefix) to go back to; it must have deployed successfully.",
)
@accept_yes_option
@lock_wait_option("Wait up to S seconds for the environment's lock.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def rollback_cmd(
    cli: CliContext, environment: str, to: str | None, yes: bool, lock_wait: float, as_json: bool
) -> None:
    """Go back to ENVIRONMENT's last known-good release (a pointer flip while it is warm)."""
    from castiron.compose import open_engine
    from castiron.engine.rollback import rollback

    with open_engine(cli.settings, observer=observer_for(cli)) as engine:
        result = rollback(engine.context, environment, to=to, lock_wait=lock_wait)
    if as_json:
        emit_json(result.to_json())
        return
    click.echo(f"rolled {environment} back to release {result.release} in {result.duration_s:.2f}s")


@click.command("down")
@click.argument("environment")
@yes_option
@lock_wait_option("Wait up to S seconds for the environment's lock.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def down_cmd(cli: CliContext, environment: str, yes: bool, lock_wait: float, as_json: bool) -> None:
    """Stop everything in ENVIRONMENT: remove its route and destroy its instances."""
    from castiron.compose import open_engine

    confirm(cli, f"take {environment} down (route removed, every instance destroyed)?", yes)
    with open_engine(cli.settings, observer=observer_for(cli)) as engine:
        destroyed = engine.down(environment, lock_wait=lock_wait)
    from castiron.agent.lifecycle import agent_pid

    pid = agent_pid(cli.settings)
    if as_json:
        emit_json({"environment": environment, "destroyed": destroyed, "agent_pid": pid})
        return
    click.echo(f"{environment} is down ({len(destroyed)} instance(s) destroyed)")
    if pid is None:
        click.echo("no agent runs for this state directory: nothing is left running")
    else:
        click.echo(
            f"the agent (pid {pid}) still runs for {cli.settings.home}; "
            "stop it with `castiron agent stop` (instances of other environments keep running)"
        )


commands: list[click.Command] = [plan_cmd, deploy_cmd, rollback_cmd, down_cmd]
