"""The cluster connection: the only castiron module that imports the Kubernetes client library.

Owns how castiron talks to an API server: kubeconfig resolution like kubectl (the files of
``KUBECONFIG`` merged, the first to set a value winning; else ``~/.kube/config``; else the
in-cluster service account; the environment's context, else the current one), and five verbs
on plain dicts: server-side apply (castiron's field manager, or the scale's), get, list by
label selector, delete, and pod logs. The library is ``lightkube`` (measured: about half the import
time of the official ``kubernetes`` package, see docs/runtime-kubernetes.md); this module is
imported only when a Kubernetes environment is used, never at CLI start-up.

Every library, HTTP and socket error is wrapped at this boundary in a
:class:`~castiron.errors.RuntimeDriverError` (a missing object is ``None`` or ``False``, not an
error); none escapes. It knows nothing of castiron's objects, releases or policy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import lightkube
import yaml
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError, LoadResourceError
from lightkube.generic_resource import GenericNamespacedResource, create_api_info
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Event, Namespace, Pod, Secret, Service
from lightkube.types import CascadeType, PatchType

from castiron.drivers.kubernetes.api import Kind
from castiron.errors import RuntimeDriverError

_TYPED: dict[str, Any] = {
    "Deployment": Deployment,
    "Pod": Pod,
    "Service": Service,
    "Secret": Secret,
    "Event": Event,
    "Namespace": Namespace,
}


def _generic(kind: str) -> Any:
    """A resource class of ``kind`` that carries a plain dict: a partial object (the scale of
    a Deployment) is sent as is, and the answer comes back whole, unknown fields included."""
    typed = _TYPED.get(kind)
    info = (
        typed._api_info
        if typed is not None
        else create_api_info("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes")
    )
    return type(kind, (GenericNamespacedResource,), {"_api_info": info})


_KINDS: dict[str, Any] = {
    **{kind: _generic(kind) for kind in _TYPED if kind != "Namespace"},
    "HTTPRoute": _generic("HTTPRoute"),
    "Namespace": Namespace,
}
"""Every namespaced kind as a plain-dict resource (reads and writes never go through typed
models, which would refuse a partial object and drop fields they do not know)."""

FIELD_MANAGER = "castiron"
DEFAULT_KUBECONFIG = Path("~/.kube/config")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")

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


def merge_kubeconfigs(documents: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Kubeconfig documents merged like kubectl merges the files of ``KUBECONFIG``: a cluster,
    context or user is taken from the first file naming it, and so is ``current-context``.

    Raises:
        ValueError: when a document is not a kubeconfig mapping.
    """
    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": []}
    for document in documents:
        if not isinstance(document, Mapping):
            raise ValueError("a kubeconfig must be a mapping")
        if not merged.get("current-context") and document.get("current-context"):
            merged["current-context"] = document["current-context"]
        for key in ("clusters", "contexts", "users"):
            seen = {item.get("name") for item in merged[key]}
            for item in document.get(key) or []:
                if not isinstance(item, Mapping) or "name" not in item:
                    raise ValueError(f"{key}: every entry needs a name")
                if item["name"] not in seen:
                    merged[key].append(dict(item))
                    seen.add(item["name"])
    return merged


class KubeClient:
    """One API server (a kubeconfig and an optional context), spoken to with plain dicts."""

    def __init__(
        self,
        *,
        kubeconfig: Path | Sequence[Path] | None = None,
        context: str | None = None,
        timeout: float = 30.0,
        in_cluster: Mapping[str, str] | None = None,
    ) -> None:
        """Connect lazily: the kubeconfig is read on the first call.

        ``kubeconfig`` is ``$KUBECONFIG``'s files (given by the caller, who captured the
        environment; several are merged like kubectl does); None resolves like kubectl:
        ``~/.kube/config`` when it exists, else the in-cluster service account, whose API
        server ``in_cluster`` names (``KUBERNETES_SERVICE_HOST`` and ``_PORT``).
        """
        if isinstance(kubeconfig, Path):
            kubeconfig = (kubeconfig,)
        self._kubeconfig: tuple[Path, ...] = tuple(kubeconfig or ())
        self._context = context
        self._timeout = timeout
        self._in_cluster = dict(in_cluster or {})
        self._client: lightkube.Client | None = None

    @property
    def context(self) -> str | None:
        """The kubeconfig context this client speaks to (None: the current one)."""
        return self._context

    @property
    def where(self) -> str:
        """The cluster, for messages."""
        files = ":".join(map(str, self._kubeconfig))
        name = files or "the default kubeconfig"
        return f"{name}{f' (context {self._context})' if self._context else ''}"

    def _config(self) -> KubeConfig:
        files = self._kubeconfig
        if not files:
            default = DEFAULT_KUBECONFIG.expanduser()
            if not default.is_file() and self._in_cluster.get("KUBERNETES_SERVICE_HOST"):
                return _in_cluster_config(self._in_cluster)
            files = (default,)
        documents = []
        for path in files:
            if path.is_file():
                documents.append(yaml.safe_load(path.read_text()) or {})
        if not documents:
            raise ConfigError(f"no kubeconfig file found ({':'.join(map(str, files))})")
        first = next(p for p in files if p.is_file())
        return KubeConfig.from_dict(merge_kubeconfigs(documents), fname=first)

    def _api(self) -> lightkube.Client:
        if self._client is None:
            with self._wrapped("read the kubeconfig"):
                config = self._config()
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
            error = RuntimeDriverError(
                f"kubernetes: cannot {doing} ({self.where}): {_describe(exc)}"
            )
            error.status = _code(exc)
            raise error from exc

    def apply(
        self,
        obj: Mapping[str, Any],
        *,
        dry_run: bool = False,
        field_manager: str = FIELD_MANAGER,
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` as ``field_manager`` (force: castiron owns what it
        manages); the object as the server has it (``dry_run``: as it would have it).

        Raises:
            RuntimeDriverError: when the server refuses or cannot be reached (a 409 when
                ``obj`` names a resourceVersion the object no longer has).
        """
        meta = obj.get("metadata", {})
        doing = f"apply {obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name', '')}"
        api = self._api()
        with self._wrapped(doing):
            resource = _KINDS[str(obj.get("kind"))](dict(obj))
            done = api.apply(resource, force=True, dry_run=dry_run, field_manager=field_manager)
            return dict(done.to_dict())

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
            if exc.status == 404:
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

    def merge_patch(
        self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch of ``kind`` ``namespace``/``name`` as castiron's field manager
        (see :meth:`castiron.drivers.kubernetes.api.KubeApi.merge_patch`).

        Raises:
            RuntimeDriverError: when the server refuses (409: the resourceVersion moved on).
        """
        api = self._api()
        with self._wrapped(f"patch {kind} {namespace}/{name}"):
            done = api.patch(
                _KINDS[kind],
                name,
                dict(patch),
                namespace=namespace,
                patch_type=PatchType.MERGE,
                field_manager=FIELD_MANAGER,
            )
            return dict(done.to_dict())

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
            if exc.status == 404:
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


def _in_cluster_config(environ: Mapping[str, str]) -> KubeConfig:
    """The in-cluster service account's configuration (like kubectl inside a pod)."""
    from lightkube.config.models import Cluster, User

    host = environ["KUBERNETES_SERVICE_HOST"]
    port = environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    token_file = SERVICE_ACCOUNT / "token"
    namespace = SERVICE_ACCOUNT / "namespace"
    return KubeConfig.from_one(
        cluster=Cluster(
            server=f"https://{host}:{port}", certificate_auth=str(SERVICE_ACCOUNT / "ca.crt")
        ),
        user=User(token=token_file.read_text().strip(), token_file=str(token_file)),
        namespace=namespace.read_text().strip() if namespace.is_file() else None,
    )


__all__ = ["FIELD_MANAGER", "KubeClient", "merge_kubeconfigs"]
