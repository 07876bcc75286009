"""How quickstart picks the staging router's port: --port, $CASTIRON_QUICKSTART_PORT, the
previous run's port in the same directory, 8080, or a free port when 8080 is taken."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from castiron.cli.commands import quickstart_cmd
from castiron.cli.commands.quickstart_cmd import choose_port, invoked_as, try_next
from castiron.errors import UsageError

SPEC = "environments:\n  staging:\n    runtime: local\n    listen: 127.0.0.1:{port}\n"


def test_the_flag_wins_then_the_environment(tmp_path: Path) -> None:
    spec = tmp_path / "castiron.yaml"
    spec.write_text(SPEC.format(port=18001))
    env = {"CASTIRON_QUICKSTART_PORT": "18002"}
    assert choose_port(18003, env, spec, fresh=False) == 18003
    assert choose_port(None, env, spec, fresh=False) == 18002
    assert choose_port(None, {}, spec, fresh=False) == 18001  # the previous run's port


@pytest.mark.parametrize("value", ["http", "0", "70000"])
def test_a_bad_port_variable_is_a_usage_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(UsageError) as err:
        choose_port(None, {"CASTIRON_QUICKSTART_PORT": value}, tmp_path / "x.yaml", fresh=True)
    assert str(err.value) == f"CASTIRON_QUICKSTART_PORT={value!r} is not a port number (1-65535)"


def test_a_taken_default_port_gives_a_free_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = int(holder.getsockname()[1])
        monkeypatch.setattr(quickstart_cmd, "DEFAULT_PORT", taken)
        chosen = choose_port(None, {}, tmp_path / "castiron.yaml", fresh=True)
        assert chosen != taken
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", chosen))


def test_try_next_ends_with_a_clean_teardown() -> None:
    assert [c for c, _ in try_next("castiron --home /srv/h")][-2:] == [
        "castiron --home /srv/h down staging --yes",
        "castiron --home /srv/h agent stop",
    ]


def test_suggested_commands_name_a_castiron_the_shell_finds(tmp_path: Path) -> None:
    script = tmp_path / "venv" / "bin" / "castiron"
    # found on PATH (an activated virtualenv, an installed tool): the bare name
    assert invoked_as(str(script), str(script)) == "castiron"
    # not on PATH, or another castiron first on it: the running script's absolute path
    assert invoked_as(str(script), None) == str(script)
    assert invoked_as(str(script), "/usr/local/bin/castiron") == str(script)
    spaced = tmp_path / "my venv" / "bin" / "castiron"
    assert invoked_as(str(spaced), None) == f"'{spaced}'"
    # python -m castiron.cli.main: the bare name, as before
    assert invoked_as("/x/castiron/cli/main.py", None) == "castiron"
