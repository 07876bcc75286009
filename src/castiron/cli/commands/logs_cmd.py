"""``castiron logs ENV``: the output of an environment's local instances, read through the agent.

A thin layer over :class:`castiron.agent.client.AgentClient`: the instances are the agent's
records for the environment (exited ones included, until they are destroyed); each one's
stdout and stderr come from its log file, which the agent caps and rotates.
"""

from __future__ import annotations

import sys
import threading

import click

from castiron.agent.client import AgentClient, InstanceRecord, socket_path
from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import AgentError, NotFoundError, UsageError
from castiron.model import is_name


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


def _prefixed(text: str, prefix: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(
        f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n" for line in lines
    )


def _follow(client: AgentClient, records: list[InstanceRecord], lines: int) -> None:
    """Print new output of every instance until all have exited (or ^C)."""
    lock = threading.Lock()
    errors: list[BaseException] = []
    prefix_width = max(len(r.id) for r in records)

    def pump(record: InstanceRecord) -> None:
        prefix = f"{record.id:<{prefix_width}} | " if len(records) > 1 else ""
        pending = b""
        try:
            for chunk in client.follow_instance_logs(record.id, lines):
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
        except (AgentError, NotFoundError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(r,), daemon=True) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    if errors:
        raise AgentError(str(errors[0]))


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
    """Show the output (stdout and stderr) of ENVIRONMENT's local instances.

    Each line is prefixed with its instance id when there are several. The agent keeps each
    log capped and rotated; exited instances are shown until they are destroyed.
    """
    if not is_name(environment):
        raise UsageError(f"{environment!r} is not a valid environment name")
    if follow and as_json:
        raise UsageError("--follow and --json cannot be combined (--json prints one object)")
    client = AgentClient(socket_path(cli.settings))
    if not client.health():
        raise AgentError(
            f"no agent runs for {cli.settings.home}: there are no local instances to read"
        )
    records = _records(client, environment, instance)
    if follow:
        if records:
            _follow(client, records, lines)
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
    if not records:
        click.echo(f"no instances in {environment}", err=True)
        return
    width = max(len(r.id) for r in records)
    for record in records:
        text = texts[record.id]
        prefix = f"{record.id:<{width}} | " if len(records) > 1 else ""
        sys.stdout.write(_prefixed(text, prefix))
    sys.stdout.flush()


commands: list[click.Command] = [logs]
