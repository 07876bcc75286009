"""One module per command (or command group); :mod:`castiron.cli.main` registers them.

Each module exposes ``commands: list[click.Command]``. Add new modules to
:data:`COMMAND_MODULES` (keep it sorted by module name).
"""

from __future__ import annotations

from types import ModuleType

from castiron.cli.commands import (
    agent_cmd,
    audit_cmd,
    image_cmd,
    lock_cmd,
    spec_cmd,
    version_cmd,
)

COMMAND_MODULES: list[ModuleType] = [
    agent_cmd,
    audit_cmd,
    image_cmd,
    lock_cmd,
    spec_cmd,
    version_cmd,
]
