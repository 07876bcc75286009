"""Pure builders of the Kubernetes objects castiron creates: values in, plain dicts out.

Owns the shape of every object castiron sends to a cluster, and nothing else:

* one ``apps/v1`` Deployment per release (:func:`deployment`), named ``APP-ENV-<release id>``
  (:func:`release_name`), labelled with castiron's labels (managed-by, app, environment,
  release), the image by digest, readiness and liveness probes from the release's health
  check, and the same hardening as the Docker runtime (non-root, read-only root filesystem,
  every capability dropped, no privilege escalation, no service-account token). Its pods are
  the release's instances; their number is set apart (:func:`scale`: ``replicas`` and the
  annotation listing the wanted instances, applied by a field manager of its own), so applying
  the Deployment again never changes how many pods run;
* one ``v1`` Secret per release holding the resolved secret values (:func:`secret`), read by
  the container through ``valueFrom``; castiron's state only ever holds the names;
* one stable ``v1`` Service per environment (:func:`service`) whose selector names the
  serving release: changing the selector is the traffic switch;
* when the environment names a Gateway API Gateway: one Service per release
  (:func:`release_service`) and the environment's ``gateway.networking.k8s.io/v1`` HTTPRoute
  (:func:`http_route`) splitting requests between those Services by exact weights (a canary).

Only ``apps/v1`` and ``core/v1`` are used (and the Gateway API's HTTPRoute when a Gateway is
named); every port spells out ``protocol: TCP`` (server-side
apply on 1.20 needs it). The output of a builder depends only on its arguments (sorted keys
and lists), so an exported manifest is byte-identical for the same release.

It imports no client library and does no I/O; it knows no spec, engine or state.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from castiron.errors import RuntimeDriverError
from castiron.model import HealthCheck, InstanceSpec
from castiron.values import value

FIELD_MANAGER = "castiron"
"""The field manager of every server-side apply castiron makes of a whole object."""
SCALE_MANAGER = "castiron-scale"
"""The field manager of the scale of a release's Deployment (``replicas`` and the annotation
listing the wanted instances): the Deployment's other fields are castiron's own."""

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_ENVIRONMENT = "castiron.dev/environment"
LABEL_RELEASE = "castiron.dev/release"
LABEL_INSTANCE = "castiron.dev/instance"
"""Only on Deployments of earlier versions (one per instance); read, never written."""
ANNOTATION_INSTANCES = "castiron.dev/instances"
"""The ids of the instances a release's Deployment runs, in creation order, comma-separated;
``replicas`` is their number."""
ANNOTATION_IMAGE = "castiron.dev/image"
"""The image's manifest digest (its castiron identity)."""
ANNOTATION_CONFIG = "castiron.dev/config-digest"
ANNOTATION_SECRETS = "castiron.dev/secrets"
"""Comma-separated names (never values) of the environment variables that hold secrets."""
ANNOTATION_PORT = "castiron.dev/port"
MANAGER = "castiron"
CONTAINER = "app"
DEFAULT_PORT = 8000
"""The port the app listens on in its pod when the instance spec asks for none (0)."""
NONROOT_UID = 65534
"""The user pods run as when the image names none (or names one by name: Kubernetes needs a
number to prove it is not root)."""

ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
PullPolicy = Literal["IfNotPresent", "Never", "Always"]

_QUANTITY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_K8S_UNITS = {"": "", "k": "Ki", "m": "Mi", "g": "Gi", "t": "Ti"}


@value
class KubernetesOptions:
    """Where and how the pods of one environment run, beyond what the instance spec says
    (resolved by the engine from the spec's ``kubernetes:`` section)."""

    namespace: str = "default"
    """The namespace of every object of the environment."""
    context: str | None = None
    """The kubeconfig context (None: the current one)."""
    service_name: str = ""
    """The stable Service's name ('': ``APP-ENVIRONMENT``)."""
    service_type: ServiceType = "ClusterIP"
    service_port: int = 80
    """The port the Service exposes (it targets the app's port)."""
    image_repository: str | None = None
    """``REGISTRY/REPO`` the nodes pull from, by digest (``REPO@sha256:…``); None: the nodes'
    container engine already holds the image (loaded from castiron's store), referenced by its
    image ID and never pulled."""
    image_pull_secret: str | None = None
    node_selector: tuple[tuple[str, str], ...] = ()
    cpu_request: str | None = None
    memory_request: str | None = None
    gateway: str | None = None
    """The Gateway API Gateway whose HTTPRoute splits a canary's traffic by exact weights
    (None: weights are replica ratios behind the stable Service)."""
    gateway_namespace: str | None = None
    """The Gateway's namespace (None: the environment's)."""
    route_name: str = ""
    """The HTTPRoute's name ('': ``APP-ENVIRONMENT``)."""
    hostnames: tuple[str, ...] = ()
    """The HTTPRoute's hostnames (none: every request the Gateway's listener takes)."""

    def service_for(self, app: str, environment: str) -> str:
        """The Service's name for ``app``/``environment``."""
        return self.service_name or f"{app}-{environment}"

    def route_for(self, app: str, environment: str) -> str:
        """The HTTPRoute's name for ``app``/``environment``."""
        return self.route_name or f"{app}-{environment}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (see :meth:`from_json`); the Gateway only when one is named (the
        release id hashes this: releases made before it existed keep theirs)."""
        data: dict[str, Any] = {
            "namespace": self.namespace,
            "context": self.context,
            "service_name": self.service_name,
            "service_type": self.service_type,
            "service_port": self.service_port,
            "image_repository": self.image_repository,
            "image_pull_secret": self.image_pull_secret,
            "node_selector": dict(self.node_selector),
            "cpu_request": self.cpu_request,
            "memory_request": self.memory_request,
        }
        if self.gateway is not None:
            data["gateway"] = {
                "name": self.gateway,
                "namespace": self.gateway_namespace,
                "route": self.route_name,
                "hostnames": list(self.hostnames),
            }
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KubernetesOptions:
        """Rebuild :meth:`to_json` output.

        Raises:
            KeyError, TypeError, ValueError: when ``data`` is not such an object.
        """
        fields = dict(data)
        fields["node_selector"] = tuple(sorted(dict(fields.get("node_selector") or {}).items()))
        gateway = fields.pop("gateway", None)
        if gateway is not None:
            fields["gateway"] = str(gateway["name"])
            fields["gateway_namespace"] = gateway.get("namespace")
            fields["route_name"] = str(gateway.get("route") or "")
            fields["hostnames"] = tuple(str(h) for h in gateway.get("hostnames") or ())
        return cls(**fields)


def labels(app: str, environment: str) -> dict[str, str]:
    """The labels every object castiron creates for ``app``/``environment`` carries."""
    return {LABEL_MANAGED_BY: MANAGER, LABEL_NAME: app, LABEL_ENVIRONMENT: environment}


def selector(app: str, environment: str) -> str:
    """A label selector (text) matching what castiron created for ``app``/``environment``."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels(app, environment).items()))


LOADED_REPOSITORY = "castiron.local/image"
"""The repository of an image loaded into the nodes' engine (no registry): the pod names
``castiron.local/image:<config digest hex>``, a name castiron binds in the node's engine to
exactly that image ID after checking it (the kubelet's dockershim resolves a digest reference
only through a registry's repository digest, so ``NAME@sha256:…`` cannot name a loaded image)."""


def image_reference(spec: InstanceSpec, options: KubernetesOptions) -> tuple[str, PullPolicy]:
    """The pod's image and pull policy: ``REPO@<manifest digest>`` pulled when missing, or the
    name derived from the image ID (config digest) that the node's engine holds, never pulled."""
    if options.image_repository:
        return f"{options.image_repository}@{spec.image.digest}", "IfNotPresent"
    return f"{LOADED_REPOSITORY}:{spec.image.config_digest.removeprefix('sha256:')}", "Never"


def pod_port(spec: InstanceSpec) -> int:
    """The port the app listens on in its pod (its own network namespace: no collisions)."""
    return spec.port or DEFAULT_PORT


def release_name(app: str, environment: str, release: str) -> str:
    """The name of ``release``'s Deployment (and of its own Service): ``APP-ENV-<release>``,
    the prefix cut so the whole fits a DNS label (63 characters)."""
    prefix = f"{app}-{environment}"[: 62 - len(release)].rstrip("-")
    return f"{prefix}-{release}"


def secret_name(deployment_name: str) -> str:
    """The name of the Secret holding the secret values of the Deployment ``deployment_name``."""
    return f"{deployment_name}-secrets"


def release_labels(app: str, environment: str, release: str) -> dict[str, str]:
    """The labels of every object of ``release`` (and the selector of its pods)."""
    return {**labels(app, environment), LABEL_RELEASE: release}


def secret(spec: InstanceSpec, options: KubernetesOptions) -> dict[str, Any] | None:
    """The Secret of the secret values of ``spec``'s release (None when it has none)."""
    if not spec.secret_names:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name(release_name(spec.app, spec.environment, spec.release)),
            "namespace": options.namespace,
            "labels": release_labels(spec.app, spec.environment, spec.release),
        },
        "type": "Opaque",
        "stringData": {name: spec.env[name] for name in sorted(spec.secret_names)},
    }


def _quantity_memory(text: str, where: str) -> str:
    found = _QUANTITY_RE.match(text)
    if not found:
        raise RuntimeDriverError(f"{where}: memory: not a size: {text!r}")
    number, unit = found.group(1), found.group(2).lower()
    return f"{number}{_K8S_UNITS[unit]}"


def _quantity_cpu(cpus: float, where: str) -> str:
    if not math.isfinite(cpus) or cpus <= 0:
        raise RuntimeDriverError(f"{where}: cpus must be more than 0, not {cpus}")
    return f"{max(1, round(cpus * 1000))}m"


def _probe(health: HealthCheck | None, port: int, liveness: bool) -> dict[str, Any] | None:
    if health is None:
        return None
    probe: dict[str, Any]
    if health.kind == "http":
        probe = {"httpGet": {"path": health.target or "/", "port": port}}
    elif health.kind == "tcp":
        probe = {"tcpSocket": {"port": port}}
    elif health.kind == "command":
        probe = {"exec": {"command": list(json.loads(health.target or "[]"))}}
    else:
        return None
    probe["periodSeconds"] = max(1, math.ceil(health.interval))
    probe["timeoutSeconds"] = max(1, math.ceil(health.timeout))
    if liveness:
        probe["initialDelaySeconds"] = max(0, math.ceil(health.start_period))
        probe["failureThreshold"] = 3
    else:
        probe["successThreshold"] = max(1, health.healthy_after)
        probe["failureThreshold"] = 1
    return probe


def _run_as(user: str | None) -> tuple[int, int]:
    """(uid, gid) for the pod: the image's numeric user when it is not root, else nobody."""
    if user:
        uid_text, _, gid_text = user.partition(":")
        if uid_text.isdigit() and int(uid_text) != 0:
            gid = int(gid_text) if gid_text.isdigit() else int(uid_text)
            return int(uid_text), gid
    return NONROOT_UID, NONROOT_UID


def deployment(
    spec: InstanceSpec, options: KubernetesOptions, *, replicas: int | None = None
) -> dict[str, Any]:
    """The Deployment of ``spec``'s release; without ``replicas`` (the driver's apply: the
    scale is :func:`scale`'s), or with them (an export of the whole release).

    Raises:
        RuntimeDriverError: for a bad memory size, CPU count or writable path (naming the
            environment and instance).
    """
    where = f"{spec.environment}/{spec.id}"
    name = release_name(spec.app, spec.environment, spec.release)
    image, pull = image_reference(spec, options)
    port = pod_port(spec)
    env: list[dict[str, Any]] = []
    plain = {k: v for k, v in spec.env.items() if k not in spec.secret_names}
    plain.update(
        PORT=str(port),
        HOST="0.0.0.0",
        CASTIRON_APP=spec.app,
        CASTIRON_ENVIRONMENT=spec.environment,
    )
    for key in sorted(plain):
        env.append({"name": key, "value": plain[key]})
    for key in sorted(spec.secret_names):
        ref = {"name": secret_name(name), "key": key}
        env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    obj_labels = release_labels(spec.app, spec.environment, spec.release)
    annotations = {
        ANNOTATION_IMAGE: spec.image.digest,
        ANNOTATION_CONFIG: spec.image.config_digest,
        ANNOTATION_SECRETS: ",".join(sorted(spec.secret_names)),
        ANNOTATION_PORT: str(port),
    }
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"medium": "Memory"}}]
    for index, path in enumerate(spec.writable):
        if not path.startswith("/") or path == "/":
            raise RuntimeDriverError(
                f"{where}: writable path {path!r} must be an absolute path below '/'"
            )
        if path.rstrip("/") == "/tmp":
            continue
        volumes.append({"name": f"writable-{index}", "emptyDir": {}})
        mounts.append({"name": f"writable-{index}", "mountPath": path.rstrip("/")})
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if spec.memory is not None:
        limits["memory"] = _quantity_memory(spec.memory, where)
        requests["memory"] = limits["memory"]
    if spec.cpus is not None:
        limits["cpu"] = _quantity_cpu(spec.cpus, where)
    if options.memory_request:
        requests["memory"] = options.memory_request
    if options.cpu_request:
        requests["cpu"] = options.cpu_request
    uid, gid = _run_as(spec.user)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": pull,
        "env": env,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }
    if spec.command:
        container["command"] = list(spec.command)
    if spec.workdir:
        container["workingDir"] = spec.workdir
    health = spec.health
    readiness = _probe(health, port, liveness=False)
    if readiness is not None:
        container["readinessProbe"] = readiness
        liveness = _probe(health, port, liveness=True)
        if liveness is not None:
            container["livenessProbe"] = liveness
    if limits or requests:
        container["resources"] = {
            k: v for k, v in (("limits", limits), ("requests", requests)) if v
        }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 10,
        "securityContext": {"runAsUser": uid, "runAsGroup": gid, "runAsNonRoot": True},
        "containers": [container],
        "volumes": volumes,
    }
    if options.image_pull_secret:
        pod_spec["imagePullSecrets"] = [{"name": options.image_pull_secret}]
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    body: dict[str, Any] = {
        "revisionHistoryLimit": 0,
        "selector": {"matchLabels": obj_labels},
        # The template changes only when drift is fixed: pods are then replaced one by one,
        # never fewer ready than wanted.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {
            "metadata": {"labels": dict(obj_labels), "annotations": annotations},
            "spec": pod_spec,
        },
    }
    if replicas is not None:
        body = {"replicas": replicas, **body}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": options.namespace,
            "labels": obj_labels,
            "annotations": annotations,
        },
        "spec": body,
    }


def scale(
    name: str,
    namespace: str,
    instances: Sequence[str],
    resource_version: str | None = None,
) -> dict[str, Any]:
    """The scale of the release's Deployment ``name``, applied by :data:`SCALE_MANAGER`:
    one replica per wanted instance, the instances' ids in an annotation. With
    ``resource_version``, the server refuses it (409) when the Deployment changed since read."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "annotations": {ANNOTATION_INSTANCES: ",".join(instances)},
    }
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {"replicas": len(instances)},
    }


def wanted_instances(obj: Mapping[str, Any]) -> list[str]:
    """The instances a release's Deployment runs (its :func:`scale` annotation)."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return [i for i in str(annotations.get(ANNOTATION_INSTANCES, "")).split(",") if i]


def service(
    app: str,
    environment: str,
    release: str | None,
    port: int,
    options: KubernetesOptions,
) -> dict[str, Any]:
    """The environment's stable Service, selecting the pods of ``release`` (None: every pod
    of the environment, whatever its release: a canary's replica-ratio weights)."""
    chosen = labels(app, environment)
    if release is not None:
        chosen[LABEL_RELEASE] = release
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": options.service_for(app, environment),
            "namespace": options.namespace,
            "labels": labels(app, environment),
        },
        "spec": {
            "type": options.service_type,
            "selector": chosen,
            "ports": _service_ports(options, port),
        },
    }


def _service_ports(options: KubernetesOptions, port: int) -> list[dict[str, Any]]:
    """The one HTTP port of a Service (``protocol`` spelled out: 1.20's server-side apply
    needs it)."""
    return [{"name": "http", "port": options.service_port, "targetPort": port, "protocol": "TCP"}]


def release_service(
    app: str, environment: str, release: str, port: int, options: KubernetesOptions
) -> dict[str, Any]:
    """The Service of one release alone (``APP-ENV-<release>``), a backend of the
    environment's HTTPRoute; deleted with the release's Deployment."""
    chosen = release_labels(app, environment, release)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": release_name(app, environment, release),
            "namespace": options.namespace,
            "labels": dict(chosen),
        },
        "spec": {
            "type": "ClusterIP",
            "selector": chosen,
            "ports": _service_ports(options, port),
        },
    }


ROUTE_API = "gateway.networking.k8s.io/v1"
"""The Gateway API version of the HTTPRoute (the only object beyond apps/v1 and core/v1)."""


def http_route(
    app: str, environment: str, weights: Sequence[tuple[str, int]], options: KubernetesOptions
) -> dict[str, Any]:
    """The environment's HTTPRoute on ``options.gateway``: one rule sending each request to
    the Service of one release, in proportion to ``weights`` ((release, weight) pairs, weights
    from 0 to 100: the exact split of a canary).

    Raises:
        RuntimeDriverError: when no Gateway is named, or a weight is out of range.
    """
    if options.gateway is None:
        raise RuntimeDriverError(f"{environment}: no Gateway named for an HTTPRoute")
    parent: dict[str, Any] = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": options.gateway,
    }
    if options.gateway_namespace:
        parent["namespace"] = options.gateway_namespace
    backends = []
    for release, weight in weights:
        if not 0 <= weight <= 100:
            raise RuntimeDriverError(f"{environment}: weight {weight} is not from 0 to 100")
        backends.append(
            {
                "group": "",
                "kind": "Service",
                "name": release_name(app, environment, release),
                "port": options.service_port,
                "weight": weight,
            }
        )
    spec: dict[str, Any] = {"parentRefs": [parent], "rules": [{"backendRefs": backends}]}
    if options.hostnames:
        spec["hostnames"] = list(options.hostnames)
    return {
        "apiVersion": ROUTE_API,
        "kind": "HTTPRoute",
        "metadata": {
            "name": options.route_for(app, environment),
            "namespace": options.namespace,
            "labels": labels(app, environment),
        },
        "spec": spec,
    }


def route_weights(route: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(Service name, weight) of each backend of an HTTPRoute's first rule."""
    rules = (route.get("spec") or {}).get("rules") or [{}]
    out = []
    for ref in rules[0].get("backendRefs") or []:
        out.append((str(ref.get("name", "")), int(ref.get("weight", 1))))
    return out


def dump(objects: list[dict[str, Any]]) -> str:
    """Objects as one YAML-compatible JSON document stream (sorted keys: byte-stable)."""
    return "".join("---\n" + json.dumps(obj, sort_keys=True, indent=2) + "\n" for obj in objects)


__all__ = [
    "ANNOTATION_CONFIG",
    "ANNOTATION_IMAGE",
    "ANNOTATION_INSTANCES",
    "ANNOTATION_PORT",
    "ANNOTATION_SECRETS",
    "CONTAINER",
    "DEFAULT_PORT",
    "FIELD_MANAGER",
    "LABEL_ENVIRONMENT",
    "LABEL_INSTANCE",
    "LABEL_MANAGED_BY",
    "LABEL_NAME",
    "LABEL_RELEASE",
    "LOADED_REPOSITORY",
    "ROUTE_API",
    "SCALE_MANAGER",
    "KubernetesOptions",
    "PullPolicy",
    "ServiceType",
    "deployment",
    "dump",
    "http_route",
    "image_reference",
    "labels",
    "pod_port",
    "release_labels",
    "release_name",
    "release_service",
    "route_weights",
    "scale",
    "secret",
    "secret_name",
    "selector",
    "service",
    "wanted_instances",
]
