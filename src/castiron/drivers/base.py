"""The runtime driver protocol: create, destroy, observe, inspect — and nothing else.

There is deliberately no update, exec or patch: an instance is never modified after it is
created (invariant 1). A driver sees only model values (:class:`InstanceSpec`,
:class:`ImageRef`), never the spec, and decides no policy (no retries, no replacement, no
health judgement): the engine does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from castiron.model import ImageRef, Instance, InstanceSpec, Observed
from castiron.values import value

MUTATING_VERBS = ("update", "exec", "patch", "restart", "modify", "set")
"""Verbs a driver must never offer (a conformance test checks every driver)."""


class Driver(Protocol):
    """One runtime (local processes, Docker, ...)."""

    name: str

    def ensure_image(self, image: ImageRef) -> None:
        """Make ``image`` available to the runtime (load, unpack). Idempotent.

        Raises:
            RuntimeDriverError: when the image cannot be made available.
            DigestMismatchError: when what the runtime holds is not ``image``.
        """
        ...

    def create(self, spec: InstanceSpec) -> Instance:
        """Create and start a NEW instance; returns it with its address.

        Raises:
            RuntimeDriverError: when the runtime cannot create it (naming env and instance).
        """
        ...

    def destroy(self, instance: Instance, grace: float) -> None:
        """Stop ``instance`` (SIGTERM, then SIGKILL after ``grace`` s) and remove it.

        Destroying an instance that is already gone is not an error.
        """
        ...

    def observe(self, app: str, environment: str) -> list[Observed]:
        """Everything of ``app``/``environment`` the runtime shows, strays included."""
        ...

    def inspect(self, instance: Instance) -> Observed:
        """What runs for ``instance`` (state ``missing`` when it is gone)."""
        ...


@runtime_checkable
class LogSource(Protocol):
    """A driver that reads its instances' output itself (the agent keeps the local runtime's);
    reading never changes an instance."""

    def logs(self, instance: Instance, lines: int) -> str:
        """The last ``lines`` lines of ``instance``'s stdout and stderr.

        Raises:
            NotFoundError: when the instance is gone.
            RuntimeDriverError: when the runtime cannot be read.
        """
        ...

    def follow_logs(self, instance: Instance, lines: int) -> Iterator[bytes]:
        """The last ``lines`` lines, then new output as it comes, until the instance stops.

        Raises:
            NotFoundError: when the instance is gone.
            RuntimeDriverError: when the runtime cannot be read.
        """
        ...


@runtime_checkable
class ReadinessSource(Protocol):
    """A driver whose runtime judges readiness itself (Kubernetes: the kubelet runs the
    probes derived from the release's health check); its instances' addresses are not
    reachable from castiron's host, so the engine asks the driver instead of probing."""

    def readiness(self, address: str) -> tuple[bool, str]:
        """Whether the instance at ``address`` is ready, and a one-line detail.

        Raises:
            RuntimeDriverError: when the runtime cannot be read.
        """
        ...


@value
class UnitHealth:
    """How the runtime sees one unit running a release's instances (a pod), as its own
    supervisor judges it."""

    unit: str
    """The runtime's name of the unit (the pod's name)."""
    ready: bool
    """Whether the runtime counts it ready (the kubelet's readiness probe passed)."""
    restarts: int
    """Times the runtime restarted its processes since the unit was created."""
    detail: str = ""
    """Why it is not ready, or how it last stopped (one line)."""


@runtime_checkable
class UnitHealthSource(Protocol):
    """A driver whose runtime restarts instances' processes by itself (Kubernetes: the kubelet
    restarts a container that exits or fails its liveness probe), so a restart never shows as
    a failed probe unless the runtime is asked; reading never changes an instance."""

    def unit_health(self, instances: Sequence[Instance]) -> list[UnitHealth]:
        """The units that run ``instances`` (every unit of their releases), each once.

        Raises:
            RuntimeDriverError: when the runtime cannot be read.
        """
        ...
