"""The cluster connection: the only castiron module that imports the Kubernetes client library.

Owns how castiron talks to an API server: kubeconfig resolution like kubectl (``KUBECONFIG``,
else ``~/.kube/config``, else the in-cluster service account; an optional context), and five
verbs on plain dicts: server-side apply with castiron's field manager, get, list by label
selector, delete, and pod logs. The library is ``lightkube`` (measured: about half the import
time of the official ``kubernetes`` package, see docs/runtime-kubernetes.md); this module is
imported only when a Kubernetes environment is used, never at CLI start-up.

Every library, HTTP and socket error is wrapped at this boundary in a
:class:`~castiron.errors.RuntimeDriverError` (a missing object is ``None`` or ``False``, not an
error); none escapes. It knows nothing of castiron's objects, releases or policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx2 as httpx
import lightkube
from lightkube import codecs
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError, LoadResourceError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret, Service
from lightkube.types import CascadeType

from castiron.errors import RuntimeDriverError

Kind = Literal["Deployment", "Pod", "Service", "Secret", "Event", "Namespace"]

_KINDS: dict[str, Any] = {
    "Deployment": Deployment,
    "Pod": Pod,
    "Service": Service,
    "Secret": Secret,
    "Event": Event,
    "Namespace": Namespace,
}

FIELD_MANAGER = "castiron"

_ERRORS: tuple[type[BaseException], ...] = (
    ApiError,
    ConfigError,
    LoadResourceError,
    httpx.HTTPError,
    OSError,
    ValueError,
    KeyError,
    TypeError,
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.code} {status.reason or ''}: {status.message or ''}".strip(": ")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _code(exc: BaseException) -> int | None:
    if isinstance(exc, ApiError):
        return exc.status.code
    return None


class KubeClient:
    """One API server (a kubeconfig and an optional context), spoken to with plain dicts."""

    def __init__(
        self,
        *,
        kubeconfig: Path | None = None,
        context: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        """Connect lazily: the kubeconfig is read on the first call.

        ``kubeconfig`` None resolves like kubectl: ``$KUBECONFIG`` (given by the caller, who
        captured the environment), ``~/.kube/config``, or the in-cluster service account.
        """
        self._kubeconfig = kubeconfig
        self._context = context
        self._timeout = timeout
        self._client: lightkube.Client | None = None

    @property
    def where(self) -> str:
        """The cluster, for messages."""
        name = str(self._kubeconfig) if self._kubeconfig else "the default kubeconfig"
        return f"{name}{f' (context {self._context})' if self._context else ''}"

    def _api(self) -> lightkube.Client:
        if self._client is None:
            with self._wrapped("read the kubeconfig"):
                if self._kubeconfig is not None:
                    config = KubeConfig.from_file(self._kubeconfig)
                else:
                    config = KubeConfig.from_env()
                single = config.get(context_name=self._context)
                self._client = lightkube.Client(
                    config=single, timeout=httpx.Timeout(self._timeout), field_manager=FIELD_MANAGER
                )
        return self._client

    @contextmanager
    def _wrapped(self, doing: str) -> Iterator[None]:
        try:
            yield
        except RuntimeDriverError:
            raise
        except _ERRORS as exc:
            raise RuntimeDriverError(
                f"kubernetes: cannot {doing} ({self.where}): {_describe(exc)}"
            ) from exc

    def apply(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply ``obj`` (force: castiron owns what it manages); the object as
        the server has it (``dry_run``: as it would have it).

        Raises:
            RuntimeDriverError: when the server refuses or cannot be reached.
        """
        meta = obj.get("metadata", {})
        doing = f"apply {obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name', '')}"
        api = self._api()
        with self._wrapped(doing):
            resource = codecs.from_dict(dict(obj))
            done = api.apply(resource, force=True, dry_run=dry_run)
            return dict(done.to_dict())  # type: ignore[no-untyped-call]

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """``kind`` ``namespace``/``name``; None when it does not exist.

        Raises:
            RuntimeDriverError: when the server cannot be read.
        """
        api = self._api()
        try:
            with self._wrapped(f"read {kind} {namespace}/{name}"):
                if kind == "Namespace":
                    return dict(api.get(_KINDS[kind], name).to_dict())
                return dict(api.get(_KINDS[kind], name, namespace=namespace).to_dict())
        except RuntimeDriverError as exc:
            if _code(exc.__cause__ or exc) == 404:
                return None
            raise

    def find(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every ``kind`` in ``namespace`` carrying all of ``labels``.

        Raises:
            RuntimeDriverError: when the server cannot be read.
        """
        api = self._api()
        with self._wrapped(f"list {kind} in {namespace}"):
            found = api.list(_KINDS[kind], namespace=namespace, labels=dict(labels))
            return [dict(item.to_dict()) for item in found]

    def events(self, namespace: str, involved: str) -> list[dict[str, Any]]:
        """Events of the object named ``involved`` in ``namespace``, oldest first.

        Raises:
            RuntimeDriverError: when the server cannot be read.
        """
        api = self._api()
        with self._wrapped(f"list events in {namespace}"):
            found = api.list(Event, namespace=namespace, fields={"involvedObject.name": involved})
            return [dict(item.to_dict()) for item in found]

    def delete(self, kind: Kind, namespace: str, name: str, *, grace: float | None = None) -> bool:
        """Delete ``kind`` ``namespace``/``name`` (its dependents in the background); False
        when it did not exist.

        Raises:
            RuntimeDriverError: when the server refuses or cannot be reached.
        """
        api = self._api()
        try:
            with self._wrapped(f"delete {kind} {namespace}/{name}"):
                api.delete(
                    _KINDS[kind],
                    name,
                    namespace=namespace,
                    grace_period=None if grace is None else max(0, round(grace)),
                    cascade=CascadeType.BACKGROUND,
                )
                return True
        except RuntimeDriverError as exc:
            if _code(exc.__cause__ or exc) == 404:
                return False
            raise

    def logs(self, namespace: str, pod: str, lines: int, *, follow: bool = False) -> Iterator[str]:
        """The last ``lines`` lines of ``pod``'s output (then more as it comes, ``follow``).

        Raises:
            RuntimeDriverError: when the server cannot be read (404: the pod is gone).
        """
        api = self._api()
        with self._wrapped(f"read the logs of pod {namespace}/{pod}"):
            yield from api.log(pod, namespace=namespace, tail_lines=lines, follow=follow)

    def close(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        if self._client is not None:
            self._client._client.close()  # type: ignore[no-untyped-call]
            self._client = None


def is_not_found(exc: RuntimeDriverError) -> bool:
    """True when ``exc`` wraps the server's 404."""
    return _code(exc.__cause__ or exc) == 404


__all__ = ["FIELD_MANAGER", "Kind", "KubeClient", "is_not_found"]
