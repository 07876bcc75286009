"""Kubernetes manifests of a release, for GitOps (``castiron export ENV --format kubernetes``).

Owns turning a resolved release of a ``runtime: kubernetes`` environment into the objects a
GitOps tool (Argo CD, Flux) applies: one Deployment of the release (all its replicas, named by
the release id) and the environment's stable Service selecting it, built by the same pure
builders the driver uses, and serialized with sorted keys: the same release gives the same
bytes. Secret values are never exported: the Deployment reads them from a Secret named
``<deployment>-secrets`` that the user provides (its keys are listed in the output's header).

It writes nothing and talks to no cluster; it knows nothing of click.
"""

from __future__ import annotations

from castiron.drivers.kubernetes.manifests import (
    KubernetesOptions,
    deployment,
    dump,
    secret_name,
    service,
)
from castiron.engine.deploy import Engine
from castiron.engine.release import Release
from castiron.engine.resolve import ResolvedSpec
from castiron.engine.targets import image_runtime
from castiron.errors import UsageError
from castiron.model import ImageRef, InstanceSpec


def export_name(release: Release) -> str:
    """The exported Deployment's name: ``APP-ENV-<release id>``, cut to 63 characters."""
    cfg = release.config
    prefix = f"{cfg.app}-{cfg.environment}"[: 63 - 17].rstrip("-")
    return f"{prefix}-{release.id}"


def kubernetes_manifests(
    engine: Engine, spec: ResolvedSpec, environment: str, image: str | None = None
) -> tuple[Release, str]:
    """The release ``environment`` would run with ``image`` (default: the newest baked image
    of the app), and its manifests as a document stream.

    Raises:
        UsageError: unknown environment, no image, or an environment not on Kubernetes.
        NotFoundError: when ``image`` names nothing in the store.
        RuntimeDriverError: when a value cannot be expressed (memory, cpus, writable).
    """
    target = engine.resolve(spec, environment, image)
    release = target.release
    cfg = release.config
    if cfg.runtime != "kubernetes":
        raise UsageError(
            f"environment {environment!r} runs on {cfg.runtime}, not kubernetes: "
            "nothing to export as Kubernetes manifests"
        )
    options = cfg.kubernetes or KubernetesOptions()
    runtime = image_runtime(engine.images, release.digest)
    stored = engine.images.image(release.digest)
    name = export_name(release)
    secret_names = frozenset(n for n, _ in cfg.secrets)
    instance = InstanceSpec(
        id=name,
        app=cfg.app,
        environment=environment,
        release=release.id,
        image=ImageRef(release.digest, stored.config_digest, engine.images.root),
        command=runtime.command,
        env={**dict(runtime.env), **dict(cfg.env), **dict.fromkeys(secret_names, "")},
        workdir=runtime.workdir,
        port=cfg.port,
        user=runtime.user,
        secret_names=secret_names,
        writable=cfg.writable,
        memory=cfg.memory,
        cpus=cfg.cpus,
        health=cfg.health,
    )
    objects = [
        deployment(instance, options, replicas=cfg.replicas),
        service(cfg.app, environment, release.id, cfg.port, options),
    ]
    header = f"# castiron release {release.id} of {cfg.app}/{environment}, image {release.digest}\n"
    if secret_names:
        header += (
            f"# secrets: provide Secret {options.namespace}/{secret_name(name)} with keys "
            f"{', '.join(sorted(secret_names))}\n"
        )
    return release, header + dump(objects)


__all__ = ["export_name", "kubernetes_manifests"]
