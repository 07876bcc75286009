"""What the engine's verbs need of an engine: its stores, its drivers, who acts and who listens.

Owns :class:`EngineContext`, the protocol :class:`~castiron.engine.deploy.Engine` satisfies.
Modules the engine itself calls (the policy gates, the runtimes' stray sweep) take this
protocol instead of the ``Engine`` class, so they never import the module that imports them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from castiron.drivers.base import Driver
    from castiron.engine.journal import StepObserver
    from castiron.images.store import ImageStore
    from castiron.state.base import StateStore


class EngineContext(Protocol):
    """The collaborators of one engine (see :class:`castiron.engine.deploy.Engine`)."""

    @property
    def store(self) -> StateStore:
        """The state store."""

    @property
    def images(self) -> ImageStore:
        """The image store."""

    @property
    def environ(self) -> Mapping[str, str]:
        """The process environment captured at the edge."""

    @property
    def observer(self) -> StepObserver:
        """Hears journal steps and progress lines."""

    @property
    def os_user(self) -> str:
        """The OS user acting (an identity, from the uid)."""

    def driver(self, runtime: str) -> Driver:
        """The driver of ``runtime``.

        Raises:
            UsageError: when the runtime is not available.
        """


__all__ = ["EngineContext"]
