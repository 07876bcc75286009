"""``castiron agent run|start|stop|status|logs|unit``: the host agent's life cycle from the shell.

A thin layer over :mod:`castiron.agent.client` (start, stop, probe, API calls). ``agent run``
replaces the CLI process with the agent (``python -m castiron.agent.daemon``), so a service
manager supervises the agent itself.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from castiron.agent.client import AgentClient, to_json
from castiron.agent.lifecycle import (
    LOG_NAME,
    agent_pid,
    daemon_argv,
    socket_path,
    start_agent,
    stop_agent,
)
from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import AgentError

_router_option = click.option(
    "--router",
    type=click.Choice(["builtin", "haproxy"]),
    default="builtin",
    show_default=True,
    help="The data plane: the builtin proxy or a system HAProxy.",
)
_workers_option = click.option(
    "--router-workers",
    type=click.IntRange(0, 256),
    default=None,
    metavar="N",
    help="Processes of the builtin router, all accepting on each listener "
    "[default: one per CPU, at most 8; 0: inside the agent].",
)
_metrics_option = click.option(
    "--metrics",
    metavar="HOST:PORT",
    default=None,
    help="Serve Prometheus metrics on this loopback address.",
)


def _daemon_args(router: str, metrics: str | None, workers: int | None) -> tuple[str, ...]:
    args: list[str] = ["--router", router]
    if workers is not None:
        args += ["--router-workers", str(workers)]
    if metrics:
        args += ["--metrics", metrics]
    return tuple(args)


@click.group("agent")
def agent() -> None:
    """Run and manage the host agent: it supervises local instances, runs the routers and
    serves the control API on agent/agent.sock."""


@agent.command("run")
@_router_option
@_workers_option
@_metrics_option
@pass_cli
def run(cli: CliContext, router: str, router_workers: int | None, metrics: str | None) -> None:
    """Run the agent in the foreground, logging to stderr (for systemd and containers).

    SIGTERM or SIGINT stop it gracefully: routers drain and close; instances keep running.
    """
    argv = daemon_argv(cli.settings, _daemon_args(router, metrics, router_workers))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@agent.command("unit")
@_router_option
@_workers_option
@_metrics_option
@click.option(
    "--user",
    metavar="NAME",
    default=None,
    help="The user the agent runs as (default: the one running this command).",
)
@click.option(
    "--watchdog",
    type=click.IntRange(2, 3600),
    default=30,
    show_default=True,
    help="WatchdogSec: systemd restarts an agent silent for this many seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def unit(
    cli: CliContext,
    router: str,
    router_workers: int | None,
    metrics: str | None,
    user: str | None,
    watchdog: int,
    as_json: bool,
) -> None:
    """Print a hardened systemd unit that runs the agent of this home (Type=notify: the agent
    reports readiness and pings the watchdog; KillMode=process keeps instances running;
    ProtectSystem=strict with the home as the only writable path)."""
    from castiron.agent.unit import UNIT_NAME, service_unit

    settings = cli.settings
    text = service_unit(
        settings,
        user=user or settings.os_user,
        extra_args=_daemon_args(router, metrics, router_workers),
        watchdog=watchdog,
    )
    if as_json:
        emit_json({"name": UNIT_NAME, "unit": text})
        return
    click.echo(text, nl=False)


@agent.command("start")
@_router_option
@_workers_option
@_metrics_option
@click.option(
    "--timeout", type=float, default=15.0, show_default=True, help="Seconds to wait for it."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def start(
    cli: CliContext,
    router: str,
    router_workers: int | None,
    metrics: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Start the agent in the background (logs to agent/agent.log) and print its pid."""
    settings = cli.settings
    running = agent_pid(settings)
    if running is not None:
        started = False
        pid = running
    else:
        pid = start_agent(
            settings, extra_args=_daemon_args(router, metrics, router_workers), timeout=timeout
        )
        started = True
    if as_json:
        emit_json({"pid": pid, "started": started, "socket": str(socket_path(settings))})
    elif started:
        click.echo(f"agent started (pid {pid}) on {socket_path(settings)}")
    else:
        click.echo(f"agent already running (pid {pid})")


@agent.command("stop")
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for it."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def stop(cli: CliContext, timeout: float, as_json: bool) -> None:
    """Stop the agent gracefully (API, then SIGTERM). Instances keep running."""
    pid = stop_agent(cli.settings, timeout=timeout)
    if as_json:
        emit_json({"pid": pid, "stopped": pid is not None})
    elif pid is None:
        click.echo("agent not running")
    else:
        click.echo(f"agent stopped (pid {pid})")


@agent.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def status(cli: CliContext, as_json: bool) -> None:
    """Show whether the agent runs, its pid, routes and instances."""
    settings = cli.settings
    pid = agent_pid(settings)
    path = socket_path(settings)
    details = None
    if pid is not None:
        try:
            details = AgentClient(path, timeout=5.0).status()
        except AgentError as exc:
            if as_json:
                emit_json({"running": True, "pid": pid, "socket": str(path), "error": str(exc)})
                return
            raise
    if as_json:
        emit_json(
            {
                "running": pid is not None,
                "pid": pid,
                "socket": str(path),
                "status": to_json(details) if details is not None else None,
            }
        )
        return
    if details is None:
        click.echo("agent not running")
        return
    click.echo(f"agent running (pid {details.pid}, up {details.uptime_s:.0f}s) on {path}")
    click.echo(f"  router:    {details.router}")
    click.echo(f"  routes:    {', '.join(details.routes) or 'none'}")
    click.echo(
        f"  instances: {details.running_instances} running, {details.instances} recorded"
        f" ({details.adopted_instances} adopted)"
    )
    click.echo(f"  metrics:   {details.metrics or 'off'}")


@agent.command("logs")
@click.option("-n", "--lines", type=int, default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--instance", metavar="ID", default=None, help="Show this instance's output.")
@pass_cli
def logs(cli: CliContext, lines: int, follow: bool, instance: str | None) -> None:
    """Show the agent's log (or an instance's output with --instance).

    With --follow, the agent's log is followed until the agent stops, an instance's output
    until the instance exits.
    """
    settings = cli.settings
    if instance is not None:
        client = AgentClient(socket_path(settings))
        if follow:
            for chunk in client.follow_instance_logs(instance, lines):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        else:
            click.echo(client.instance_logs(instance, lines), nl=False)
        return
    path = settings.agent_path / LOG_NAME
    if not path.exists():
        raise AgentError(
            f"no agent log at {path} (the agent logs there when started in the background)"
        )
    offset = _print_tail(path, lines)
    while follow and agent_pid(settings) is not None:
        time.sleep(0.2)
        offset = _print_new(path, offset)
    if follow:
        _print_new(path, offset)


def _print_tail(path: Path, lines: int) -> int:
    data = path.read_bytes()
    kept = data.splitlines(keepends=True)[-lines:] if lines > 0 else []
    sys.stdout.buffer.write(b"".join(kept))
    sys.stdout.buffer.flush()
    return len(data)


def _print_new(path: Path, offset: int) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size < offset:  # rotated
        offset = 0
    if size > offset:
        with path.open("rb") as fh:
            fh.seek(offset)
            sys.stdout.buffer.write(fh.read(size - offset))
            sys.stdout.buffer.flush()
    return size


commands: list[click.Command] = [agent]
