"""What the Kubernetes driver needs of an API server: one small protocol on plain dicts.

Owns the :class:`KubeApi` protocol that :class:`~castiron.drivers.kubernetes.client.KubeClient`
(the real API server, through the client library) and
:class:`~castiron.drivers.kubernetes.fake.FakeCluster` (in memory, for tests) both implement,
and the status codes the driver acts on. It imports no client library and knows no castiron
object beyond the error it raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, Protocol

Kind = Literal["Deployment", "Pod", "Service", "Secret", "Event", "Namespace", "HTTPRoute"]
"""The kinds castiron reads or writes (``HTTPRoute``: the Gateway API, when named)."""

NOT_FOUND = 404
CONFLICT = 409
"""The object changed since it was read (a resourceVersion precondition failed)."""


class KubeApi(Protocol):
    """One API server (a kubeconfig context), spoken to with plain dicts. Every method
    raises :class:`~castiron.errors.RuntimeDriverError` (with the server's ``status`` when it
    answered one) and nothing else."""

    @property
    def context(self) -> str | None:
        """The kubeconfig context (None: the current one)."""
        ...

    def apply(
        self,
        obj: Mapping[str, Any],
        *,
        dry_run: bool = False,
        field_manager: str = "castiron",
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` as ``field_manager``, forcing conflicts; the object as
        the server has it (``dry_run``: would have it)."""
        ...

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """``kind`` ``namespace``/``name``; None when it does not exist."""
        ...

    def find(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every ``kind`` in ``namespace`` carrying all of ``labels``."""
        ...

    def events(self, namespace: str, involved: str) -> list[dict[str, Any]]:
        """Events of the object named ``involved``, oldest first."""
        ...

    def merge_patch(
        self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch (RFC 7386: ``None`` removes a key, a list replaces the list) as
        castiron's field manager; the object as the server has it. A ``resourceVersion`` in
        the patch's metadata makes it fail with 409 if the object changed since."""
        ...

    def delete(self, kind: Kind, namespace: str, name: str, *, grace: float | None = None) -> bool:
        """Delete ``kind`` ``namespace``/``name``; False when it did not exist."""
        ...

    def logs(self, namespace: str, pod: str, lines: int, *, follow: bool = False) -> Iterator[str]:
        """The last ``lines`` lines of ``pod``'s output."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


__all__ = ["CONFLICT", "NOT_FOUND", "Kind", "KubeApi"]
