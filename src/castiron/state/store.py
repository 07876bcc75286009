"""Opening the state store the settings name: SQLite in the home (the embedded default, or
``sqlite:PATH``) or PostgreSQL (``postgresql://...``, team state shared by every machine).

Owns that choice only; the backends own everything else. psycopg is imported (through
:mod:`castiron.state.postgres`) only when the settings name a PostgreSQL database.
It knows nothing of the CLI and does not read the environment (the settings carry it).
"""

from __future__ import annotations

from pathlib import Path

from castiron.settings import Settings
from castiron.state.base import Clock
from castiron.state.sqlite import SqlStateStore
from castiron.state.sqlite import open_state as open_sqlite


def describe_location(settings: Settings) -> str:
    """Where the settings' state lives, for people (a PostgreSQL password shown as ``***``)."""
    if settings.shared_state and settings.state is not None:
        from castiron.state.postgres import redact_url

        return redact_url(settings.state)
    return f"sqlite:{settings.state_path}"


def open_state(
    settings: Settings,
    *,
    actor: str | None = None,
    key_path: Path | None = None,
    clock: Clock | None = None,
) -> SqlStateStore:
    """Open (creating or migrating when needed) the state store the settings name; it masks
    the settings' redactor's values (and a PostgreSQL password) in every text it writes.

    Raises:
        StateError: when it cannot be reached or opened (one line naming why).
        StateCorruptError: when it is not castiron's or is damaged.
        SchemaTooNewError: when a newer castiron migrated it.
    """
    who = actor if actor is not None else settings.actor
    key = key_path if key_path is not None else settings.audit_key_path
    if settings.shared_state and settings.state is not None:
        from castiron.state.postgres import open_postgres

        password = None
        if settings.state_password_env:
            password = settings.environ.get(settings.state_password_env) or None
        return open_postgres(
            settings.state,
            actor=who,
            key_path=key,
            clock=clock,
            password=password,
            redactor=settings.redactor,
        )
    return open_sqlite(
        settings.state_path, actor=who, key_path=key, clock=clock, redactor=settings.redactor
    )


__all__ = ["describe_location", "open_state"]
