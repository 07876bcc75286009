"""An in-memory Kubernetes API server and controllers, for tests that need no cluster.

Owns :class:`FakeCluster`, a :class:`~castiron.drivers.kubernetes.api.KubeApi` that keeps
objects in a dict and behaves like an API server where castiron relies on it:

* server-side apply: objects merge by field manager (a manager's fields it no longer sends
  are removed, ``force`` takes fields from other managers), a ``metadata.resourceVersion``
  sent is a precondition (409), ``dry_run`` answers without storing; the server defaults a
  few fields castiron never sets (``progressDeadlineSeconds``, ``restartPolicy``, a Service's
  ``clusterIP``, ...) and keeps ``generation``, ``uid``, ``creationTimestamp``, ``status``;
* a Deployment controller: each call first reconciles every Deployment's pods with its
  ``replicas`` and template (``pod-template-hash`` label; a changed template replaces pods
  one by one, never fewer ready than wanted), and deleting a Deployment deletes its pods;
* pods become Ready as :attr:`FakeCluster.pod_outcome` says (by default at once; ``"crash"``
  for a container that keeps exiting), and write one log line; the kubelet restarting a
  container that comes back Ready (:meth:`FakeCluster.restart_containers`) shows only in its
  ``restartCount``;
* what people do by hand with ``kubectl`` (:meth:`FakeCluster.kubectl_scale`,
  :meth:`~FakeCluster.kubectl_set_image`, :meth:`~FakeCluster.kubectl_label`,
  :meth:`~FakeCluster.kubectl_patch`, :meth:`~FakeCluster.kubectl_delete`), as other field
  managers.

It runs no container and no network, imports no client library, and knows nothing of
castiron's objects: only dicts in, dicts out.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from castiron.drivers.kubernetes.api import CONFLICT, NOT_FOUND, Kind
from castiron.errors import RuntimeDriverError

PodOutcome = Literal["ready", "starting", "crash"]
"""What becomes of a new pod: Ready, still starting (not Ready), or exiting over and over."""

_API_VERSIONS: dict[str, str] = {
    "Deployment": "apps/v1",
    "Pod": "v1",
    "Service": "v1",
    "Secret": "v1",
    "Event": "v1",
    "Namespace": "v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
}

_SERVER_OWNED = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields")

Path = tuple[str, ...]


def _error(status: int, text: str) -> RuntimeDriverError:
    error = RuntimeDriverError(f"kubernetes (fake): {status}: {text}")
    error.status = status
    return error


def _leaves(obj: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    """The paths of ``obj``'s leaves (a list is one leaf: castiron sends whole lists)."""
    out: set[Path] = set()
    for key, value in obj.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            out |= _leaves(value, path)
        else:
            out.add(path)
    return out


def _merge_leaves(patch: Mapping[str, Any], prefix: Path = ()) -> list[tuple[Path, Any]]:
    """A JSON merge patch as (path, value) pairs: a non-empty object recurses, anything else
    (a list, a scalar, None for a removal) is one leaf."""
    out: list[tuple[Path, Any]] = []
    for key, value in patch.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            out += _merge_leaves(value, path)
        else:
            out.append((path, value))
    return out


def _get_path(obj: Mapping[str, Any], path: Path) -> Any:
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return None
        current = current[key]
    return current


def _set_path(obj: dict[str, Any], path: Path, value: Any) -> None:
    current = obj
    for key in path[:-1]:
        nxt = current.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            current[key] = nxt
        current = nxt
    current[path[-1]] = copy.deepcopy(value)


def _drop_path(obj: dict[str, Any], path: Path) -> None:
    chain: list[dict[str, Any]] = [obj]
    for key in path[:-1]:
        nxt = chain[-1].get(key)
        if not isinstance(nxt, dict):
            return
        chain.append(nxt)
    chain[-1].pop(path[-1], None)
    for depth in range(len(chain) - 1, 0, -1):  # prune emptied parents
        if not chain[depth]:
            chain[depth - 1].pop(path[depth - 1], None)


def _set_default(obj: dict[str, Any], path: Path, value: Any) -> None:
    if _get_path(obj, path) is None:
        _set_path(obj, path, value)


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def _template_hash(obj: Mapping[str, Any]) -> str:
    template = (obj.get("spec") or {}).get("template") or {}
    text = json.dumps(template, sort_keys=True).encode()
    return hashlib.sha256(text).hexdigest()[:10]


def _ready(pod: Mapping[str, Any]) -> bool:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


@dataclass
class FakeCluster:
    """One in-memory API server (one kubeconfig context) with a Deployment controller."""

    context: str | None = None
    pod_outcome: Callable[[Mapping[str, Any]], PodOutcome] = lambda _pod: "ready"
    """What becomes of each new pod (given the pod): ready at once by default."""
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    """Objects by (kind, namespace, name)."""
    owners: dict[tuple[str, str, str], dict[str, set[Path]]] = field(default_factory=dict)
    """The fields of each object by field manager."""
    calls: list[tuple[str, ...]] = field(default_factory=list)
    """Every call made (verb, kind, namespace/name, field manager), oldest first."""
    closed: bool = False
    _tick: int = 0
    _logs: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    # --- KubeApi ---------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """The cluster, for messages."""
        return f"the fake cluster{f' (context {self.context})' if self.context else ''}"

    def apply(
        self,
        obj: Mapping[str, Any],
        *,
        dry_run: bool = False,
        field_manager: str = "castiron",
    ) -> dict[str, Any]:
        kind = str(obj.get("kind", ""))
        meta = dict(obj.get("metadata") or {})
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        self.calls.append(("apply", kind, f"{namespace}/{name}", field_manager))
        if kind not in _API_VERSIONS or not name:
            raise _error(422, f"apply: {kind or 'an object'} needs a known kind and a name")
        if obj.get("apiVersion") != _API_VERSIONS[kind]:
            raise _error(
                422, f"apply: {kind} is {_API_VERSIONS[kind]}, not {obj.get('apiVersion')}"
            )
        self._reconcile()
        key = (kind, namespace, name)
        live = self.objects.get(key)
        wanted_version = meta.get("resourceVersion")
        if wanted_version is not None:
            have = None if live is None else live["metadata"].get("resourceVersion")
            if have != str(wanted_version):
                raise _error(
                    CONFLICT if live is not None else NOT_FOUND,
                    f"{kind} {namespace}/{name}: the object has been modified",
                )
        sent = copy.deepcopy(dict(obj))
        sent["metadata"] = {k: v for k, v in meta.items() if k not in _SERVER_OWNED}
        sent_paths = _leaves(sent) - {("apiVersion",), ("kind",)}
        result = copy.deepcopy(live) if live is not None else {"metadata": {}}
        owners = copy.deepcopy(self.owners.get(key, {}))
        for path in owners.get(field_manager, set()) - sent_paths:
            if not any(path in paths for m, paths in owners.items() if m != field_manager):
                _drop_path(result, path)
        for path in sent_paths:
            same = _get_path(result, path) == _get_path(sent, path)
            _set_path(result, path, _get_path(sent, path))
            for manager, paths in owners.items():
                if manager != field_manager and not same:
                    paths.discard(path)  # forced: a conflicting value changes owner
            # (the same value as another manager's: the server shares the field)
        owners[field_manager] = sent_paths
        result["apiVersion"], result["kind"] = _API_VERSIONS[kind], kind
        result["metadata"]["namespace"], result["metadata"]["name"] = namespace, name
        if live is None:
            self._validate_new(result)
        self._default(result, created=live is None)
        self._stamp(result, live)
        result["metadata"]["managedFields"] = [
            {"manager": m, "operation": "Apply"} for m in sorted(owners) if owners[m]
        ]
        if dry_run:
            return copy.deepcopy(result)
        self.objects[key] = result
        self.owners[key] = owners
        self._reconcile()
        return copy.deepcopy(self.objects[key])

    def merge_patch(
        self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("patch", kind, f"{namespace}/{name}", "castiron"))
        self._reconcile()
        key = (kind, namespace, name)
        live = self.objects.get(key)
        if live is None:
            raise _error(NOT_FOUND, f"{kind} {namespace}/{name} not found")
        meta = dict(patch.get("metadata") or {})
        wanted_version = meta.pop("resourceVersion", None)
        if wanted_version is not None and live["metadata"].get("resourceVersion") != str(
            wanted_version
        ):
            raise _error(CONFLICT, f"{kind} {namespace}/{name}: the object has been modified")
        before = copy.deepcopy(live)
        body = {**dict(patch), "metadata": meta} if meta else {
            k: v for k, v in patch.items() if k != "metadata"
        }
        owners = self.owners.setdefault(key, {})
        for path, value in _merge_leaves(body):
            if value is None:
                _drop_path(live, path)
                for paths in owners.values():  # a removed field has no owner left
                    for owned in [p for p in paths if p[: len(path)] == path]:
                        paths.discard(owned)
                continue
            _set_path(live, path, value)
            for paths in owners.values():
                paths.discard(path)
            owners.setdefault("castiron-update", set()).add(path)
        self._stamp(live, before)
        self._reconcile()
        return copy.deepcopy(live)

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind, f"{namespace}/{name}"))
        self._reconcile()
        found = self.objects.get((kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def find(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        self.calls.append(("find", kind, namespace))
        self._reconcile()
        return [
            copy.deepcopy(obj)
            for (k, ns, _name), obj in sorted(self.objects.items())
            if k == kind
            and ns == namespace
            and all(_labels(obj).get(a) == b for a, b in labels.items())
        ]

    def events(self, namespace: str, involved: str) -> list[dict[str, Any]]:
        return []

    def delete(self, kind: Kind, namespace: str, name: str, *, grace: float | None = None) -> bool:
        self.calls.append(("delete", kind, f"{namespace}/{name}"))
        key = (kind, namespace, name)
        if key not in self.objects:
            return False
        gone = self.objects.pop(key)
        self.owners.pop(key, None)
        if kind == "Deployment":
            for pod in self._pods_of(gone):
                self._delete_pod(pod)
        self._reconcile()
        return True

    def logs(self, namespace: str, pod: str, lines: int, *, follow: bool = False) -> Iterator[str]:
        if ("Pod", namespace, pod) not in self.objects:
            raise _error(NOT_FOUND, f"pod {namespace}/{pod} not found")
        yield from self._logs.get((namespace, pod), [])[-lines:]

    def close(self) -> None:
        self.closed = True

    # --- what people do by hand ------------------------------------------------------------

    def kubectl_scale(self, namespace: str, name: str, replicas: int) -> None:
        """``kubectl scale deployment NAME --replicas N``."""
        self._edit("Deployment", namespace, name, "kubectl", ("spec", "replicas"), replicas)

    def kubectl_set_image(self, namespace: str, name: str, image: str) -> None:
        """``kubectl set image deployment/NAME app=IMAGE`` (the first container)."""
        key = ("Deployment", namespace, name)
        obj = self._existing(key)
        containers = obj["spec"]["template"]["spec"]["containers"]
        containers[0]["image"] = image
        self._edit(
            "Deployment",
            namespace,
            name,
            "kubectl-set",
            ("spec", "template", "spec", "containers"),
            containers,
        )

    def kubectl_label(self, kind: Kind, namespace: str, name: str, key: str, value: str) -> None:
        """``kubectl label --overwrite KIND NAME KEY=VALUE``."""
        self._edit(kind, namespace, name, "kubectl-label", ("metadata", "labels", key), value)

    def kubectl_patch(self, kind: Kind, namespace: str, name: str, path: Path, value: Any) -> None:
        """``kubectl patch KIND NAME`` of one field."""
        self._edit(kind, namespace, name, "kubectl-patch", path, value)

    def kubectl_delete(self, kind: Kind, namespace: str, name: str) -> None:
        """``kubectl delete KIND NAME``."""
        self.delete(kind, namespace, name)

    def set_pods(self, outcome: PodOutcome, namespace: str, labels: Mapping[str, str]) -> None:
        """Make the pods carrying ``labels`` ready, starting or crashing from now on."""
        for key, pod in list(self.objects.items()):
            same = all(_labels(pod).get(a) == b for a, b in labels.items())
            if key[0] == "Pod" and key[1] == namespace and same:
                self._pod_status(pod, outcome)
        self._reconcile()

    def restart_containers(
        self, namespace: str, labels: Mapping[str, str], exit_code: int = 137
    ) -> None:
        """The kubelet restarts the containers of the pods carrying ``labels`` (they exited
        with ``exit_code`` or failed their liveness probe) and they come back Ready: only
        their ``restartCount`` and ``lastState`` tell."""
        for key, pod in list(self.objects.items()):
            same = all(_labels(pod).get(a) == b for a, b in labels.items())
            if key[0] == "Pod" and key[1] == namespace and same:
                for status in (pod.get("status") or {}).get("containerStatuses") or []:
                    status["restartCount"] = int(status.get("restartCount") or 0) + 1
                    status["lastState"] = {"terminated": {"exitCode": exit_code}}
        self._reconcile()

    # --- the server's own doing ------------------------------------------------------------

    def _existing(self, key: tuple[str, str, str]) -> dict[str, Any]:
        found = self.objects.get(key)
        if found is None:
            raise _error(NOT_FOUND, f"{key[0]} {key[1]}/{key[2]} not found")
        return found

    def _edit(
        self, kind: str, namespace: str, name: str, manager: str, path: Path, value: Any
    ) -> None:
        key = (kind, namespace, name)
        obj = self._existing(key)
        before = copy.deepcopy(obj)
        _set_path(obj, path, value)
        owners = self.owners.setdefault(key, {})
        for paths in owners.values():
            paths.discard(path)
        owners.setdefault(manager, set()).add(path)
        self._stamp(obj, before)
        self._reconcile()

    def _now(self) -> str:
        self._tick += 1
        return f"2026-01-01T00:{self._tick // 60 % 60:02d}:{self._tick % 60:02d}.{self._tick:06d}Z"

    def _stamp(self, obj: dict[str, Any], before: Mapping[str, Any] | None) -> None:
        meta = obj["metadata"]
        if before is None:
            meta["uid"] = hashlib.sha256(f"{self._tick}/{meta['name']}".encode()).hexdigest()[:32]
            meta["creationTimestamp"] = self._now()
            meta["generation"] = 1
        else:
            for key in ("uid", "creationTimestamp"):
                meta[key] = before["metadata"][key]
            changed = obj.get("spec") != before.get("spec")
            meta["generation"] = before["metadata"].get("generation", 1) + (1 if changed else 0)
        self._tick += 1
        meta["resourceVersion"] = str(self._tick)

    def _validate_new(self, obj: Mapping[str, Any]) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "Deployment":
            spec = obj.get("spec") or {}
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            template_labels = _labels(spec.get("template") or {})
            if not selector or not (spec.get("template") or {}).get("spec"):
                raise _error(
                    422, f"Deployment {name}: spec.selector and spec.template are required"
                )
            if any(template_labels.get(k) != v for k, v in selector.items()):
                raise _error(422, f"Deployment {name}: selector does not match template labels")

    def _default(self, obj: dict[str, Any], *, created: bool) -> None:
        kind = obj["kind"]
        if kind == "Deployment":
            if created:
                _set_default(obj, ("spec", "replicas"), 1)
            _set_default(obj, ("spec", "progressDeadlineSeconds"), 600)
            _set_default(obj, ("spec", "template", "spec", "restartPolicy"), "Always")
            _set_default(obj, ("spec", "template", "spec", "dnsPolicy"), "ClusterFirst")
            _set_default(obj, ("spec", "template", "spec", "schedulerName"), "default-scheduler")
            for container in obj["spec"]["template"]["spec"].get("containers") or []:
                container.setdefault("terminationMessagePath", "/dev/termination-log")
        elif kind == "Service":
            _set_default(obj, ("spec", "sessionAffinity"), "None")
            if _get_path(obj, ("spec", "clusterIP")) is None:
                count = sum(1 for k in self.objects if k[0] == "Service") + 10
                _set_path(obj, ("spec", "clusterIP"), f"10.96.0.{count}")
        elif kind == "Secret":
            data = obj.pop("stringData", None) or {}
            if data:
                obj.setdefault("data", {}).update({k: "(base64)" for k in data})

    # --- the Deployment controller -------------------------------------------------------

    def _pods_of(self, deployment: Mapping[str, Any]) -> list[dict[str, Any]]:
        namespace = deployment["metadata"]["namespace"]
        selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return [
            pod
            for (kind, ns, _name), pod in sorted(self.objects.items())
            if kind == "Pod"
            and ns == namespace
            and selector
            and all(_labels(pod).get(k) == v for k, v in selector.items())
        ]

    def _delete_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod["metadata"]
        self.objects.pop(("Pod", meta["namespace"], meta["name"]), None)

    def _pod_status(self, pod: dict[str, Any], outcome: PodOutcome) -> None:
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        restarts = int(statuses[0].get("restartCount") or 0)
        if outcome == "crash":
            state: dict[str, Any] = {
                "waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}
            }
            last = {"terminated": {"exitCode": 1}}
            phase, ready = "Running", False
            restarts += 1
        else:
            state, last = {"running": {}}, {}
            phase, ready = "Running", outcome == "ready"
        pod["status"] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": "app",
                    "ready": ready,
                    "restartCount": restarts,
                    "state": state,
                    "lastState": last,
                }
            ],
        }

    def _reconcile(self) -> None:
        for key, deployment in list(self.objects.items()):
            if key[0] == "Deployment":
                self._reconcile_one(deployment)

    def _reconcile_one(self, deployment: dict[str, Any]) -> None:
        spec = deployment.get("spec") or {}
        namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        replicas = int(spec.get("replicas") or 0)
        current_hash = _template_hash(deployment)
        pods = self._pods_of(deployment)
        current = [p for p in pods if _labels(p).get("pod-template-hash") == current_hash]
        old = [p for p in pods if p not in current]
        # scale down: not-ready first, then the newest
        surplus = len(current) - replicas
        if surplus > 0:
            order = sorted(current, key=lambda p: (_ready(p), p["metadata"]["creationTimestamp"]))
            for pod in order[:surplus]:
                self._delete_pod(pod)
                current.remove(pod)
        # scale up (maxSurge 1 while old pods remain)
        allowed = replicas - len(current) if not old else min(replicas - len(current), 1)
        for _ in range(max(0, allowed)):
            current.append(self._new_pod(deployment, current_hash))
        # retire old pods as current ones are ready (maxUnavailable 0)
        ready_current = sum(1 for p in current if _ready(p))
        for pod in sorted(old, key=lambda p: (_ready(p), p["metadata"]["creationTimestamp"])):
            if ready_current >= replicas or not _ready(pod):
                self._delete_pod(pod)
        pods = self._pods_of(deployment)
        ready = sum(1 for p in pods if _ready(p))
        deployment["status"] = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": sum(
                1 for p in pods if _labels(p).get("pod-template-hash") == current_hash
            ),
            "readyReplicas": ready,
            "availableReplicas": ready,
        }
        del namespace, name

    def _new_pod(self, deployment: Mapping[str, Any], template_hash: str) -> dict[str, Any]:
        namespace, name = deployment["metadata"]["namespace"], deployment["metadata"]["name"]
        template = copy.deepcopy((deployment.get("spec") or {}).get("template") or {})
        self._tick += 1
        pod_name = f"{name}-{template_hash}-{self._tick:05x}"
        meta = dict(template.get("metadata") or {})
        meta["labels"] = {**_labels(template), "pod-template-hash": template_hash}
        meta.update(name=pod_name, namespace=namespace, creationTimestamp=self._now())
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": f"{name}-{template_hash}"}]
        pod: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": template.get("spec") or {},
        }
        self._pod_status(pod, self.pod_outcome(pod))
        self.objects[("Pod", namespace, pod_name)] = pod
        self._logs[(namespace, pod_name)] = [f"pod {pod_name} started\n"]
        return pod


__all__ = ["FakeCluster", "PodOutcome"]
