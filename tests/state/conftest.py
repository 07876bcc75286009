"""Fixtures for the state conformance suite: one store per backend, on real files.

Every backend (SQLite, and PostgreSQL on the session's own server) must pass the same tests,
so tests ask for ``open_store`` and never name a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from castiron.state.base import AuditDraft, ManualClock, StateStore
from castiron.state.sqlite import open_state

OpenStore = Callable[..., StateStore]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    """The state backend under test."""
    return str(request.param)


@pytest.fixture
def open_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OpenStore]:
    """Open a store of the backend in ``tmp_path/home`` (closed after the test)."""
    opened: list[StateStore] = []

    def _open(**kwargs: Any) -> StateStore:
        kwargs.setdefault("actor", "tester@testhost")
        if backend == "sqlite":
            store = open_state(tmp_path / "home" / "state.db", **kwargs)
        else:
            from castiron.state.postgres import open_postgres

            kwargs.setdefault("key_path", tmp_path / "home" / "audit.key")
            store = open_postgres(request.getfixturevalue("postgres_url"), **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def clock() -> ManualClock:
    """A clock that only moves when the test says so."""
    return ManualClock()


@pytest.fixture
def store(open_store: OpenStore, clock: ManualClock) -> StateStore:
    """A fresh store on the manual clock."""
    return open_store(clock=clock)


def append(store: StateStore, count: int, environment: str = "staging") -> None:
    """Append ``count`` harmless audited mutations (events)."""
    from castiron.state.base import EventRow

    for i in range(count):
        store.mutate(
            AuditDraft(
                "test.event",
                environment=environment,
                subject=f"event-{i}",
                from_=f"r{i}",
                to=f"r{i + 1}",
                details={"i": i, "text": 'héllo "wörld"\n'},
            ),
            lambda tx, i=i: tx.add_event(
                EventRow(store.clock.now(), environment, "test", f"event {i}")
            ),
        )
