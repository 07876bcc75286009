"""Releases: an image digest plus the fully resolved runtime config of one environment.

Owns how a spec and a digest become a :class:`Release` and how its id is derived (a hash of
both, so changing one env var makes a new release). Secret *values* never enter a release:
only references (``env:NAME`` / ``file:PATH``), resolved at deploy time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from castiron.drivers.kubernetes.manifests import KubernetesOptions
from castiron.errors import UsageError
from castiron.model import (
    HEALTH_KINDS,
    Digest,
    HealthCheck,
    HealthKind,
    Isolation,
    ReleaseId,
    RuntimeName,
)
from castiron.values import value

if TYPE_CHECKING:  # the schema (pydantic) is only needed when a spec is resolved
    from castiron.spec.schema import Kubernetes, SecretRef, Spec


@value
class ReleaseConfig:
    """Everything about how a release runs, except the image itself."""

    app: str
    environment: str
    runtime: RuntimeName
    replicas: int
    port: int
    env: tuple[tuple[str, str], ...]
    secrets: tuple[tuple[str, str], ...]
    """(NAME, reference) pairs: ``env:VAR``, ``file:PATH`` or ``tf:FILE#OUTPUT``; never
    values."""
    health: HealthCheck
    isolation: Isolation
    network: str
    writable: tuple[str, ...]
    memory: str | None
    cpus: float | None
    kubernetes: KubernetesOptions | None = None
    """Where the pods run (``runtime: kubernetes`` only; absent from the JSON otherwise, so
    the ids of other runtimes' releases do not depend on it)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples, dicts for pair lists)."""
        data = asdict(self)
        data["env"] = dict(self.env)
        data["secrets"] = dict(self.secrets)
        data["writable"] = list(self.writable)
        if self.kubernetes is None:
            del data["kubernetes"]
        else:
            data["kubernetes"] = self.kubernetes.to_json()
        return data


@value
class Release:
    """An image digest plus its resolved config; ``id`` is a hash of both."""

    id: ReleaseId
    digest: Digest
    config: ReleaseConfig

    @property
    def environment(self) -> str:
        return self.config.environment


def canonical_json(data: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def release_id(digest: Digest, config: ReleaseConfig) -> ReleaseId:
    """The id of the release made of ``digest`` and ``config``."""
    payload = canonical_json({"digest": digest, "config": config.to_json()})
    return ReleaseId(hashlib.sha256(payload).hexdigest()[:16])


def resolve_release(spec: Spec, environment: str, digest: Digest) -> Release:
    """Resolve ``environment`` of ``spec`` running image ``digest`` into a release.

    Raises:
        UsageError: when ``environment`` is not in the spec.
    """
    if environment not in spec.environments:
        known = ", ".join(sorted(spec.environments)) or "none"
        raise UsageError(f"no environment {environment!r} in the spec (known: {known})")
    config = release_config(spec, environment)
    return Release(id=release_id(digest, config), digest=digest, config=config)


def release_config(spec: Spec, environment: str) -> ReleaseConfig:
    """The config every release of ``environment`` of ``spec`` runs with (all but the image).

    Raises:
        KeyError: when ``environment`` is not in the spec.
    """
    env = spec.environments[environment]
    service = spec.service
    health = service.health
    kind: HealthKind
    if health.http is not None:
        kind, target = "http", health.http
    elif health.tcp:
        kind, target = "tcp", ""
    elif health.command is not None:
        kind, target = "command", json.dumps(list(health.command))
    else:
        kind, target = "none", ""
    merged_env = {**service.env, **env.env}
    secrets = {name: _secret_ref(spec, ref) for name, ref in service.secrets.items()}
    config = ReleaseConfig(
        app=spec.app,
        environment=environment,
        runtime=env.runtime,
        replicas=env.replicas if env.replicas is not None else service.replicas,
        port=service.port,
        env=tuple(sorted(merged_env.items())),
        secrets=tuple(sorted(secrets.items())),
        health=HealthCheck(
            kind=kind,
            target=target,
            interval=health.interval,
            timeout=health.timeout,
            healthy_after=health.healthy_after,
            start_period=health.start_period,
        ),
        isolation=env.isolation,
        network=env.network,
        writable=tuple(service.writable),
        memory=service.memory,
        cpus=service.cpus,
        kubernetes=_kubernetes_options(env.kubernetes) if env.runtime == "kubernetes" else None,
    )
    return config


def _secret_ref(spec: Spec, ref: SecretRef) -> str:
    """A secret's reference: ``env:VAR``, ``file:PATH`` or ``tf:OUTPUTS_FILE#OUTPUT``."""
    if ref.env is not None:
        return f"env:{ref.env}"
    if ref.tf is not None and spec.terraform is not None:
        return f"tf:{spec.terraform.outputs}#{ref.tf}"
    return f"file:{ref.file}"


def _kubernetes_options(section: Kubernetes | None) -> KubernetesOptions:
    if section is None:
        return KubernetesOptions()
    return KubernetesOptions(
        namespace=section.namespace,
        context=section.context,
        service_name=section.service.name or "",
        service_type=section.service.type,
        service_port=section.service.port,
        image_repository=section.image_repository,
        image_pull_secret=section.image_pull_secret,
        node_selector=tuple(sorted(section.node_selector.items())),
        cpu_request=section.resources.cpu,
        memory_request=section.resources.memory,
        gateway=section.gateway.name if section.gateway else None,
        gateway_namespace=section.gateway.namespace if section.gateway else None,
        route_name=(section.gateway.route or "") if section.gateway else "",
        hostnames=tuple(section.gateway.hostnames) if section.gateway else (),
    )


def release_from_json(data: dict[str, Any]) -> Release:
    """Rebuild a release stored with :func:`release_to_json`.

    Raises:
        UsageError: when the record does not describe a release, or its id does not match.
    """
    try:
        config = config_from_json(dict(data["config"]))
        release = Release(id=ReleaseId(data["id"]), digest=Digest(data["digest"]), config=config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"not a release record: {exc}") from exc
    if release_id(release.digest, config) != release.id:
        raise UsageError(f"release record {release.id} does not match its content")
    return release


def release_to_json(release: Release) -> dict[str, Any]:
    """A JSON-ready record of ``release``."""
    return {"id": release.id, "digest": release.digest, "config": release.config.to_json()}


def config_from_json(data: dict[str, Any]) -> ReleaseConfig:
    cfg = dict(data)
    cfg["env"] = tuple(sorted(dict(cfg["env"]).items()))
    cfg["secrets"] = tuple(sorted(dict(cfg["secrets"]).items()))
    cfg["writable"] = tuple(cfg["writable"])
    cfg["health"] = HealthCheck(**cfg["health"])
    if cfg["health"].kind not in HEALTH_KINDS:
        raise ValueError(f"health.kind {cfg['health'].kind!r}")
    if cfg.get("kubernetes") is not None:
        cfg["kubernetes"] = KubernetesOptions.from_json(cfg["kubernetes"])
    return ReleaseConfig(**cfg)
