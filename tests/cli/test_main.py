"""The CLI's error boundary, version and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from castiron import __version__


def test_version_flag(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"castiron {__version__}"


def test_version_json(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("version", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["version"] == __version__


def test_unknown_command_is_usage_error(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("no-such-command")
    assert result.exit_code == 2
    assert "Traceback" not in result.stderr


def test_console_script_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "castiron.cli.main", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert __version__ in proc.stdout
