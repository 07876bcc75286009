"""``castiron logs ENV``: the output of an environment's instances.

Local instances are read through :class:`castiron.agent.client.AgentClient`: the instances are
the agent's records for the environment (exited ones included, until they are destroyed); each
one's stdout and stderr come from its log file, which the agent caps and rotates. A destroyed
local instance (one a failed deployment made) is still shown by ``--instance ID`` from the log
file it left. Instances of
a runtime that keeps their output itself (Docker: a :class:`castiron.drivers.base.LogSource`)
are the environment's recorded instances, read through their driver.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from castiron.agent.client import AgentClient, InstanceRecord
from castiron.agent.lifecycle import socket_path
from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import AgentError, CastironError, NotFoundError, UsageError
from castiron.model import Instance, is_name

if TYPE_CHECKING:
    from castiron.drivers.base import LogSource


def _records(client: AgentClient, environment: str, instance: str | None) -> list[InstanceRecord]:
    try:
        records = client.instances(environment)
    except AgentError as exc:
        raise AgentError(f"cannot read the logs of {environment!r}: {exc}") from exc
    if instance is not None:
        records = [r for r in records if r.id == instance]
        if not records:
            raise NotFoundError(f"no instance {instance!r} in environment {environment!r}")
    return records


_INSTANCE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def _left_log(cli: CliContext, instance: str | None) -> Path | None:
    """The log file a destroyed local instance left in the agent's directory, if any (a
    failed deployment destroys its instances; their output stays readable)."""
    if instance is None or not _INSTANCE_ID.match(instance):
        return None
    path = cli.settings.agent_path / "logs" / f"{instance}.log"
    return path if path.is_file() else None


def _show_left_log(
    environment: str, instance: str | None, path: Path, lines: int, as_json: bool
) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    kept = text.splitlines()[-lines:] if lines > 0 else []
    if as_json:
        emit_json(
            {
                "environment": environment,
                "instances": [
                    {
                        "id": instance,
                        "release": None,
                        "state": "destroyed",
                        "exit_code": None,
                        "log_path": str(path),
                        "lines": kept,
                    }
                ],
            }
        )
        return
    click.echo(f"instance {instance} was destroyed; the output it left in {path}:", err=True)
    for line in kept:
        click.echo(line)


def _prefixed(text: str, prefix: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(
        f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n" for line in lines
    )


def _follow(ids: list[str], stream: Callable[[str], Iterator[bytes]]) -> None:
    """Print new output of every instance until all have exited (or ^C)."""
    lock = threading.Lock()
    errors: list[BaseException] = []
    prefix_width = max(len(i) for i in ids)

    def pump(iid: str) -> None:
        prefix = f"{iid:<{prefix_width}} | " if len(ids) > 1 else ""
        pending = b""
        try:
            for chunk in stream(iid):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                with lock:
                    for line in complete:
                        sys.stdout.write(prefix + line.decode("utf-8", "replace") + "\n")
                    sys.stdout.flush()
            if pending:
                with lock:
                    sys.stdout.write(prefix + pending.decode("utf-8", "replace") + "\n")
                    sys.stdout.flush()
        except CastironError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    if errors:
        raise errors[0]


@dataclass(frozen=True)
class _RuntimeLogs:
    """An environment whose runtime keeps its instances' output: its driver and instances."""

    source: LogSource
    instances: list[tuple[Instance, str]]
    """Recorded instances with their recorded status."""


def _runtime_logs(cli: CliContext, environment: str, instance: str | None) -> _RuntimeLogs | None:
    """The driver and instances of ``environment`` when its runtime is not local and keeps
    the output itself; ``None`` for local environments (and unknown ones: the agent decides)."""
    settings = cli.settings
    if not settings.state_present():
        return None
    from castiron.compose import open_engine
    from castiron.drivers.base import LogSource
    from castiron.engine.strategies import Policy, row_instance

    with open_engine(settings, start_agent=False) as engine:
        row = engine.store.get_environment(environment)
        if row is None:
            return None
        runtime = Policy.from_json(row.config).runtime
        if runtime == "local":
            return None
        driver = engine.driver(runtime)
        if not isinstance(driver, LogSource):
            raise UsageError(f"the {runtime} runtime of {environment!r} keeps no instance output")
        rows = engine.store.list_instances(environment)
    found = [(row_instance(r), r.status) for r in rows if instance is None or r.id == instance]
    if instance is not None and not found:
        raise NotFoundError(f"no instance {instance!r} in environment {environment!r}")
    return _RuntimeLogs(driver, found)


def _show_runtime_logs(
    environment: str, logs: _RuntimeLogs, lines: int, follow: bool, as_json: bool
) -> None:
    by_id = {inst.id: inst for inst, _ in logs.instances}
    if follow:
        if by_id:
            _follow(list(by_id), lambda iid: logs.source.follow_logs(by_id[iid], lines))
        return
    texts = {inst.id: logs.source.logs(inst, lines) for inst, _ in logs.instances}
    if as_json:
        emit_json(
            {
                "environment": environment,
                "instances": [
                    {
                        "id": inst.id,
                        "release": inst.release,
                        "state": status,
                        "exit_code": None,
                        "log_path": None,
                        "lines": texts[inst.id].splitlines(),
                    }
                    for inst, status in logs.instances
                ],
            }
        )
        return
    _print_texts(environment, texts)


def _print_texts(environment: str, texts: dict[str, str]) -> None:
    if not texts:
        click.echo(f"no instances in {environment}", err=True)
        return
    width = max(len(iid) for iid in texts)
    for iid, text in texts.items():
        prefix = f"{iid:<{width}} | " if len(texts) > 1 else ""
        sys.stdout.write(_prefixed(text, prefix))
    sys.stdout.flush()


@click.command("logs")
@click.argument("environment")
@click.option("--instance", metavar="ID", default=None, help="Only this instance's output.")
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(0, 100_000),
    default=100,
    show_default=True,
    help="Lines to show from the end of each instance's log.",
)
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new output until the instances exit."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def logs(
    cli: CliContext,
    environment: str,
    instance: str | None,
    lines: int,
    follow: bool,
    as_json: bool,
) -> None:
    """Show the output (stdout and stderr) of ENVIRONMENT's instances.

    Each line is prefixed with its instance id when there are several. Local instances: the
    agent keeps each log capped and rotated, and exited instances are shown until they are
    destroyed. Docker instances: the container's output, as `docker logs` shows it.
    """
    if not is_name(environment):
        raise UsageError(f"{environment!r} is not a valid environment name")
    if follow and as_json:
        raise UsageError("--follow and --json cannot be combined (--json prints one object)")
    runtime = _runtime_logs(cli, environment, instance)
    if runtime is not None:
        _show_runtime_logs(environment, runtime, lines, follow, as_json)
        return
    client = AgentClient(socket_path(cli.settings))
    left = _left_log(cli, instance)
    if not client.health():
        if left is not None:
            _show_left_log(environment, instance, left, lines, as_json)
            return
        raise AgentError(
            f"no agent runs for {cli.settings.home}: there are no local instances to read"
        )
    try:
        records = _records(client, environment, instance)
    except NotFoundError:
        if left is None:
            raise
        _show_left_log(environment, instance, left, lines, as_json)
        return
    if follow:
        if records:
            _follow([r.id for r in records], lambda iid: client.follow_instance_logs(iid, lines))
        return
    texts = {r.id: client.instance_logs(r.id, lines) for r in records}
    if as_json:
        emit_json(
            {
                "environment": environment,
                "instances": [
                    {
                        "id": r.id,
                        "release": r.release,
                        "state": r.state,
                        "exit_code": r.exit_code,
                        "log_path": r.log_path,
                        "lines": texts[r.id].splitlines(),
                    }
                    for r in records
                ],
            }
        )
        return
    _print_texts(environment, texts)


commands: list[click.Command] = [logs]
