"""What every verb of the engine is given: its stores, its drivers, who acts and who listens.

Owns :class:`EngineContext`, a frozen value built once per CLI invocation (or API request) by
the composition root (:mod:`castiron.compose`, through :class:`~castiron.engine.deploy.Engine`)
and passed to the verbs (:mod:`castiron.engine.recovery`, :mod:`castiron.engine.deploy`, …).
The image store and the traffic controller are made on first use (:class:`Lazy`), so read
commands never open the one or reach the host agent for the other.

It must not know the verbs, the spec or how the collaborators are built.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from castiron.drivers.base import Driver
    from castiron.engine.driftwatch import DriftWatches
    from castiron.engine.journal import StepObserver
    from castiron.health import ProbeResult
    from castiron.images.store import ImageStore
    from castiron.model import HealthCheck, Instance
    from castiron.state.base import StateStore
    from castiron.state.locks import LockManager
    from castiron.traffic.controller import TrafficController

T = TypeVar("T")


class Lazy(Generic[T]):
    """A value made by ``make`` on first use and kept; a value given as is (not callable) is
    kept as is."""

    def __init__(self, make: T | Callable[[], T]) -> None:
        self._value: T | None = None
        self._make: Callable[[], T] | None = None
        if callable(make):
            self._make = make
        else:
            self._value = make
        self._lock = threading.Lock()

    def __call__(self) -> T:
        if self._make is not None:
            with self._lock:
                if self._make is not None:
                    self._value = self._make()
                    self._make = None
        assert self._value is not None
        return self._value


@dataclass(frozen=True, eq=False)
class EngineContext:
    """The collaborators of one engine; every verb receives it."""

    store: StateStore
    """The state store."""
    image_store: Lazy[ImageStore]
    """Makes the image store on first use (a warm rollback never reads an image)."""
    driver_for: Callable[[str], Driver]
    """The driver of a runtime (raises ``UsageError`` when it is not available)."""
    traffic_controller: Lazy[TrafficController]
    """Makes the traffic controller on first use."""
    environ: Mapping[str, str]
    """The process environment captured at the edge."""
    observer: StepObserver
    """Hears journal steps and progress lines."""
    os_user: str
    """The OS user acting (an identity, from the uid): its own approvals never count."""
    locks: LockManager
    """Leases the environments' locks."""
    prober: Callable[[HealthCheck, str, Mapping[str, str]], ProbeResult]
    """Probes an instance's health."""
    monotonic: Callable[[], float]
    """The clock durations are measured on."""
    sleep: Callable[[float], None]
    """How the engine waits."""
    instance_logs: Callable[[Instance], str] | None = None
    """The last lines of an instance's output (for a failed health check's message)."""
    drift_watches: Callable[[], DriftWatches] | None = field(default=None)
    """Makes what registers the host agent's drift watches after a deployment, on use
    (None: never)."""

    @property
    def images(self) -> ImageStore:
        """The image store (made on first use)."""
        return self.image_store()

    @property
    def traffic(self) -> TrafficController:
        """The traffic controller (made on first use)."""
        return self.traffic_controller()

    def driver(self, runtime: str) -> Driver:
        """The driver of ``runtime``.

        Raises:
            UsageError: when the runtime is not available.
        """
        return self.driver_for(runtime)


__all__ = ["EngineContext", "Lazy"]
