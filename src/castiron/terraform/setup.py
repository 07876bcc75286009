"""Installing the castiron provider for Terraform: a filesystem mirror or ``dev_overrides``.

Owns the files Terraform needs to find the provider without any registry: a launcher script
(``terraform-provider-castiron``, which serves the provider as ``castiron terraform-provider``
does, with this Python), laid out as an unpacked filesystem mirror
(``HOST/NAMESPACE/TYPE/VERSION/OS_ARCH/``) or as a ``dev_overrides`` directory, and the CLI
configuration file that points Terraform at it (used through ``TF_CLI_CONFIG_FILE``).

It knows nothing of the plugin protocol or of click. Every file is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from castiron import __version__
from castiron.errors import UsageError

HOST, NAMESPACE, TYPE = "registry.terraform.io", "castiron", "castiron"
ADDRESS = f"{HOST}/{NAMESPACE}/{TYPE}"
"""The provider's address; configurations write ``source = "castiron/castiron"``."""

Mode = Literal["mirror", "dev"]

_ARCHES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Setup:
    """What :func:`write_setup` wrote."""

    mode: Mode
    config: Path
    """The CLI configuration file: ``export TF_CLI_CONFIG_FILE=<config>``."""
    provider: Path
    """The launcher Terraform runs."""
    version: str

    def to_json(self) -> dict[str, str]:
        """The ``--json`` object of ``castiron terraform-setup``."""
        return {
            "mode": self.mode,
            "config": str(self.config),
            "provider": str(self.provider),
            "version": self.version,
            "address": ADDRESS,
        }


def platform_dir() -> str:
    """Terraform's name of this platform (``linux_amd64``).

    Raises:
        UsageError: on an architecture Terraform does not build for.
    """
    machine = platform.machine().lower()
    arch = _ARCHES.get(machine)
    if arch is None:
        raise UsageError(f"Terraform has no build for this machine's architecture ({machine})")
    return f"{platform.system().lower()}_{arch}"


def launcher(python: str) -> str:
    """The provider's launcher script: ``castiron terraform-provider`` under ``python``, run
    as ``python -m castiron.terraform`` (the same server without the CLI's start-up)."""
    return (
        "#!/bin/sh\n"
        "# castiron's Terraform provider (written by `castiron terraform-setup`).\n"
        f'exec {shlex.quote(python)} -m castiron.terraform "$@"\n'
    )


def cli_config(mode: Mode, path: Path) -> str:
    """The Terraform CLI configuration that finds the provider at ``path`` (the mirror's root,
    or the ``dev_overrides`` directory), and every other provider as usual."""
    quoted = json.dumps(str(path))
    if mode == "dev":
        body = f"  dev_overrides {{\n    {json.dumps(ADDRESS)} = {quoted}\n  }}\n  direct {{}}\n"
    else:
        body = (
            "  filesystem_mirror {\n"
            f"    path    = {quoted}\n"
            f"    include = [{json.dumps(ADDRESS)}]\n"
            "  }\n"
            "  direct {\n"
            f"    exclude = [{json.dumps(ADDRESS)}]\n"
            "  }\n"
        )
    return (
        "# Written by `castiron terraform-setup`: use it with\n"
        f"#   export TF_CLI_CONFIG_FILE={shlex.quote(str(path.parent / 'terraformrc'))}\n"
        f"provider_installation {{\n{body}}}\n"
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_setup(directory: Path, python: str, mode: Mode = "mirror") -> Setup:
    """Write the provider's launcher and a Terraform CLI configuration under ``directory``:
    ``mirror/…/terraform-provider-castiron_vVERSION`` (for ``terraform init`` from a
    filesystem mirror) or ``bin/terraform-provider-castiron`` (``dev_overrides``: no
    ``init``), and ``terraformrc``.

    Raises:
        UsageError: when ``directory`` cannot be written, or on an unsupported architecture.
    """
    directory = Path(os.path.abspath(directory))
    if mode == "dev":
        root = directory / "bin"
        provider = root / f"terraform-provider-{TYPE}"
    else:
        root = directory / "mirror"
        provider = (
            root
            / HOST
            / NAMESPACE
            / TYPE
            / __version__
            / platform_dir()
            / f"terraform-provider-{TYPE}_v{__version__}"
        )
    config = directory / "terraformrc"
    try:
        _write(provider, launcher(python), 0o755)
        _write(config, cli_config(mode, root), 0o644)
    except OSError as exc:
        raise UsageError(f"cannot write {directory}: {exc.strerror or exc}") from exc
    return Setup(mode=mode, config=config, provider=provider, version=__version__)


__all__ = ["ADDRESS", "Mode", "Setup", "cli_config", "launcher", "platform_dir", "write_setup"]
