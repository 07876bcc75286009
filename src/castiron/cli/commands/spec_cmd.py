"""``castiron init``, ``castiron validate`` and ``castiron schema``: the spec file's commands.

Thin edges over :mod:`castiron.spec`: they pick the file, call the loader and render. They know
nothing of images, runtimes or state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import SpecError, UsageError
from castiron.model import is_name
from castiron.ports import free_ports
from castiron.spec.load import load_spec
from castiron.spec.references import check_references
from castiron.spec.schema import spec_json_schema
from castiron.spec.starter import starter_spec


def _default_app_name(directory: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", directory.name.lower()).strip("-")[:63].strip("-")
    return name if is_name(name) else "app"


ENTRYPOINTS = ("server.py", "app.py", "main.py", "wsgi.py")
"""Files ``init`` looks for to name the entrypoint (the first found wins)."""


def _find_app(base: Path) -> tuple[str, str]:
    """Where the app is (``./app`` when that directory exists, else the spec's directory) and
    its entrypoint file (the first of :data:`ENTRYPOINTS` found there, else server.py)."""
    context = "./app" if (base / "app").is_dir() else "."
    root = base / context
    found = next((name for name in ENTRYPOINTS if (root / name).is_file()), "server.py")
    return context, found


def _write_example(path: Path, staging_port: int, production_port: int) -> None:
    """Copy the bundled example app beside ``path`` with the given router ports.

    Raises:
        UsageError: when ``path`` or an ``app/`` beside it already exists.
    """
    from importlib import resources

    app_dir = path.parent / "app"
    for taken in (path, app_dir):
        if taken.exists():
            raise UsageError(f"{taken} already exists; not overwriting it")
    source = resources.files("castiron") / "examples" / "hello"
    text = (source / "castiron.yaml").read_text(encoding="utf-8")
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{staging_port}")
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{production_port}")
    with resources.as_file(source / "app") as app_source:
        shutil.copytree(app_source, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path} and {app_dir}/ (the bundled example app 'hello')")
    click.echo(f"  staging on 127.0.0.1:{staging_port}, production on 127.0.0.1:{production_port}")
    click.echo("next: `castiron validate`, then `castiron bake` and `castiron deploy staging`")


@click.command("init")
@click.option(
    "--app",
    "app",
    default=None,
    metavar="NAME",
    help="The app's name (default: derived from the spec's directory).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help="The staging router's port (default: a free one; production gets another).",
)
@click.option(
    "--example",
    is_flag=True,
    help="Write the bundled example app (castiron.yaml and app/server.py) instead.",
)
@pass_cli
def init(cli: CliContext, app: str | None, port: int | None, example: bool) -> None:
    """Write a commented starter castiron.yaml (or the bundled example app with --example),
    with the app's directory and entrypoint found and free router ports; never overwrites."""
    path = cli.settings.spec_path
    name = app if app is not None else _default_app_name(path.parent)
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    free = free_ports(2)
    staging_port = port if port is not None else free[0]
    production_port = next(p for p in free if p != staging_port)
    if example:
        _write_example(path, staging_port, production_port)
        return
    context, entrypoint = _find_app(path.parent)
    text = starter_spec(
        name,
        context=context,
        entrypoint=entrypoint,
        staging_port=staging_port,
        production_port=production_port,
    )
    try:
        # O_EXCL: refuse to overwrite, even if the file appears between a check and the write.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"{path} already exists; not overwriting it") from None
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    click.echo(f"wrote {path} for app {name!r}")
    click.echo(
        f"  context {context} (entrypoint python3 {entrypoint}); staging on "
        f"127.0.0.1:{staging_port}, production on 127.0.0.1:{production_port}"
    )
    click.echo("next: `castiron validate`, then `castiron bake` and `castiron deploy staging`")


@click.command("validate")
@click.argument(
    "file", required=False, type=click.Path(path_type=Path, dir_okay=True), metavar="[FILE]"
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def validate(cli: CliContext, file: Path | None, as_json: bool) -> None:
    """Check the spec file, and what it points at (context, base, secret files), and report
    every problem with its line and column.

    FILE defaults to the global -f/--file, else ./castiron.yaml. Exits 2 when the spec is
    invalid.
    """
    path = cli.spec_file(file)
    try:
        loaded = load_spec(path, cli.settings.environ)
        problems = check_references(loaded, cli.settings.environ)
        if problems:
            raise SpecError(problems)
    except SpecError as exc:
        if as_json:
            emit_json(
                {
                    "ok": False,
                    "errors": [
                        {
                            "file": i.file,
                            "line": i.line,
                            "column": i.column,
                            "path": i.path,
                            "message": i.message,
                        }
                        for i in exc.issues
                    ],
                }
            )
        # The boundary prints every issue on stderr, one per line, and exits 2.
        raise
    if as_json:
        emit_json(
            {
                "ok": True,
                "file": str(loaded.path),
                "digest": loaded.digest,
                "app": loaded.spec.app,
                "environments": sorted(loaded.spec.environments),
            }
        )
    else:
        click.echo("ok")


@click.command("schema")
@click.option("--json", "as_json", is_flag=True, help="Print the schema on one line.")
def schema(as_json: bool) -> None:
    """Print a JSON Schema of castiron.yaml for editors and linters."""
    document = spec_json_schema()
    if as_json:
        emit_json(document)
    else:
        click.echo(json.dumps(document, indent=2, sort_keys=False))


commands: list[click.Command] = [init, validate, schema]
