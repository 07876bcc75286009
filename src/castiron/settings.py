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

from castiron.errors import UsageError
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

    state: str | None = None
    """Where state lives when not in ``home``: ``postgresql://...`` (team state) or
    ``sqlite:PATH`` (``--state``, else ``CASTIRON_STATE``, else ``state:`` in
    ``settings.yaml`` in the home). ``None``: SQLite at ``home/state.db``."""

    state_password_env: str | None = None
    """The variable holding the PostgreSQL password when the URL has none (``state:`` block's
    ``password_env``); its value is read from :attr:`environ` when the store opens."""

    os_user: str = field(default_factory=current_os_user)
    """The OS user running castiron (an identity: it comes from the uid); recorded with
    approvals, and an approval by the deployer's own OS user never counts."""

    redactor: Redactor = field(default_factory=Redactor, compare=False, repr=False)
    """The secret values resolved in this invocation: the state store, the observers and the
    error line mask them (``***``) in every text they write or print."""

    @property
    def state_path(self) -> Path:
        """The SQLite state file (``home/state.db`` unless ``state`` is ``sqlite:PATH``)."""
        if self.state is not None and self.state.startswith("sqlite:"):
            return Path(self.state.removeprefix("sqlite:"))
        return self.home / "state.db"

    @property
    def shared_state(self) -> bool:
        """True when state lives in a PostgreSQL database (shared by every machine)."""
        return self.state is not None and self.state.startswith(("postgresql://", "postgres://"))

    def state_present(self) -> bool:
        """Whether there may be state to read: a PostgreSQL database always may, a SQLite
        file only once it exists."""
        return self.shared_state or self.state_path.exists()

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


SETTINGS_FILE = "settings.yaml"
"""castiron's own options file in the home (today: the ``state:`` block)."""


def _state_location(text: str, where: str, base: Path) -> str:
    """``text`` checked as a state location; a relative ``sqlite:PATH`` made absolute.

    Raises:
        UsageError: for anything but ``postgresql://``, ``postgres://`` and ``sqlite:PATH``.
    """
    if text.startswith(("postgresql://", "postgres://")):
        return text
    if text.startswith("sqlite:") and text.removeprefix("sqlite:"):
        path = Path(text.removeprefix("sqlite:"))
        return f"sqlite:{path if path.is_absolute() else base / path}"
    shown = text.split("://", 1)[0] + "://..." if "://" in text else text
    raise UsageError(
        f"{where}: {shown!r} is not a state location (use postgresql://USER@HOST/DB or sqlite:PATH)"
    )


def _settings_file(home: Path) -> tuple[str | None, str | None]:
    """The (state, password_env) of ``home/settings.yaml`` (both None without one).

    Raises:
        UsageError: when the file is unreadable or not the documented shape.
    """
    path = home / SETTINGS_FILE
    try:
        if not path.is_file():
            return None, None
    except PermissionError:
        # A home this user may not enter: opening its state says so, in one line.
        return None, None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: cannot read the settings ({exc})") from None
    if data is None:
        return None, None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: must be a mapping")
    unknown = sorted(str(k) for k in data if k != "state")
    if unknown:
        raise UsageError(f"{path}: {unknown[0]}: unknown setting (known: state)")
    block = data.get("state")
    if block is None:
        return None, None
    if isinstance(block, str):
        return _state_location(block, f"{path}: state", home), None
    if not isinstance(block, dict):
        raise UsageError(f"{path}: state: must be a URL or a mapping with url and password_env")
    extra = sorted(str(k) for k in block if k not in ("url", "password_env"))
    if extra:
        raise UsageError(f"{path}: state.{extra[0]}: unknown key (known: url, password_env)")
    url, password_env = block.get("url"), block.get("password_env")
    if not isinstance(url, str):
        raise UsageError(f"{path}: state.url: must be a string")
    if password_env is not None and not isinstance(password_env, str):
        raise UsageError(f"{path}: state.password_env: must be a variable name")
    return _state_location(url, f"{path}: state.url", home), password_env


def load_settings(
    environ: Mapping[str, str],
    *,
    spec_path: Path | None = None,
    home: Path | None = None,
    cwd: Path | None = None,
    state: str | None = None,
    redactor: Redactor | None = None,
) -> Settings:
    """Build settings from flags (explicit arguments win) and the environment.

    Raises:
        UsageError: when the state location (``--state``, ``CASTIRON_STATE`` or the settings
            file) is not one castiron knows.
    """
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
    password_env = None
    if state is not None:
        state = _state_location(state, "--state", base)
    elif environ.get("CASTIRON_STATE"):
        state = _state_location(environ["CASTIRON_STATE"], "CASTIRON_STATE", base)
    else:
        state, password_env = _settings_file(home)
    return Settings(
        home=home,
        spec_path=spec,
        color="NO_COLOR" not in environ and environ.get("TERM") != "dumb",
        actor=actor,
        environ=dict(environ),
        state=state,
        state_password_env=password_env,
        redactor=redactor if redactor is not None else Redactor(),
    )
