"""The ``castiron`` command: the root group, global options and the error boundary.

Expected failures (:class:`castiron.errors.CastironError`) become one ``error: ...`` line and
the documented exit code; anything else is a bug and is shown with a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import cast

import click

from castiron import __version__
from castiron.cli.commands import COMMAND_MODULES
from castiron.cli.context import CliContext
from castiron.cli.render import emit_error
from castiron.errors import CastironError, ExitCode
from castiron.redact import Redactor
from castiron.settings import load_settings


class LazyGroup(click.Group):
    """The root group: imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_command_index()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module_name = _command_index().get(cmd_name)
        if module_name is None:
            return super().get_command(ctx, cmd_name)
        module = importlib.import_module(f"castiron.cli.commands.{module_name}")
        for command in module.commands:
            if command.name == cmd_name:
                return cast(click.Command, command)
        return None


def _command_index() -> dict[str, str]:
    return {name: module for module, names in COMMAND_MODULES.items() for name in names}


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(
    __version__, "--version", prog_name="castiron", message="%(prog)s %(version)s"
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="State directory (default: $CASTIRON_HOME, else .castiron/ beside the spec).",
)
@click.option(
    "-f",
    "--file",
    "spec_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Spec file (default: $CASTIRON_SPEC, else ./castiron.yaml).",
)
@click.option(
    "--state",
    "state",
    default=None,
    metavar="URL",
    help="Where state lives: postgresql://USER@HOST/DB (team state) or sqlite:PATH "
    "(default: $CASTIRON_STATE, else state: in HOME/settings.yaml, else HOME/state.db).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None, spec_file: Path | None, state: str | None) -> None:
    """castiron: bake immutable images, deploy them with zero downtime, roll back in a blink.

    Exit codes: 0 ok, 1 operation failed, 2 usage or spec error, 3 drift found,
    4 environment locked, 5 refused by policy.
    """
    redactor = ctx.obj if isinstance(ctx.obj, Redactor) else None
    settings = load_settings(
        os.environ, spec_path=spec_file, home=home, state=state, redactor=redactor
    )
    ctx.obj = CliContext(settings=settings)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (the console script's entry point)."""
    # The secret values a command resolves; the error line masks them too.
    redactor = Redactor()
    try:
        # Without standalone mode click returns a command's `ctx.exit(code)` value.
        result = cli.main(args=argv, prog_name="castiron", standalone_mode=False, obj=redactor)
    except CastironError as exc:
        emit_error(redactor.text(str(exc)))
        return int(exc.exit_code)
    except click.exceptions.Abort:
        emit_error("aborted")
        return int(ExitCode.FAILED)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(ExitCode.USAGE) if exc.exit_code == 2 else int(exc.exit_code)
    except KeyboardInterrupt:
        emit_error("interrupted")
        return 130
    except BrokenPipeError:
        return int(ExitCode.OK)
    except PermissionError as exc:
        # Another user's castiron home (0700) or a file castiron may not touch.
        emit_error(f"permission denied: {exc.filename or exc.strerror}")
        return int(ExitCode.FAILED)
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stderr.write(
            "castiron hit an unexpected error (a bug). Please report it with the traceback above.\n"
        )
        return 70
    return result if isinstance(result, int) else int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(main())
