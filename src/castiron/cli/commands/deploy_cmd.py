"""``castiron plan``, ``deploy``, ``rollback`` and ``down``: thin edges over the engine.

They resolve the spec once (the result is cached, see
:func:`castiron.engine.resolve.cached_resolve_spec`), read the settings, build an engine
(:mod:`castiron.engine.compose`), show the plan, ask for confirmation on a terminal, and
render the result; progress goes to stderr so ``--json`` output on stdout stays one object.
The engine is imported inside the commands so CLI start-up stays fast.

``CASTIRON_TEST_PAUSE_AT=STEP`` (read here from the captured environment, never below the CLI)
makes a deployment stop right after journaling STEP: it writes ``paused-at-STEP`` into the
state directory and sleeps, so a test can kill the process (or the agent, an instance, the
router) at that exact point; a ``resume-STEP`` file there lets it go on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import UsageError
from castiron.redact import Redactor

if TYPE_CHECKING:
    from castiron.engine.deploy import Engine, Target
    from castiron.engine.plan import Plan
    from castiron.engine.resolve import ResolvedSpec
    from castiron.state.base import JsonObject

F = TypeVar("F", bound=Callable[..., Any])

PAUSE_ENV = "CASTIRON_TEST_PAUSE_AT"
PAUSE_SECONDS = 300.0


class CliObserver:
    """Progress lines on stderr, and the test-only pause at a journal step."""

    def __init__(
        self,
        home: Path,
        pause_at: str | None,
        quiet: bool = False,
        redactor: Redactor | None = None,
    ) -> None:
        self.home = home
        self.pause_at = pause_at or None
        self.quiet = quiet
        self.redactor = redactor if redactor is not None else Redactor()
        self.started = time.monotonic()

    def step(self, step: str, data: JsonObject) -> None:
        if step == self.pause_at:
            marker = self.home / f"paused-at-{step}"
            marker.write_text(f"{step}\n")
            deadline = time.monotonic() + PAUSE_SECONDS
            resume = self.home / f"resume-{step}"
            while not resume.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def progress(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.monotonic() - self.started
            click.echo(f"[{elapsed:6.2f}s] {self.redactor.text(message)}", err=True)


def observer_for(cli: CliContext, quiet: bool = False) -> CliObserver:
    """The observer of one CLI invocation."""
    return CliObserver(
        cli.settings.home, cli.settings.environ.get(PAUSE_ENV), quiet, cli.settings.redactor
    )


def confirm(cli: CliContext, question: str, yes: bool) -> None:
    """Ask ``question`` on a terminal unless ``--yes``; refuse without a terminal.

    Raises:
        UsageError: without a terminal and without ``--yes``.
        click.Abort: when the answer is no.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question} needs confirmation: pass --yes (no terminal to ask on)")
    if not click.confirm(question, default=False, err=True):
        raise click.Abort()


def yes_option(f: F) -> F:
    """The ``--yes`` option of a command that asks for confirmation (see :func:`confirm`)."""
    return click.option(
        "--yes", is_flag=True, help="Do not ask for confirmation (needed without a TTY)."
    )(f)


def accept_yes_option(f: F) -> F:
    """The ``--yes`` option of a mutating command that never asks (accepted so scripts can
    pass ``--yes`` to every mutating command)."""
    return click.option(
        "--yes", is_flag=True, help="Accepted for scripts; this command never asks."
    )(f)


def lock_wait_option(help_text: str) -> Callable[[F], F]:
    """The ``--lock-wait S`` option (seconds to wait for a lock, default 0), with ``help_text``."""

    def decorate(f: F) -> F:
        return click.option(
            "--lock-wait",
            type=click.FloatRange(min=0),
            default=0.0,
            metavar="S",
            help=help_text,
        )(f)

    return decorate


def confirm_plan(
    cli: CliContext,
    engine: Engine,
    target: Target,
    plan: Plan,
    question: str,
    yes: bool,
    why: str | None = None,
) -> None:
    """Show ``plan`` and ``target``'s gates on stderr, then ask ``question`` (see
    :func:`confirm`) when the plan changes anything.

    Raises:
        UsageError: without a terminal and without ``--yes``.
        click.Abort: when the answer is no.
    """
    for line in render_plan(plan, tag_of(engine, target), target.policy.keep_warm, why):
        click.echo(line, err=True)
    if target.gates is not None and target.gates.active:
        from castiron.cli.commands.promote_cmd import render_gates

        for line in render_gates(engine, target):
            click.echo(line, err=True)
    if plan.has_changes:
        confirm(cli, question, yes)


def render_plan(plan: Plan, tag: str | None, keep_warm: float, why: str | None = None) -> list[str]:
    """The plan as lines for people (``why``: how the image was chosen)."""
    src = plan.current.id if plan.current is not None else "nothing"
    lines = [
        f"plan for {plan.environment}: {src} -> {plan.target.id} ({plan.strategy})",
        f"  image: {plan.target.digest}" + (f" (tag {tag})" if tag else ""),
    ]
    if why:
        lines.append(f"  image chosen: {why}")
    if not plan.has_changes:
        lines.append("  no changes: the environment already runs this release")
        return lines
    for change in plan.changes:
        if change.field == "image" or (
            plan.current is None and not change.field.startswith("env.")
        ):
            continue
        before = "(none)" if change.before is None else change.before
        after = "(none)" if change.after is None else change.after
        lines.append(f"  {change.field}: {before} -> {after}")
    if plan.current is None:
        cfg = plan.target.config
        lines.append(f"  new environment: {cfg.replicas} replica(s), health {cfg.health.kind}")
    warm = f"kept warm {keep_warm:g}s" if keep_warm > 0 else "destroyed after draining"
    drain = f", drain {plan.destroy} ({warm})" if plan.destroy else ""
    lines.append(f"  instances: create {plan.create}{drain}")
    return lines


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


def tag_of(engine: Engine, target: Target) -> str | None:
    """The target's tag: the one it was named by, else the first tag bound to its digest."""
    if target.tag is not None:
        return target.tag
    for tag, digest in engine.images.tags().items():
        if digest == target.release.digest:
            return tag
    return None


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
    from castiron.engine.compose import open_engine, resolved_spec

    settings = cli.settings
    spec = resolved_spec(settings)
    ref, why = choose_image(cli, spec, image)
    with open_engine(settings, observer=observer_for(cli, quiet=True)) as engine:
        ref = _from_registry(engine, ref, settings.environ) or ref
        target = engine.resolve(spec, environment, ref)
        tag = tag_of(engine, target)
        plan = engine.plan(target)
        from castiron.cli.commands.promote_cmd import gates_json, render_gates

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
    from castiron.engine.compose import open_engine, resolved_spec

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
    from castiron.engine.driftwatch import watch_after_deploy

    watch_after_deploy(settings, environment, spec.environment(environment).drift)
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
    from castiron.engine.compose import open_engine
    from castiron.engine.rollback import rollback

    with open_engine(cli.settings, observer=observer_for(cli)) as engine:
        result = rollback(engine, environment, to=to, lock_wait=lock_wait)
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
    from castiron.engine.compose import open_engine

    confirm(cli, f"take {environment} down (route removed, every instance destroyed)?", yes)
    with open_engine(cli.settings, observer=observer_for(cli)) as engine:
        destroyed = engine.down(environment, lock_wait=lock_wait)
    from castiron.agent.client import agent_pid

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
