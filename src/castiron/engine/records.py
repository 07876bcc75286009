"""What the records say of an environment: the release it serves, a recorded release, the
instances in service.

Owns these reads of the state store (the engine's verbs share them). It changes nothing and
must not know drivers, traffic or the spec.
"""

from __future__ import annotations

from castiron.engine.release import Release, release_from_json
from castiron.errors import NotFoundError
from castiron.model import ReleaseId
from castiron.state.base import InstanceRow, StateStore


def load_release(store: StateStore, release_id: str) -> Release:
    """A recorded release.

    Raises:
        NotFoundError: when it is not recorded.
    """
    row = store.get_release(ReleaseId(release_id))
    if row is None:
        raise NotFoundError(f"no release {release_id} in the state store")
    return release_from_json({"id": row.id, "digest": row.digest, "config": row.config})


def current_release(store: StateStore, environment: str) -> Release | None:
    """The release the environment serves, as recorded (None before the first deploy)."""
    row = store.get_environment(environment)
    if row is None or row.current_release is None:
        return None
    return load_release(store, row.current_release)


def in_service(store: StateStore, environment: str) -> list[InstanceRow]:
    """Recorded instances of ``environment`` that serve (or are about to)."""
    return [r for r in store.list_instances(environment) if r.status == "running"]


__all__ = ["current_release", "in_service", "load_release"]
