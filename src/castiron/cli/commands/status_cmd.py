"""``castiron status``, ``history`` and ``releases``: the read side, rendered.

Before reading, ``status`` finishes or undoes an interrupted deployment and reaps warm
instances past ``keep_warm`` (only when there is such work; that may start the agent), and
starts the host agent again when it died while an environment is deployed (nothing serves
without it). Otherwise these commands never start the agent. The engine is imported inside
the commands so start-up stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json


def _short(value: object, width: int = 12) -> str:
    text = "-" if value is None else str(value)
    return text.removeprefix("sha256:")[:width] if text.startswith("sha256:") else text


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _render_env(env: dict[str, Any]) -> list[str]:
    lines = [
        f"{env['name']}  ({env['runtime']}, listening on {env['listen']})",
        f"  release  {env['release'] or '-'}  image {_short(env['digest'], 19)}"
        + (f"  tag {env['tag']}" if env["tag"] else ""),
    ]
    if env["url"]:
        lines.append(f"  url      {env['url']}")
    instances = env["instances"]
    if instances:
        rows = [("  INSTANCE", "ADDRESS", "RELEASE", "HEALTHY")]
        for i in instances:
            health = "yes" if i["healthy"] else "NO"
            rows.append((f"  {i['id']}", i["address"], i["release"], health))
        lines.extend(_table(rows))
    else:
        lines.append("  no instances")
    for warm in env["warm"]:
        lines.append(
            f"  warm     release {warm['release']}  image {_short(warm['digest'], 19)}: "
            f"{len(warm['instances'])} instance(s) until {warm['until'] or '?'}"
        )
    target = env["rollback_target"]
    if target is not None:
        how = "a pointer flip to its warm instances" if target["warm"] else "a fresh deployment"
        lines.append(
            f"  rollback `castiron rollback {env['name']}` goes to release {target['release']}"
            f"  image {_short(target['digest'], 19)} ({how})"
        )
    for c in env["counters"] or []:
        lines.append(
            f"  router   {c['release']}: {c['requests']} requests, {c['responses_5xx']} 5xx, "
            f"{c['connect_errors']} connect errors, p95 {c['p95_ms']:.1f} ms"
        )
    if env["counters"] is None:
        lines.append("  router   agent not running (no counters)")
    if env["lock"]:
        lock = env["lock"]
        lines.append(f"  locked   by {lock['holder']} for {lock['purpose']!r} ({lock['reason']})")
    if env["interrupted"]:
        lines.append(f"  interrupted deployment(s): {', '.join(env['interrupted'])}")
    if env.get("strays"):
        strays = ", ".join(f"{s['name'] or s['id']} ({s['state']})" for s in env["strays"])
        lines.append(f"  strays: {strays} (not in castiron's records)")
    return lines


@click.command("status")
@click.argument("environment", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def status_cmd(cli: CliContext, environment: str | None, as_json: bool) -> None:
    """Show what each environment (or ENVIRONMENT) serves: release, instances, health, router."""
    from castiron.compose import agent_running, open_engine, revive_agent
    from castiron.engine.status import status

    settings = cli.settings
    if not settings.state_present():
        if environment is not None:
            from castiron.errors import NotFoundError

            raise NotFoundError(f"environment {environment!r} was never deployed")
        data: dict[str, Any] = {"environments": []}
    else:
        with open_engine(settings, start_agent=False) as engine:
            if revive_agent(settings, engine, environment):
                from castiron.cli.observer import observer_for

                observer_for(cli).progress(
                    "the host agent was not running: started it again (it adopts the running "
                    "instances and restores the routes)"
                )
            if engine.needs_housekeeping(environment):
                from castiron.cli.observer import observer_for

                with open_engine(settings, observer=observer_for(cli)) as tidy:
                    tidy.housekeeping(environment)
            data = status(engine, environment, router=agent_running(settings) is not None)
    if as_json:
        emit_json(data)
        return
    if not data["environments"]:
        click.echo("no environment deployed yet (try `castiron deploy staging`)")
        return
    for i, env in enumerate(data["environments"]):
        if i:
            click.echo("")
        for line in _render_env(env):
            click.echo(line)


@click.command("history")
@click.argument("environment")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Newest N only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def history_cmd(cli: CliContext, environment: str, limit: int | None, as_json: bool) -> None:
    """List ENVIRONMENT's deployments: from -> to, strategy, who, when, duration, outcome."""
    from castiron.compose import open_engine
    from castiron.engine.status import history

    with open_engine(cli.settings, start_agent=False) as engine:
        data = history(engine, environment, limit)
    if as_json:
        emit_json(data)
        return
    if not data["deployments"]:
        click.echo(f"no deployments of {environment}")
        return
    rows = [("STARTED", "FROM", "TO", "STRATEGY", "ACTOR", "DURATION", "OUTCOME", "COMMIT")]
    for d in data["deployments"]:
        duration = "-" if d["duration_s"] is None else f"{d['duration_s']:.2f}s"
        outcome = d["outcome"] + (" (recovered)" if d["recovered"] else "")
        rows.append(
            (
                d["started"],
                d["from"] or "-",
                d["to"],
                d["strategy"],
                d["actor"],
                duration,
                outcome,
                (d["git_commit"] or "-")[:12],
            )
        )
    for line in _table(rows):
        click.echo(line)


@click.command("releases")
@click.argument("environment")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def releases_cmd(cli: CliContext, environment: str, as_json: bool) -> None:
    """List ENVIRONMENT's releases, newest first: current, known-good, warm."""
    from castiron.compose import open_engine
    from castiron.engine.status import releases

    with open_engine(cli.settings, start_agent=False) as engine:
        data = releases(engine, environment)
    if as_json:
        emit_json(data)
        return
    if not data["releases"]:
        click.echo(f"no releases of {environment}")
        return
    rows = [("RELEASE", "IMAGE", "TAGS", "CREATED", "STANDING")]
    for r in data["releases"]:
        standing = [
            word
            for word, on in (
                ("current", r["current"]),
                ("known-good", r["known_good"]),
                ("warm", r["warm"]),
            )
            if on
        ]
        if not r["known_good"] and r["last_outcome"]:
            standing.append(r["last_outcome"])
        rows.append(
            (
                r["id"],
                _short(r["digest"]),
                ",".join(r["tags"]) or "-",
                r["created"],
                ", ".join(standing) or "-",
            )
        )
    for line in _table(rows):
        click.echo(line)


commands: list[click.Command] = [status_cmd, history_cmd, releases_cmd]
