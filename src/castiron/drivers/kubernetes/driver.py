"""The Kubernetes runtime driver: one Deployment per release, whose pods are its instances.

Owns how an :class:`~castiron.model.InstanceSpec` becomes cluster objects and how they are read
back for status, readiness, strays and drift, keeping the driver protocol (create, destroy,
observe, inspect of instances) so the engine does not know a Deployment runs several:

* :meth:`KubernetesDriver.create` applies (server-side, castiron's field manager) the
  release's Secret when it has secrets, then the release's Deployment ``APP-ENV-<release>``
  (both built by :mod:`~castiron.drivers.kubernetes.manifests`), then scales it up by one:
  the instance's id joins the annotation listing the wanted instances and ``replicas`` is
  their number, applied by a field manager of its own with the resourceVersion just read (a
  concurrent change is read again, never overwritten). It refuses an id that exists;
* :meth:`~KubernetesDriver.destroy` scales the Deployment down by one (Kubernetes picks the
  pod: not-ready ones first) and deletes it, with its Secret, when no instance is left. No pod
  is ever patched; the Deployment's pod template changes only when drift is fixed, and then
  its pods are replaced one by one (``maxUnavailable`` 0);
* an instance's address is ``k8s://NAMESPACE/DEPLOYMENT/INSTANCE:PORT`` (stable for the
  instance's life: pods are reached through a Service, never from the host). The k-th wanted
  instance is the k-th pod of the Deployment's current template, ready pods first, then by
  age: instances are interchangeable, so readiness (:meth:`KubernetesDriver.readiness`, the
  kubelet's verdict from the probes derived from the health check) is "are k+1 pods ready";
* :meth:`~KubernetesDriver.observe` reconstructs instances from the cluster's labels and
  annotations, so a second machine sees the truth; an object without castiron's managed-by
  label is never touched (it is shown as a stray only when it claims the app and
  environment). Deployments of earlier versions (one per instance, ``castiron.dev/instance``
  label, address ``k8s://NAMESPACE/NAME:PORT``) are read and destroyed the same way.

Every call goes to the API server of the environment's kubeconfig context: the client comes
from the environment's options; a bare address is resolved to the options of the instance
that produced it (or of an environment in its namespace). The API server is reached only
through the :class:`~castiron.drivers.kubernetes.api.KubeApi` protocol (injected as a factory:
the client library's :class:`~castiron.drivers.kubernetes.client.KubeClient`, or the in-memory
:class:`~castiron.drivers.kubernetes.fake.FakeCluster`; building a driver costs no import).
It knows nothing of the spec, the engine, the state store or traffic, and decides no policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from castiron.drivers.base import UnitHealth
from castiron.drivers.kubernetes.api import CONFLICT, Kind, KubeApi
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
    SCALE_MANAGER,
    KubernetesOptions,
    deployment,
    pod_port,
    release_name,
    scale,
    secret,
    secret_name,
    wanted_instances,
)
from castiron.errors import CastironError, NotFoundError, RuntimeDriverError
from castiron.model import (
    Digest,
    ImageRef,
    Instance,
    InstanceSpec,
    InstanceState,
    Observed,
    ReleaseId,
)
from castiron.values import value

ADDRESS_PREFIX = "k8s://"
"""Addresses of instances: ``k8s://NAMESPACE/DEPLOYMENT/INSTANCE:PORT`` (reached through a
Service only)."""

ImageLoader = Callable[[ImageRef], None]
"""Makes an image available to the cluster's nodes (the engine's choice: a push to the
registry the nodes pull from, or a load into the node's container engine)."""

SCALE_ATTEMPTS = 5
"""Times a scale is read and applied again when the Deployment changed in between (409)."""


def address_of(namespace: str, deployment_name: str, instance: str, port: int) -> str:
    """The address castiron records for ``instance`` of the Deployment ``deployment_name``."""
    return f"{ADDRESS_PREFIX}{namespace}/{deployment_name}/{instance}:{port}"


def parse_address(address: str) -> tuple[str, str, str] | None:
    """(namespace, Deployment, instance) of an instance address; None for any other address.
    An address of an earlier version (``k8s://NAMESPACE/NAME:PORT``) names a Deployment of
    one instance, both called NAME."""
    if not address.startswith(ADDRESS_PREFIX):
        return None
    rest = address[len(ADDRESS_PREFIX) :].rpartition(":")[0]
    parts = rest.split("/")
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1], parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    return None


@dataclass
class _Release:
    """One read of a release's Deployment and its pods (for readiness polls)."""

    at: float
    obj: dict[str, Any] | None
    pods: list[dict[str, Any]]


@dataclass
class KubernetesDriver:
    """Instances as pods of one Deployment per release, on the cluster of each environment's
    kubeconfig context."""

    client: Callable[[KubernetesOptions], KubeApi]
    """The API server of an environment's options (its context)."""
    options: Mapping[str, KubernetesOptions] = field(default_factory=dict)
    """Options by environment; an environment not in it gets the defaults."""
    load: ImageLoader | None = None
    """How images reach the nodes (None: they pull from the registry by digest)."""
    name: str = "kubernetes"
    readiness_ttl: float = 0.25
    """Seconds a read of a release's pods is reused for readiness: the engine polls briskly
    until an instance first answers, and the kubelet itself probes at most once a second."""
    clock: Callable[[], float] = time.monotonic
    _releases: dict[str, _Release] = field(default_factory=dict, repr=False)
    _where: dict[str, KubernetesOptions] = field(default_factory=dict, repr=False)
    """Options by ``NAMESPACE/DEPLOYMENT`` seen in this process (the context of an address)."""

    def options_for(self, environment: str) -> KubernetesOptions:
        """The options of ``environment`` (the defaults when it has none)."""
        try:
            return self.options[environment]
        except KeyError:
            return KubernetesOptions()

    def _options_at(self, namespace: str, deployment_name: str) -> KubernetesOptions:
        """The options (above all the context) of the Deployment ``namespace/deployment_name``:
        as last seen, else those of the environments in that namespace when they agree on the
        context, else the current context's."""
        known = self._where.get(f"{namespace}/{deployment_name}")
        if known is not None:
            return known
        contexts: set[str | None] = set()
        try:
            for environment in list(self.options):
                found = self.options.get(environment)
                if found is not None and found.namespace == namespace:
                    contexts.add(found.context)
        except CastironError:  # the options' store cannot be read: the current context
            contexts = set()
        context = contexts.pop() if len(contexts) == 1 else None
        return KubernetesOptions(namespace=namespace, context=context)

    def _client_at(self, instance: Instance) -> tuple[KubeApi, str, str]:
        """The client, namespace and Deployment name of ``instance``, from its handle."""
        namespace, deployment_name = _handle(instance)
        if not namespace:
            options = self.options_for(instance.environment)
            namespace = options.namespace
        else:
            options = self._options_at(namespace, deployment_name)
        return self.client(options), namespace, deployment_name

    def ensure_image(self, image: ImageRef) -> None:
        if self.load is not None:
            self.load(image)

    # --- create / destroy ------------------------------------------------------------------

    def create(self, spec: InstanceSpec) -> Instance:
        options = self.options_for(spec.environment)
        api = self.client(options)
        namespace = options.namespace
        name = release_name(spec.app, spec.environment, spec.release)
        where = f"{spec.environment}/{spec.id}"
        found = api.get("Deployment", namespace, name)
        if found is not None and not _ours(found):
            raise RuntimeDriverError(
                f"{where}: Deployment {namespace}/{name} was not created by castiron; "
                "leaving it alone"
            )
        if found is not None and spec.id in _wanted(found):
            raise RuntimeDriverError(f"{where}: instance {spec.id} exists already")
        built = deployment(spec, options)  # validates before anything is sent
        holder = secret(spec, options)
        self._where[f"{namespace}/{name}"] = options
        try:
            if holder is not None:
                api.apply(holder)
            applied = api.apply(built)
            self._scale(api, namespace, name, add=spec.id, read=applied)
        except RuntimeDriverError as exc:
            raise RuntimeDriverError(f"{where}: {exc}") from exc.__cause__
        self._releases.pop(f"{namespace}/{name}", None)
        return Instance(
            id=spec.id,
            app=spec.app,
            environment=spec.environment,
            release=spec.release,
            runtime=self.name,
            address=address_of(namespace, name, spec.id, pod_port(spec)),
            handle=f"{namespace}/{name}",
            image=spec.image.digest,
        )

    def _scale(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        *,
        add: str | None = None,
        remove: str | None = None,
        read: dict[str, Any] | None = None,
    ) -> list[str]:
        """Add or remove one wanted instance of the Deployment ``name`` and scale it to their
        number; the instances left. A Deployment changed in between is read again.

        Raises:
            RuntimeDriverError: when the server refuses, or keeps changing it.
        """
        for attempt in range(SCALE_ATTEMPTS):
            obj = read if read is not None else api.get("Deployment", namespace, name)
            read = None
            if obj is None:
                return []
            wanted = _wanted(obj)
            if add is not None and add not in wanted:
                wanted.append(add)
            if remove is not None:
                wanted = [w for w in wanted if w != remove]
            version = str((obj.get("metadata") or {}).get("resourceVersion") or "") or None
            try:
                api.apply(scale(name, namespace, wanted, version), field_manager=SCALE_MANAGER)
            except RuntimeDriverError as exc:
                if exc.status == CONFLICT and attempt + 1 < SCALE_ATTEMPTS:
                    continue
                raise
            return wanted
        raise RuntimeDriverError(f"Deployment {namespace}/{name} kept changing while scaled")

    def destroy(self, instance: Instance, grace: float) -> None:
        api, namespace, name = self._client_at(instance)
        self._releases.pop(f"{namespace}/{name}", None)
        found = api.get("Deployment", namespace, name)
        if found is None:
            self._delete_release_objects(api, namespace, name)
            return
        if not _ours(found):
            raise RuntimeDriverError(
                f"{instance.environment}/{instance.id}: Deployment {namespace}/{name} "
                "was not created by castiron; leaving it alone"
            )
        wanted = _wanted(found)
        if instance.id not in wanted:
            if wanted:
                return  # not one of its instances (gone already)
        elif len(wanted) > 1 and self._scale(api, namespace, name, remove=instance.id, read=found):
            return
        api.delete("Deployment", namespace, name, grace=grace)
        self._delete_release_objects(api, namespace, name)

    def _delete_release_objects(self, api: KubeApi, namespace: str, name: str) -> None:
        """Delete the Secret and the Service of the release's Deployment ``name``."""
        owned: tuple[tuple[Kind, str], ...] = (("Secret", secret_name(name)), ("Service", name))
        for kind, held in owned:
            found = api.get(kind, namespace, held)
            if found is not None and _ours(found):
                api.delete(kind, namespace, held)

    def down(self, app: str, environment: str, grace: float = 10.0) -> list[str]:
        """Delete every Deployment and Secret castiron made for ``app``/``environment`` and
        the environment's Services; returns the instance ids removed."""
        options = self.options_for(environment)
        api = self.client(options)
        wanted = _labels(app, environment)
        removed: list[str] = []
        for obj in api.find("Deployment", options.namespace, wanted):
            name = str(obj["metadata"]["name"])
            api.delete("Deployment", options.namespace, name, grace=grace)
            removed.extend(_wanted(obj) or [name])
        for obj in api.find("Secret", options.namespace, wanted):
            api.delete("Secret", options.namespace, str(obj["metadata"]["name"]))
        for obj in api.find("Service", options.namespace, wanted):
            api.delete("Service", options.namespace, str(obj["metadata"]["name"]))
        if options.gateway is not None:
            for obj in api.find("HTTPRoute", options.namespace, wanted):
                api.delete("HTTPRoute", options.namespace, str(obj["metadata"]["name"]))
        self._releases.clear()
        return removed

    # --- observe ---------------------------------------------------------------------------

    def observe(self, app: str, environment: str) -> list[Observed]:
        options = self.options_for(environment)
        api = self.client(options)
        selected = _labels(app, environment)
        pods = api.find("Pod", options.namespace, selected)
        out: list[Observed] = []
        for obj in api.find("Deployment", options.namespace, selected):
            name = str(obj["metadata"]["name"])
            self._where[f"{options.namespace}/{name}"] = options
            mine = [p for p in pods if _selects(obj, p)]
            out += self._instances(obj, mine, options)
        return sorted(out, key=lambda o: o.instance.id)

    def _instances(
        self, obj: Mapping[str, Any], pods: list[dict[str, Any]], options: KubernetesOptions
    ) -> list[Observed]:
        """The instances of a release's Deployment, each with its pod (a Deployment castiron
        made that wants none is one stray: left over by an interrupted destroy)."""
        wanted = _wanted(obj)
        if not wanted:
            name = str((obj.get("metadata") or {}).get("name", ""))
            return [replace_stray(self._observed(obj, name, None, pods, options))]
        ranked = _ranked(pods)
        return [
            self._observed(obj, iid, ranked[k] if k < len(ranked) else None, pods, options)
            for k, iid in enumerate(wanted)
        ]

    def strays(
        self,
        app: str,
        environment: str,
        known_ids: Collection[str],
        release_images: Collection[ImageRef],
    ) -> list[Observed]:
        """Instances of ``app``/``environment`` castiron's records do not know, and
        Deployments claiming them (name and environment labels) castiron did not create."""
        options = self.options_for(environment)
        api = self.client(options)
        claimed = {LABEL_NAME: app, LABEL_ENVIRONMENT: environment}
        out: list[Observed] = []
        for obj in api.find("Deployment", options.namespace, claimed):
            if not _ours(obj):
                name = str(obj["metadata"]["name"])
                out.append(replace_stray(self._observed(obj, name, None, [], options)))
                continue
            for observed in self._instances(obj, [], options):
                if observed.stray or observed.instance.id not in known_ids:
                    out.append(observed)
        return out

    def inspect(self, instance: Instance) -> Observed:
        api, namespace, name = self._client_at(instance)
        found = api.get("Deployment", namespace, name)
        if found is None or instance.id not in _wanted(found):
            return Observed(instance=instance, state="missing", image=None)
        pods = [p for p in api.find("Pod", namespace, _pod_selector(found)) if _selects(found, p)]
        for observed in self._instances(found, pods, self._options_at(namespace, name)):
            if observed.instance.id == instance.id:
                return observed
        return Observed(instance=instance, state="missing", image=None)

    def readiness(self, address: str) -> tuple[bool, str]:
        """Whether the instance at ``address`` is ready (the kubelet ran its probes: as many
        pods of its Deployment's current template are Ready as its rank), and why not.

        Raises:
            RuntimeDriverError: when the cluster cannot be read.
        """
        parsed = parse_address(address)
        if parsed is None:
            return False, f"{address}: not a pod address"
        namespace, name, instance = parsed
        read = self._release(namespace, name)
        if read.obj is None:
            return False, f"no Deployment {namespace}/{name}"
        wanted = _wanted(read.obj)
        if instance not in wanted:
            return False, f"not an instance of Deployment {namespace}/{name}"
        ranked = _ranked(read.pods)
        rank = wanted.index(instance)
        if rank >= len(ranked):
            return False, "no pod yet"
        pod = ranked[rank]
        if _pod_ready(pod):
            return True, f"pod {pod['metadata']['name']} is Ready"
        return False, _waiting_reason(pod) or "not ready"

    def unit_health(self, instances: Sequence[Instance]) -> list[UnitHealth]:
        """The pods of the Deployments that run ``instances``, each with the kubelet's
        verdict (Ready) and its containers' restart count, read afresh (a canary judges them
        during each step); terminating pods are left out.

        Raises:
            RuntimeDriverError: when the cluster cannot be read.
        """
        out: list[UnitHealth] = []
        seen: set[str] = set()
        for instance in instances:
            api, namespace, name = self._client_at(instance)
            if f"{namespace}/{name}" in seen:
                continue
            seen.add(f"{namespace}/{name}")
            found = api.get("Deployment", namespace, name)
            if found is None:
                continue
            pods = [
                p for p in api.find("Pod", namespace, _pod_selector(found)) if _selects(found, p)
            ]
            for pod in pods:
                if (pod.get("metadata") or {}).get("deletionTimestamp"):
                    continue
                restarts = sum(int(s.get("restartCount") or 0) for s in _container_statuses(pod))
                ready = _pod_ready(pod)
                detail = "" if ready and not restarts else _waiting_reason(pod)
                out.append(UnitHealth(str(pod["metadata"]["name"]), ready, restarts, detail or ""))
        return out

    def _release(self, namespace: str, name: str) -> _Release:
        key = f"{namespace}/{name}"
        now = self.clock()
        cached = self._releases.get(key)
        if cached is not None and now - cached.at < self.readiness_ttl:
            return cached
        api = self.client(self._options_at(namespace, name))
        obj = api.get("Deployment", namespace, name)
        pods: list[dict[str, Any]] = []
        if obj is not None:
            pods = [p for p in api.find("Pod", namespace, _pod_selector(obj)) if _selects(obj, p)]
        read = _Release(now, obj, pods)
        self._releases[key] = read
        return read

    # --- drift -----------------------------------------------------------------------------

    def live_diff(self, spec: InstanceSpec) -> list[LiveDifference]:
        """How the live objects of ``spec``'s release differ from what castiron would apply:
        the Deployment is applied as a server-side dry run (castiron's field manager, forced)
        and the answer compared with the live object, so fields the server defaults are in
        both and cancel out, and only what someone changed in castiron's fields shows; a
        Secret the release needs that is gone is a difference too. Nothing is written.

        Raises:
            RuntimeDriverError: when the cluster cannot be read, or refuses the dry run.
        """
        options = self.options_for(spec.environment)
        api = self.client(options)
        name = release_name(spec.app, spec.environment, spec.release)
        live = api.get("Deployment", options.namespace, name)
        if live is None or not _ours(live):
            return []  # a missing release is found from its instances; foreign ones as strays
        would = api.apply(deployment(spec, options), dry_run=True)
        kind = f"Deployment {options.namespace}/{name}"
        out = [
            LiveDifference(kind, path, want, have) for path, want, have in differences(would, live)
        ]
        if spec.secret_names and api.get("Secret", options.namespace, secret_name(name)) is None:
            out.append(
                LiveDifference(
                    f"Secret {options.namespace}/{secret_name(name)}", "", "present", None
                )
            )
        return out

    # --- logs ------------------------------------------------------------------------------

    def _pod_of(self, instance: Instance) -> tuple[KubeApi, str, str]:
        api, namespace, name = self._client_at(instance)
        found = api.get("Deployment", namespace, name)
        if found is None or instance.id not in _wanted(found):
            raise NotFoundError(f"{instance.environment}/{instance.id}: no pod")
        pods = [p for p in api.find("Pod", namespace, _pod_selector(found)) if _selects(found, p)]
        ranked = _ranked(pods) or pods
        if not ranked:
            raise NotFoundError(f"{instance.environment}/{instance.id}: no pod")
        rank = _wanted(found).index(instance.id)
        pod = ranked[rank] if rank < len(ranked) else ranked[-1]
        return api, namespace, str(pod["metadata"]["name"])

    def logs(self, instance: Instance, lines: int) -> str:
        api, namespace, pod = self._pod_of(instance)
        try:
            return "".join(api.logs(namespace, pod, lines))
        except RuntimeDriverError:
            events = api.events(namespace, pod)
            return "".join(f"event: {e.get('reason')}: {e.get('message')}\n" for e in events)

    def follow_logs(self, instance: Instance, lines: int) -> Iterator[bytes]:
        api, namespace, pod = self._pod_of(instance)
        for line in api.logs(namespace, pod, lines, follow=True):
            yield line.encode()

    def _observed(
        self,
        obj: Mapping[str, Any],
        instance_id: str,
        pod: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        options: KubernetesOptions,
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
        state = _state([pod] if pod is not None else [])
        status: Mapping[str, Any] = obj.get("status") or {}
        security: Mapping[str, Any] = container.get("securityContext") or {}
        wanted = _wanted(obj)
        config: dict[str, object] = {
            "env": env,
            "secrets": secrets,
            "command": list(container.get("command") or []),
            "workdir": container.get("workingDir"),
            "port": port,
            "image_ref": configured,
            "replicas": spec.get("replicas"),
            "wanted": len(wanted),
            "ready_replicas": status.get("readyReplicas") or 0,
            "pod": None if pod is None else str(pod["metadata"]["name"]),
            "pods": sorted(str(p["metadata"]["name"]) for p in pods),
            # castiron's labels under the names every runtime reports them by (drift).
            "labels": {
                "castiron.app": labels.get(LABEL_NAME, ""),
                "castiron.environment": labels.get(LABEL_ENVIRONMENT, ""),
                "castiron.release": labels.get(LABEL_RELEASE, ""),
                "castiron.image": manifest,
                "castiron.instance": instance_id if instance_id in wanted else "",
            },
            "kubernetes_labels": dict(labels),
            "read_only": bool(security.get("readOnlyRootFilesystem")),
            "cap_drop": list((security.get("capabilities") or {}).get("drop") or []),
            "deployment": f"{namespace}/{name}",
        }
        release = labels.get(LABEL_RELEASE, "")
        instance = Instance(
            id=instance_id,
            app=labels.get(LABEL_NAME, ""),
            environment=labels.get(LABEL_ENVIRONMENT, ""),
            release=ReleaseId(release),
            runtime=self.name,
            address=address_of(namespace, name, instance_id, port),
            handle=f"{namespace}/{name}",
            image=Digest(manifest or configured),
        )
        stray = not (_ours(obj) and instance_id in wanted and release and manifest)
        exit_code = _exit_code([pod]) if pod is not None and state == "exited" else None
        return Observed(
            instance=instance,
            state=state,
            image=image,
            config=config,
            stray=stray,
            exit_code=exit_code,
        )


@value
class LiveDifference:
    """One field of a live object that differs from what castiron would apply."""

    target: str
    """The object: ``KIND NAMESPACE/NAME``."""
    path: str
    """The field, e.g. ``spec.template.spec.containers[app].env[VERSION].value`` ('' for the
    whole object)."""
    want: object
    have: object


SERVER_FIELDS: frozenset[tuple[str, ...]] = frozenset(
    {
        ("status",),
        ("metadata", "managedFields"),
        ("metadata", "resourceVersion"),
        ("metadata", "generation"),
        ("metadata", "uid"),
        ("metadata", "creationTimestamp"),
        ("metadata", "selfLink"),
        ("metadata", "annotations", "deployment.kubernetes.io/revision"),
        ("metadata", "annotations", "kubectl.kubernetes.io/last-applied-configuration"),
    }
)
"""Fields the server (or kubectl) keeps for itself: never drift."""


def differences(
    want: Any, have: Any, path: tuple[str, ...] = ()
) -> list[tuple[str, object, object]]:
    """(path, wanted, found) for every leaf where ``have`` differs from ``want`` (both as
    the server returns them), leaving out :data:`SERVER_FIELDS`; lists of named items
    (containers, env, ports, volumes) are compared by name, others by position."""
    if path in SERVER_FIELDS:
        return []
    if isinstance(want, Mapping) and isinstance(have, Mapping):
        out: list[tuple[str, object, object]] = []
        for key in sorted(set(want) | set(have), key=str):
            out += differences(want.get(key), have.get(key), (*path, str(key)))
        return out
    if isinstance(want, list) and isinstance(have, list):
        if _named(want) and _named(have):
            wanted = {str(i["name"]): i for i in want}
            found = {str(i["name"]): i for i in have}
            out = []
            for key in sorted(set(wanted) | set(found)):
                step = (*path[:-1], f"{path[-1]}[{key}]") if path else (f"[{key}]",)
                out += differences(wanted.get(key), found.get(key), step)
            return out
        if len(want) == len(have):
            out = []
            for index, (a, b) in enumerate(zip(want, have, strict=True)):
                step = (*path[:-1], f"{path[-1]}[{index}]") if path else (f"[{index}]",)
                out += differences(a, b, step)
            return out
    if want == have:
        return []
    return [(".".join(path), want, have)]


def _named(items: list[Any]) -> bool:
    return all(isinstance(i, Mapping) and "name" in i for i in items)


def replace_stray(observed: Observed) -> Observed:
    """``observed`` marked as a stray."""
    return Observed(
        instance=observed.instance,
        state=observed.state,
        image=observed.image,
        config=observed.config,
        stray=True,
        exit_code=observed.exit_code,
    )


# --- helpers ---------------------------------------------------------------------------------


def _labels(app: str, environment: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGER, LABEL_NAME: app, LABEL_ENVIRONMENT: environment}


def _meta_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _ours(obj: Mapping[str, Any]) -> bool:
    return bool(_meta_labels(obj).get(LABEL_MANAGED_BY) == MANAGER)


def _wanted(obj: Mapping[str, Any]) -> list[str]:
    """The instances of a Deployment: its annotation, or the one instance of a Deployment of
    an earlier version."""
    wanted = wanted_instances(obj)
    if wanted:
        return wanted
    legacy = _meta_labels(obj).get(LABEL_INSTANCE)
    return [legacy] if legacy else []


def _handle(instance: Instance) -> tuple[str, str]:
    """(namespace, Deployment name) of ``instance``'s handle (namespace '' when it has none)."""
    namespace, _, name = instance.handle.partition("/")
    return (namespace, name) if name else ("", instance.id)


def _pod_selector(obj: Mapping[str, Any]) -> dict[str, str]:
    selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return {str(k): str(v) for k, v in selector.items()}


def _selects(obj: Mapping[str, Any], pod: Mapping[str, Any]) -> bool:
    """Whether ``pod`` is one of the Deployment ``obj``'s (its selector, its namespace)."""
    selector = _pod_selector(obj)
    labels = _meta_labels(pod)
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _ranked(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pods of a Deployment's current template (that of its newest pod; older ones are
    being replaced), not terminating, ready first, then oldest first."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    if not live:
        return []

    def age(pod: Mapping[str, Any]) -> tuple[str, str]:
        meta = pod.get("metadata") or {}
        return str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")

    newest = max(live, key=age)
    template = _meta_labels(newest).get("pod-template-hash")
    current = [p for p in live if _meta_labels(p).get("pod-template-hash") == template]
    return sorted(current, key=lambda p: (not _pod_ready(p), *age(p)))


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
        "CreateContainerError",
        "RunContainerError",
    }
)
"""Waiting reasons that mean the container will not come up by itself. Not among them:
``CreateContainerConfigError``, which the kubelet retries and which a node under load shows
for a while right after a release's Secret is created ("failed to sync secret cache"); a
reference that really is missing ends at the deploy timeout, its reason shown."""


def _state(pods: list[dict[str, Any]]) -> InstanceState:
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
    "SCALE_ATTEMPTS",
    "SERVER_FIELDS",
    "ImageLoader",
    "KubernetesDriver",
    "LiveDifference",
    "address_of",
    "differences",
    "parse_address",
    "replace_stray",
]
