"""The Kubernetes runtime driver: an instance is the pod of a one-replica Deployment.

Owns how an :class:`~castiron.model.InstanceSpec` becomes cluster objects and how they are read
back for status, readiness, strays and drift:

* :meth:`KubernetesDriver.create` applies (server-side, castiron's field manager) the
  instance's Secret when it has secrets, then its Deployment (both built by
  :mod:`~castiron.drivers.kubernetes.manifests`); it refuses an id that exists. Nothing is
  ever patched afterwards: :meth:`~KubernetesDriver.destroy` deletes both;
* the instance's address is ``k8s://NAMESPACE/NAME:PORT``: pods are reached through the
  environment's Service, never from the host, and readiness is the kubelet's verdict
  (:meth:`KubernetesDriver.readiness`), from the probes the manifest derived from the
  release's health check;
* :meth:`~KubernetesDriver.observe` reconstructs instances from the cluster's labels, so a
  second machine sees the truth; an object without castiron's managed-by label is never
  touched (it is shown as a stray only when it claims the app and environment).

The client library is reached only through :class:`~castiron.drivers.kubernetes.client.KubeClient`
(injected as a factory, so building a driver costs no import). It knows nothing of the spec,
the engine, the state store or traffic, and decides no policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from castiron.drivers.kubernetes.manifests import (
    ANNOTATION_CONFIG,
    ANNOTATION_IMAGE,
    ANNOTATION_PORT,
    ANNOTATION_SECRETS,
    CONTAINER,
    LABEL_ENVIRONMENT,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    LABEL_RELEASE,
    LOADED_REPOSITORY,
    MANAGER,
    KubernetesOptions,
    deployment,
    pod_port,
    secret,
    secret_name,
)
from castiron.errors import NotFoundError, RuntimeDriverError
from castiron.model import (
    Digest,
    ImageRef,
    Instance,
    InstanceSpec,
    InstanceState,
    Observed,
    ReleaseId,
)

if TYPE_CHECKING:
    from castiron.drivers.kubernetes.client import KubeClient

ADDRESS_PREFIX = "k8s://"
"""Addresses of pods: ``k8s://NAMESPACE/NAME:PORT`` (reached through the Service only)."""

ImageLoader = Callable[[ImageRef], None]
"""Makes an image available to the cluster's nodes (the engine's choice: a push to the
registry the nodes pull from, or a load into the node's container engine)."""


def address_of(namespace: str, name: str, port: int) -> str:
    """The address castiron records for the pod of instance ``name``."""
    return f"{ADDRESS_PREFIX}{namespace}/{name}:{port}"


def parse_address(address: str) -> tuple[str, str] | None:
    """(namespace, instance) of a pod address; None for any other address."""
    if not address.startswith(ADDRESS_PREFIX):
        return None
    rest = address[len(ADDRESS_PREFIX) :].rpartition(":")[0]
    namespace, _, name = rest.partition("/")
    return (namespace, name) if namespace and name else None


@dataclass
class KubernetesDriver:
    """Instances as pods of one-replica Deployments on one cluster."""

    client: Callable[[KubernetesOptions], KubeClient]
    """The API server of an environment's options (its context)."""
    options: Mapping[str, KubernetesOptions] = field(default_factory=dict)
    """Options by environment; an environment not in it gets the defaults."""
    load: ImageLoader | None = None
    """How images reach the nodes (None: they pull from the registry by digest)."""
    name: str = "kubernetes"
    readiness_ttl: float = 0.25
    """Seconds a readiness answer is reused: the engine polls briskly until an instance first
    answers, and the kubelet itself probes at most once a second."""
    clock: Callable[[], float] = time.monotonic
    _ready: dict[str, tuple[float, tuple[bool, str]]] = field(default_factory=dict, repr=False)

    def options_for(self, environment: str) -> KubernetesOptions:
        """The options of ``environment`` (the defaults when it has none)."""
        try:
            return self.options[environment]
        except KeyError:
            return KubernetesOptions()

    def ensure_image(self, image: ImageRef) -> None:
        if self.load is not None:
            self.load(image)

    def create(self, spec: InstanceSpec) -> Instance:
        options = self.options_for(spec.environment)
        api = self.client(options)
        where = f"{spec.environment}/{spec.id}"
        if api.get("Deployment", options.namespace, spec.id) is not None:
            raise RuntimeDriverError(f"{where}: instance {spec.id} exists already")
        built = deployment(spec, options)  # validates before anything is sent
        holder = secret(spec, options)
        try:
            if holder is not None:
                api.apply(holder)
            api.apply(built)
        except RuntimeDriverError as exc:
            raise RuntimeDriverError(f"{where}: {exc}") from exc.__cause__
        return Instance(
            id=spec.id,
            app=spec.app,
            environment=spec.environment,
            release=spec.release,
            runtime=self.name,
            address=address_of(options.namespace, spec.id, pod_port(spec)),
            handle=f"{options.namespace}/{spec.id}",
            image=spec.image.digest,
        )

    def destroy(self, instance: Instance, grace: float) -> None:
        options = self.options_for(instance.environment)
        namespace = _namespace(instance, options)
        api = self.client(options)
        found = api.get("Deployment", namespace, instance.id)
        if found is not None and not _ours(found):
            raise RuntimeDriverError(
                f"{instance.environment}/{instance.id}: Deployment {namespace}/{instance.id} "
                "was not created by castiron; leaving it alone"
            )
        api.delete("Deployment", namespace, instance.id, grace=grace)
        api.delete("Secret", namespace, secret_name(instance.id))

    def down(self, app: str, environment: str, grace: float = 10.0) -> list[str]:
        """Delete every Deployment and Secret castiron made for ``app``/``environment`` and
        the environment's Service; returns the instance ids removed."""
        options = self.options_for(environment)
        api = self.client(options)
        wanted = _labels(app, environment)
        removed: list[str] = []
        for obj in api.find("Deployment", options.namespace, wanted):
            name = str(obj["metadata"]["name"])
            api.delete("Deployment", options.namespace, name, grace=grace)
            removed.append(str(_meta_labels(obj).get(LABEL_INSTANCE) or name))
        for obj in api.find("Secret", options.namespace, wanted):
            api.delete("Secret", options.namespace, str(obj["metadata"]["name"]))
        service = api.get("Service", options.namespace, options.service_for(app, environment))
        if service is not None and _ours(service):
            api.delete("Service", options.namespace, options.service_for(app, environment))
        return removed

    def observe(self, app: str, environment: str) -> list[Observed]:
        options = self.options_for(environment)
        api = self.client(options)
        pods = _pods_by_instance(api.find("Pod", options.namespace, _labels(app, environment)))
        out = [
            self._observed(obj, pods.get(str(obj["metadata"]["name"]), []), options)
            for obj in api.find("Deployment", options.namespace, _labels(app, environment))
        ]
        return sorted(out, key=lambda o: o.instance.id)

    def strays(
        self,
        app: str,
        environment: str,
        known_ids: Collection[str],
        release_images: Collection[ImageRef],
    ) -> list[Observed]:
        """Deployments of ``app``/``environment`` castiron's records do not know, and ones
        claiming them (name and environment labels) that castiron did not create."""
        options = self.options_for(environment)
        api = self.client(options)
        claimed = {LABEL_NAME: app, LABEL_ENVIRONMENT: environment}
        out: list[Observed] = []
        for obj in api.find("Deployment", options.namespace, claimed):
            observed = self._observed(obj, [], options)
            if observed.stray or observed.instance.id not in known_ids:
                out.append(observed)
        return out

    def inspect(self, instance: Instance) -> Observed:
        options = self.options_for(instance.environment)
        namespace = _namespace(instance, options)
        api = self.client(options)
        found = api.get("Deployment", namespace, instance.id)
        if found is None:
            return Observed(instance=instance, state="missing", image=None)
        pods = api.find("Pod", namespace, {LABEL_INSTANCE: instance.id})
        return self._observed(found, pods, options)

    def readiness(self, address: str) -> tuple[bool, str]:
        """Whether the pod at ``address`` is Ready (the kubelet ran its probes), and why not.

        Raises:
            RuntimeDriverError: when the cluster cannot be read.
        """
        parsed = parse_address(address)
        if parsed is None:
            return False, f"{address}: not a pod address"
        now = self.clock()
        cached = self._ready.get(address)
        if cached is not None and now - cached[0] < self.readiness_ttl:
            return cached[1]
        answer = self._readiness(*parsed)
        self._ready[address] = (now, answer)
        return answer

    def _readiness(self, namespace: str, name: str) -> tuple[bool, str]:
        pods = self.client(KubernetesOptions(namespace=namespace)).find(
            "Pod", namespace, {LABEL_INSTANCE: name}
        )
        if not pods:
            return False, "no pod yet"
        detail = "not ready"
        for pod in pods:
            if _pod_ready(pod):
                return True, f"pod {pod['metadata']['name']} is Ready"
            detail = _waiting_reason(pod) or detail
        return False, detail

    def _by_handle(self, instance: Instance) -> tuple[KubeClient, str]:
        """The client and namespace of ``instance`` from its handle alone (reading its
        environment's options may need the state store, which a reader may have closed)."""
        namespace = _namespace(instance, KubernetesOptions())
        return self.client(KubernetesOptions(namespace=namespace)), namespace

    def logs(self, instance: Instance, lines: int) -> str:
        api, namespace = self._by_handle(instance)
        pods = api.find("Pod", namespace, {LABEL_INSTANCE: instance.id})
        if not pods:
            raise NotFoundError(f"{instance.environment}/{instance.id}: no pod")
        pod = str(pods[0]["metadata"]["name"])
        try:
            return "".join(api.logs(namespace, pod, lines))
        except RuntimeDriverError:
            events = api.events(namespace, pod)
            return "".join(f"event: {e.get('reason')}: {e.get('message')}\n" for e in events)

    def follow_logs(self, instance: Instance, lines: int) -> Iterator[bytes]:
        api, namespace = self._by_handle(instance)
        pods = api.find("Pod", namespace, {LABEL_INSTANCE: instance.id})
        if not pods:
            raise NotFoundError(f"{instance.environment}/{instance.id}: no pod")
        for line in api.logs(namespace, str(pods[0]["metadata"]["name"]), lines, follow=True):
            yield line.encode()

    def _observed(
        self, obj: Mapping[str, Any], pods: list[dict[str, Any]], options: KubernetesOptions
    ) -> Observed:
        meta: Mapping[str, Any] = obj.get("metadata") or {}
        labels = _meta_labels(obj)
        annotations: Mapping[str, str] = meta.get("annotations") or {}
        name = str(meta.get("name", ""))
        namespace = str(meta.get("namespace") or options.namespace)
        spec: Mapping[str, Any] = obj.get("spec") or {}
        template: Mapping[str, Any] = (spec.get("template") or {}).get("spec") or {}
        containers = template.get("containers") or []
        container: Mapping[str, Any] = next(
            (c for c in containers if c.get("name") == CONTAINER),
            containers[0] if containers else {},
        )
        secrets = sorted(s for s in annotations.get(ANNOTATION_SECRETS, "").split(",") if s)
        env: dict[str, str] = {}
        for item in container.get("env") or []:
            if item.get("name") in secrets or "value" not in item:
                continue
            env[str(item["name"])] = str(item.get("value") or "")
        port_text = annotations.get(ANNOTATION_PORT, "")
        port = int(port_text) if port_text.isdigit() else 0
        manifest = annotations.get(ANNOTATION_IMAGE, "")
        configured = str(container.get("image") or "")
        expected = {annotations.get(ANNOTATION_CONFIG, ""), manifest}
        pinned = configured.rpartition("@")[2] if "@" in configured else configured
        config_digest = annotations.get(ANNOTATION_CONFIG, "")
        loaded = f"{LOADED_REPOSITORY}:{config_digest.removeprefix('sha256:')}"
        same = bool(manifest) and (
            configured in expected or pinned in expected or configured == loaded
        )
        image: Digest | None = (
            Digest(manifest) if same else (Digest(configured) if configured else None)
        )
        state = _state(obj, pods)
        status: Mapping[str, Any] = obj.get("status") or {}
        security: Mapping[str, Any] = container.get("securityContext") or {}
        config: dict[str, object] = {
            "env": env,
            "secrets": secrets,
            "command": list(container.get("command") or []),
            "workdir": container.get("workingDir"),
            "port": port,
            "image_ref": configured,
            "replicas": spec.get("replicas"),
            "ready_replicas": status.get("readyReplicas") or 0,
            "pods": sorted(str(p["metadata"]["name"]) for p in pods),
            # castiron's labels under the names every runtime reports them by (drift).
            "labels": {
                "castiron.app": labels.get(LABEL_NAME, ""),
                "castiron.environment": labels.get(LABEL_ENVIRONMENT, ""),
                "castiron.release": labels.get(LABEL_RELEASE, ""),
                "castiron.image": manifest,
                "castiron.instance": labels.get(LABEL_INSTANCE, ""),
            },
            "kubernetes_labels": dict(labels),
            "read_only": bool(security.get("readOnlyRootFilesystem")),
            "cap_drop": list((security.get("capabilities") or {}).get("drop") or []),
            "deployment": f"{namespace}/{name}",
        }
        release = labels.get(LABEL_RELEASE, "")
        instance = Instance(
            id=labels.get(LABEL_INSTANCE) or name,
            app=labels.get(LABEL_NAME, ""),
            environment=labels.get(LABEL_ENVIRONMENT, ""),
            release=ReleaseId(release),
            runtime=self.name,
            address=address_of(namespace, name, port),
            handle=f"{namespace}/{name}",
            image=Digest(manifest or configured),
        )
        stray = not (_ours(obj) and labels.get(LABEL_INSTANCE) and release and manifest)
        exit_code = _exit_code(pods) if state == "exited" else None
        return Observed(
            instance=instance,
            state=state,
            image=image,
            config=config,
            stray=stray,
            exit_code=exit_code,
        )


# --- helpers ---------------------------------------------------------------------------------


def _labels(app: str, environment: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGER, LABEL_NAME: app, LABEL_ENVIRONMENT: environment}


def _meta_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _ours(obj: Mapping[str, Any]) -> bool:
    return bool(_meta_labels(obj).get(LABEL_MANAGED_BY) == MANAGER)


def _namespace(instance: Instance, options: KubernetesOptions) -> str:
    namespace, _, name = instance.handle.partition("/")
    return namespace if name else options.namespace


def _pods_by_instance(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        instance = _meta_labels(pod).get(LABEL_INSTANCE)
        if instance:
            out.setdefault(instance, []).append(pod)
    return out


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((pod.get("status") or {}).get("containerStatuses") or [])


def _waiting_reason(pod: Mapping[str, Any]) -> str:
    for status in _container_statuses(pod):
        state = status.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason"):
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
        terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated")
        if terminated:
            return f"exited with status {terminated.get('exitCode')}"
    return ""


_FAILED_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImageNeverPull",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def _state(obj: Mapping[str, Any], pods: list[dict[str, Any]]) -> InstanceState:
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    if not live:
        return "starting"
    for pod in live:
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Failed", "Succeeded"):
            return "exited"
        for status in _container_statuses(pod):
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _FAILED_WAITING:
                return "exited"
        if phase == "Running":
            return "running"
    return "starting"


def _exit_code(pods: list[dict[str, Any]]) -> int | None:
    for pod in pods:
        for status in _container_statuses(pod):
            for key in ("state", "lastState"):
                terminated = (status.get(key) or {}).get("terminated") or {}
                code = terminated.get("exitCode")
                if isinstance(code, int):
                    return code
    return None


__all__ = [
    "ADDRESS_PREFIX",
    "ImageLoader",
    "KubernetesDriver",
    "address_of",
    "parse_address",
]
