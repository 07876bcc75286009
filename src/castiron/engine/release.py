"""Releases: an image digest plus the fully resolved runtime config of one environment.

Owns how a spec and a digest become a :class:`Release` and how its id is derived (a hash of
both, so changing one env var makes a new release). Secret *values* never enter a release:
only references (``env:NAME`` / ``file:PATH``), resolved at deploy time.

It also owns :class:`DeploySpec`, what deploying needs of a validated spec (plain frozen data),
and its cache (:func:`cached_deploy_spec`): validating a spec needs pydantic, whose import
and schema build cost more than the rest of a deployment's bookkeeping, so the result is kept
in a file keyed by the parsed spec with its environment-variable values masked (they are text
that validates alike, and they change on every deploy: ``APP_VERSION: ${APP_VERSION}``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.drivers.kubernetes.manifests import KubernetesOptions
from castiron.errors import UsageError
from castiron.filemodes import make_private_dir, open_private
from castiron.model import Digest, ReleaseId
from castiron.values import value

if TYPE_CHECKING:  # the schema (pydantic) is only needed when a spec is resolved
    from castiron.spec.load import LoadedSpec, ReadSpec
    from castiron.spec.schema import Kubernetes, Router, SecretRef, Spec


@value
class HealthConfig:
    """The resolved health check of a release."""

    kind: str
    """``http``, ``tcp``, ``command`` or ``none``."""
    target: str
    """The http path, or the command as a JSON list; empty for tcp/none."""
    interval: float
    timeout: float
    healthy_after: int
    start_period: float


@value
class ReleaseConfig:
    """Everything about how a release runs, except the image itself."""

    app: str
    environment: str
    runtime: str
    replicas: int
    port: int
    env: tuple[tuple[str, str], ...]
    secrets: tuple[tuple[str, str], ...]
    """(NAME, reference) pairs: ``env:VAR``, ``file:PATH`` or ``tf:FILE#OUTPUT``; never
    values."""
    health: HealthConfig
    isolation: str
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
        health=HealthConfig(
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
        config = _config_from_json(dict(data["config"]))
        release = Release(id=ReleaseId(data["id"]), digest=Digest(data["digest"]), config=config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"not a release record: {exc}") from exc
    if release_id(release.digest, config) != release.id:
        raise UsageError(f"release record {release.id} does not match its content")
    return release


def release_to_json(release: Release) -> dict[str, Any]:
    """A JSON-ready record of ``release``."""
    return {"id": release.id, "digest": release.digest, "config": release.config.to_json()}


# --- what deploying needs of a spec, and its cache ---------------------------------------------


@value
class EnvironmentDeploy:
    """What the spec says about deploying one environment."""

    config: ReleaseConfig
    """The config its releases run with (all but the image)."""
    listen: str
    strategy: str
    batch: int
    drain_timeout: float
    keep_warm: float
    deploy_timeout: float
    keep_warm_releases: int = 1
    canary: dict[str, Any] | None = None
    """The canary's steps, analysis and stickiness as JSON (see :mod:`castiron.engine.canary`)."""
    router: dict[str, Any] | None = None
    """The router's limits and access log switch as JSON (see :func:`router_json`)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (see :func:`release_from_json` for the config's form)."""
        return {**asdict(self), "config": self.config.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EnvironmentDeploy:
        """Rebuild :meth:`to_json` output.

        Raises:
            KeyError, TypeError, ValueError: when ``data`` is not such an object.
        """
        return cls(**{**dict(data), "config": _config_from_json(dict(data["config"]))})


@value
class DeploySpec:
    """What deploying needs of a validated spec: the app and, by name, each environment's
    release config and deployment settings. Plain data (no pydantic)."""

    app: str
    path: Path
    """Absolute path of the spec file (its directory anchors ``file:`` secrets)."""
    environments: Mapping[str, EnvironmentDeploy] = field(default_factory=dict)
    image: Mapping[str, Any] | None = None
    """The ``image:`` section as plain JSON (:func:`castiron.images.build.recipe_json`): what
    ``deploy`` needs to find the image baked from the current spec and context."""
    service_port: int = 8000
    """``service.port``: part of what a bake is made from."""

    @property
    def base_dir(self) -> Path:
        """The spec file's directory."""
        return self.path.parent


def default_deploy_timeout(health: HealthConfig) -> float:
    """How long a deployment waits for health when the spec does not say: the start period
    (where failures do not count) plus ``healthy_after`` + 2 probes of ``interval`` + ``timeout``
    each, so a slow but healthy app passes and a broken one fails soon after it may start."""
    return health.start_period + (health.healthy_after + 2) * (health.interval + health.timeout)


def router_json(router: Router) -> dict[str, Any]:
    """The router section as the JSON the engine records in an environment's policy (the
    field names of :class:`castiron.traffic.base.Limits`, plus ``access_log``)."""
    return {
        "max_body_bytes": router.max_body,
        "body_timeout": router.body_timeout,
        "max_connections": router.max_connections,
        "allow_get_body": router.allow_get_body,
        "access_log": router.access_log,
    }


def deploy_spec(loaded: LoadedSpec) -> DeploySpec:
    """What deploying needs of the validated spec ``loaded``."""
    from castiron.engine.canary import canary_json
    from castiron.images.build import recipe_json

    spec = loaded.spec
    return DeploySpec(
        app=spec.app,
        path=loaded.path,
        image=recipe_json(spec.image),
        service_port=spec.service.port,
        environments={
            name: EnvironmentDeploy(
                config=release_config(spec, name),
                listen=env.listen,
                strategy=env.strategy.type,
                batch=env.strategy.batch,
                drain_timeout=env.drain_timeout,
                keep_warm=env.keep_warm,
                keep_warm_releases=env.keep_warm_releases,
                deploy_timeout=(
                    env.deploy_timeout
                    if env.deploy_timeout is not None
                    else default_deploy_timeout(release_config(spec, name).health)
                ),
                canary=canary_json(env.strategy),
                router=router_json(env.router),
            )
            for name, env in spec.environments.items()
        },
    )


_MASK = "\x00castiron:env-value\x00"
"""Stands for every text value of an environment-variable map in a cache key."""

_SOURCES = (
    "spec/schema.py",
    "spec/load.py",
    "spec/tfoutputs.py",
    "engine/release.py",
    "engine/canary.py",
)
"""Modules whose code decides what a spec validates to: a change to one voids the cache."""


def cached_deploy_spec(path: Path, environ: Mapping[str, str], cache_dir: Path) -> DeploySpec:
    """:func:`deploy_spec` of the spec file at ``path`` (``environ`` for ``${VAR}``), with
    the validation result cached in ``cache_dir``.

    The file is parsed and interpolated every time; validation (pydantic) runs only when the
    parsed values, with the text values of environment-variable maps masked, differ from the
    cached ones. Those values are text wherever they are, so they validate alike; they are
    taken from this parse, never from the cache. A cache that cannot be read or written is
    ignored: the spec is then validated as without one.

    Raises:
        SpecError: when the spec cannot be read or does not validate (every issue found).
    """
    from castiron.spec.load import load_spec, read_spec

    read = read_spec(path, environ)
    key = _cache_key(read) if read.clean else None
    entry = cache_dir / f"spec-{hashlib.sha256(str(read.path).encode()).hexdigest()[:16]}.json"
    if key is not None:
        cached = _cached(entry, key, read)
        if cached is not None:
            return cached
    result = deploy_spec(load_spec(path, environ))
    if key is not None:
        _store(entry, key, result)
    return result


def _cache_key(read: ReadSpec) -> str | None:
    masked = json.loads(json.dumps(read.value))  # a deep copy of plain JSON values
    for path, _ in read.env_maps():
        node: Any = masked
        for part in path:
            node = node[part]
        for name, item in node.items():
            if not isinstance(item, str):
                return None  # not text: validation decides, every time
            node[name] = _MASK
    from castiron import __version__

    here = Path(__file__).resolve().parent.parent
    stamps = []
    for source in _SOURCES:
        try:
            st = os.stat(here / source)
        except OSError:
            return None
        stamps.append([source, st.st_mtime_ns, st.st_size])
    payload = {"version": __version__, "sources": stamps, "path": str(read.path), "v": masked}
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _cached(entry: Path, key: str, read: ReadSpec) -> DeploySpec | None:
    try:
        data = json.loads(entry.read_bytes())
        if data.get("key") != key:
            return None
        service_env = dict(read.value.get("service", {}).get("env", {}))
        environments: dict[str, EnvironmentDeploy] = {}
        for name, item in data["environments"].items():
            cached = EnvironmentDeploy.from_json(item)
            env = {**service_env, **dict(read.value["environments"][name].get("env", {}))}
            config = replace(cached.config, env=tuple(sorted(env.items())))
            environments[name] = replace(cached, config=config)
        image = dict(data["image"])
        raw_image = read.value.get("image", {})
        for name in ("env", "labels"):  # text values come from this parse, as for env above
            image[name] = dict(raw_image.get(name, {}))
        return DeploySpec(
            app=str(data["app"]),
            path=read.path,
            environments=environments,
            image=image,
            service_port=int(data["service_port"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _store(entry: Path, key: str, result: DeploySpec) -> None:
    data = {
        "key": key,
        "app": result.app,
        "image": {**(result.image or {}), "env": {}, "labels": {}},
        "service_port": result.service_port,
        "environments": {
            name: {**env.to_json(), "config": {**env.config.to_json(), "env": {}}}
            for name, env in result.environments.items()
        },
    }
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        # Only beside existing state: the state directory is created (0700) by the store.
        if entry.parent.parent.is_dir():
            make_private_dir(entry.parent)
        fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(fd, "wb") as out:
            out.write(canonical_json(data))
        os.replace(tmp, entry)


def _config_from_json(data: dict[str, Any]) -> ReleaseConfig:
    cfg = dict(data)
    cfg["env"] = tuple(sorted(dict(cfg["env"]).items()))
    cfg["secrets"] = tuple(sorted(dict(cfg["secrets"]).items()))
    cfg["writable"] = tuple(cfg["writable"])
    cfg["health"] = HealthConfig(**cfg["health"])
    if cfg.get("kubernetes") is not None:
        cfg["kubernetes"] = KubernetesOptions.from_json(cfg["kubernetes"])
    return ReleaseConfig(**cfg)
