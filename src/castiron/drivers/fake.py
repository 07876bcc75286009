"""An in-memory driver for tests of the layers above; passes the same conformance suite.

It runs nothing: instances are records. Tests steer it through its own methods
(:meth:`FakeDriver.kill`, :meth:`FakeDriver.add_stray`, :attr:`FakeDriver.fail_creates`)
instead of monkeypatching.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from castiron.errors import RuntimeDriverError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, InstanceState, Observed


@dataclass
class _Record:
    instance: Instance
    env: dict[str, str]
    command: tuple[str, ...]
    state: str = "running"
    exit_code: int | None = None
    stray: bool = False


@dataclass
class FakeDriver:
    """A driver that keeps instances in memory."""

    name: str = "fake"
    fail_creates: int = 0
    """The next this-many ``create`` calls fail (to test the engine's undo paths)."""
    images: set[Digest] = field(default_factory=set)
    created: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    _records: dict[str, _Record] = field(default_factory=dict)
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000))

    def ensure_image(self, image: ImageRef) -> None:
        self.images.add(image.digest)

    def create(self, spec: InstanceSpec) -> Instance:
        if spec.image.digest not in self.images:
            raise RuntimeDriverError(
                f"{spec.environment}/{spec.id}: image {spec.image.digest} is not available "
                "(ensure_image first)"
            )
        if spec.id in self._records:
            raise RuntimeDriverError(f"{spec.environment}/{spec.id}: instance already exists")
        if self.fail_creates > 0:
            self.fail_creates -= 1
            raise RuntimeDriverError(f"{spec.environment}/{spec.id}: injected create failure")
        port = spec.port or next(self._ports)
        instance = Instance(
            id=spec.id,
            app=spec.app,
            environment=spec.environment,
            release=spec.release,
            runtime=self.name,
            address=f"{spec.host}:{port}",
            handle=f"fake-{spec.id}",
            image=spec.image.digest,
        )
        self._records[spec.id] = _Record(instance, dict(spec.env), spec.command)
        self.created.append(spec.id)
        return instance

    def destroy(self, instance: Instance, grace: float) -> None:
        if self._records.pop(instance.id, None) is not None:
            self.destroyed.append(instance.id)

    def observe(self, app: str, environment: str) -> list[Observed]:
        return [
            self._observed(r)
            for r in self._records.values()
            if r.instance.app == app and r.instance.environment == environment
        ]

    def inspect(self, instance: Instance) -> Observed:
        record = self._records.get(instance.id)
        if record is None:
            return Observed(instance=instance, state="missing", image=None)
        return self._observed(record)

    # --- test controls ---------------------------------------------------------------------

    def kill(self, instance_id: str, exit_code: int = 137) -> None:
        """Make an instance exit, as if it crashed."""
        record = self._records[instance_id]
        record.state, record.exit_code = "exited", exit_code

    def add_stray(self, instance: Instance) -> None:
        """Add an instance the runtime shows but castiron never created."""
        self._records[instance.id] = _Record(instance, {}, (), stray=True)

    def _observed(self, record: _Record) -> Observed:
        state: InstanceState = "running" if record.state == "running" else "exited"
        return Observed(
            instance=replace(record.instance),
            state=state,
            image=record.instance.image,
            config={"env": dict(record.env), "command": list(record.command)},
            stray=record.stray,
            exit_code=record.exit_code,
        )
