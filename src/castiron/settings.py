"""castiron's own options (not the user's spec): where state lives, who acts, colours.

Settings are read once, at the edge (CLI or API), from flags and the process environment, and
then passed down explicitly. Nothing below ``cli``/``api`` reads ``os.environ``.
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path

from castiron.redact import Redactor
from castiron.values import value


def current_os_user() -> str:
    """The name of the process's effective user, from its uid (never from ``$USER``, which
    anyone can set); ``uid N`` when the user has no name."""
    import pwd

    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@value
class Settings:
    """Options that shape how castiron runs, independent of any spec."""

    home: Path
    """State directory (``CASTIRON_HOME``; default ``.castiron/`` beside the spec)."""

    spec_path: Path = Path("castiron.yaml")
    """The spec file commands read unless given another."""

    color: bool = True
    """Colour and styling on terminals; false when ``NO_COLOR`` is set."""

    actor: str = field(default_factory=_default_actor)
    """Who is acting, as ``user@host``; recorded in locks and audit entries."""

    environ: Mapping[str, str] = field(default_factory=dict)
    """The process environment, captured once, for ``${VAR}`` interpolation and secrets."""

    os_user: str = field(default_factory=current_os_user)
    """The OS user running castiron (an identity: it comes from the uid); recorded with
    approvals, and an approval by the deployer's own OS user never counts."""

    redactor: Redactor = field(default_factory=Redactor, compare=False, repr=False)
    """The secret values resolved in this invocation: the state store, the observers and the
    error line mask them (``***``) in every text they write or print."""

    @property
    def state_path(self) -> Path:
        """The SQLite state file."""
        return self.home / "state.db"

    @property
    def images_path(self) -> Path:
        """The OCI image layout that is castiron's image store."""
        return self.home / "images"

    @property
    def releases_path(self) -> Path:
        """Unpacked, read-only release root filesystems for the local runtime."""
        return self.home / "releases"

    @property
    def agent_path(self) -> Path:
        """The host agent's socket, pid file and logs."""
        return self.home / "agent"

    @property
    def audit_key_path(self) -> Path:
        """The per-installation ed25519 key that signs the audit head (outside the DB)."""
        return self.home / "audit.key"


def load_settings(
    environ: Mapping[str, str],
    *,
    spec_path: Path | None = None,
    home: Path | None = None,
    cwd: Path | None = None,
    redactor: Redactor | None = None,
) -> Settings:
    """Build settings from flags (explicit arguments win) and the environment."""
    base = cwd if cwd is not None else Path.cwd()
    spec = (
        spec_path if spec_path is not None else Path(environ.get("CASTIRON_SPEC", "castiron.yaml"))
    )
    if not spec.is_absolute():
        spec = base / spec
    if home is None:
        env_home = environ.get("CASTIRON_HOME")
        home = Path(env_home) if env_home else spec.parent / ".castiron"
    if not home.is_absolute():
        home = base / home
    actor = environ.get("CASTIRON_ACTOR") or _default_actor()
    return Settings(
        home=home,
        spec_path=spec,
        color="NO_COLOR" not in environ and environ.get("TERM") != "dumb",
        actor=actor,
        environ=dict(environ),
        redactor=redactor if redactor is not None else Redactor(),
    )
