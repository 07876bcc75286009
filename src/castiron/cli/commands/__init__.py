"""One module per command (or command group); :mod:`castiron.cli.main` loads them lazily.

Each module exposes ``commands: list[click.Command]``. Declare a new module in
:data:`COMMAND_MODULES` with the top-level command names it provides (keep it sorted): the CLI
imports a module only when one of its commands runs, which keeps start-up fast. A test checks
that the declared names match each module's ``commands``.
"""

from __future__ import annotations

COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "agent_cmd": ("agent",),
    "audit_cmd": ("audit",),
    "canary_cmd": ("abort",),
    "deploy_cmd": ("deploy", "down", "plan", "rollback"),
    "doctor_cmd": ("doctor",),
    "drift_cmd": ("drift",),
    "image_cmd": ("bake", "export", "images", "import", "inspect"),
    "lock_cmd": ("lock",),
    "promote_cmd": ("approve", "promote"),
    "sign_cmd": ("keys", "sign", "verify"),
    "logs_cmd": ("logs",),
    "quickstart_cmd": ("quickstart",),
    "registry_cmd": ("pull", "push"),
    "serve_cmd": ("serve",),
    "spec_cmd": ("init", "schema", "validate"),
    "state_cmd": ("state",),
    "status_cmd": ("history", "releases", "status"),
    "terraform_cmd": ("terraform-provider", "terraform-setup"),
    "token_cmd": ("token",),
    "version_cmd": ("version",),
}
