"""``castiron terraform-setup``: the provider's launcher in a filesystem mirror (or a
dev_overrides directory) and the Terraform CLI configuration that points at it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from castiron import __version__
from castiron.terraform.setup import platform_dir

ADDRESS = "registry.terraform.io/castiron/castiron"


def test_mirror_setup(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("terraform-setup", str(tmp_path / "tf"), "--json")
    assert result.exit_code == 0, result.stderr
    root = tmp_path / "tf"
    provider = (
        root
        / "mirror"
        / ADDRESS
        / __version__
        / platform_dir()
        / f"terraform-provider-castiron_v{__version__}"
    )
    assert json.loads(result.stdout) == {
        "mode": "mirror",
        "config": str(root / "terraformrc"),
        "provider": str(provider),
        "version": __version__,
        "address": ADDRESS,
    }
    assert os.access(provider, os.X_OK)
    assert provider.read_text().splitlines()[-1] == (
        f'exec {sys.executable} -m castiron.terraform "$@"'
    )
    config = (root / "terraformrc").read_text()
    assert (
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f'    path    = "{root / "mirror"}"\n'
        f'    include = ["{ADDRESS}"]\n'
        "  }\n"
        "  direct {\n"
        f'    exclude = ["{ADDRESS}"]\n'
        "  }\n"
        "}\n"
    ) in config


def test_dev_overrides_setup_and_plain_output(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("terraform-setup", str(tmp_path / "tf"), "--dev-overrides")
    assert result.exit_code == 0, result.stderr
    root = tmp_path / "tf"
    launcher = root / "bin" / "terraform-provider-castiron"
    assert result.stdout.splitlines() == [
        f"wrote the castiron provider {__version__} (dev): {launcher}",
        f"export TF_CLI_CONFIG_FILE={root / 'terraformrc'}",
    ]
    config = (root / "terraformrc").read_text()
    assert (
        f'  dev_overrides {{\n    "{ADDRESS}" = "{root / "bin"}"\n  }}\n  direct {{}}\n' in config
    )


def test_unwritable_directory_is_one_error_line(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    result = run_cli("terraform-setup", str(blocker / "tf"))
    assert result.exit_code == 2
    assert result.stderr == f"error: cannot write {blocker / 'tf'}: Not a directory\n"
