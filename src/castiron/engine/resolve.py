"""The resolved spec: everything the engine needs of ``castiron.yaml``, resolved once, at the edge.

Owns :class:`ResolvedSpec` and, per environment, :class:`ResolvedEnvironment`: the release
config (all but the image), the deployment settings, the gates (:class:`GatePolicy`), the
canary (:class:`CanaryConfig`) and the drift rules (:class:`DriftRules`) — plain frozen data
(no pydantic). The edges (CLI, API, Terraform provider) resolve the spec file once with
:func:`cached_resolve_spec` and hand the result down; nothing below reads the file again.

Validating a spec needs pydantic, whose import and schema build cost more than the rest of a
deployment's bookkeeping, so the whole resolved spec is kept in one cache file keyed by
content: the parsed spec with its environment-variable values masked (they are text that
validates alike, and they change on every deploy: ``APP_VERSION: ${APP_VERSION}``), the
castiron version and a hash of the code that decides what a spec resolves to.

It knows nothing of the CLI, of the state store's contents or of any runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from castiron.engine.release import (
    ReleaseConfig,
    canonical_json,
    config_from_json,
    release_config,
)
from castiron.errors import UsageError
from castiron.filemodes import make_private_dir, open_private
from castiron.model import HealthCheck
from castiron.traffic.base import Stickiness
from castiron.values import value

if TYPE_CHECKING:  # the schema (pydantic) is only needed when a spec is resolved
    from castiron.spec.load import LoadedSpec, ReadSpec
    from castiron.spec.schema import Router, Spec, Strategy
    from castiron.state.base import StateStore

GateName = Literal["require_signature", "promote_from", "soak", "approvals", "checks"]
GATES: tuple[GateName, ...] = ("require_signature", "promote_from", "soak", "approvals", "checks")
"""Every gate, in the order they are evaluated."""

StrategyName = Literal["blue-green", "rolling", "canary"]
"""The deployment strategies (``strategy.type``)."""

STRATEGY_NAMES: tuple[StrategyName, ...] = ("blue-green", "rolling", "canary")


# --- the canary -------------------------------------------------------------------------------


@value
class CanaryStep:
    """Send ``weight`` percent of requests to the canary, then hold for ``pause`` seconds
    (None: until ``castiron deploy ENV --continue``)."""

    weight: int
    pause: float | None


@value
class PrometheusQuery:
    """An instant query whose value (every sample of a vector) must be at most ``max``."""

    url: str
    query: str
    max: float


@value
class AnalysisLimits:
    """What a step's window must show before the canary may go on."""

    max_error_rate: float | None = None
    max_p95_ms: float | None = None
    min_requests: int = 20
    http: tuple[str, ...] = ()
    prometheus: tuple[PrometheusQuery, ...] = ()


@value
class CanaryConfig:
    """An environment's canary: its steps, analysis and stickiness."""

    steps: tuple[CanaryStep, ...]
    analysis: AnalysisLimits | None = None
    sticky: Stickiness | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the form kept with the environment's policy)."""
        analysis = None
        if self.analysis is not None:
            a = self.analysis
            analysis = {
                "max_error_rate": a.max_error_rate,
                "max_p95_ms": a.max_p95_ms,
                "min_requests": a.min_requests,
                "http": list(a.http),
                "prometheus": [
                    {"url": p.url, "query": p.query, "max": p.max} for p in a.prometheus
                ],
            }
        return {
            "steps": [
                {"weight": s.weight, "pause": "manual" if s.pause is None else s.pause}
                for s in self.steps
            ],
            "analysis": analysis,
            "sticky": None
            if self.sticky is None
            else {"kind": self.sticky.kind, "name": self.sticky.name},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "canary") -> CanaryConfig:
        """The config recorded as ``data``.

        Raises:
            UsageError: when ``data`` does not describe a canary (naming ``where``).
        """
        try:
            steps = tuple(
                CanaryStep(
                    weight=int(s["weight"]),
                    pause=None if s["pause"] == "manual" else float(s["pause"]),
                )
                for s in data["steps"]
            )
            analysis = None
            if data.get("analysis") is not None:
                a = data["analysis"]
                analysis = AnalysisLimits(
                    max_error_rate=_opt_float(a.get("max_error_rate")),
                    max_p95_ms=_opt_float(a.get("max_p95_ms")),
                    min_requests=int(a.get("min_requests", 20)),
                    http=tuple(str(p) for p in a.get("http", ())),
                    prometheus=tuple(
                        PrometheusQuery(str(p["url"]), str(p["query"]), float(p["max"]))
                        for p in a.get("prometheus", ())
                    ),
                )
            sticky = None
            if data.get("sticky") is not None:
                kind = str(data["sticky"]["kind"])
                if kind not in ("cookie", "header"):
                    raise ValueError(f"sticky.kind {kind!r}")
                sticky = Stickiness(
                    "cookie" if kind == "cookie" else "header", data["sticky"]["name"]
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{where}: not a canary configuration ({exc})") from exc
        if not steps or any(not 0 <= s.weight <= 100 for s in steps):
            raise UsageError(f"{where}: a canary needs steps with weights from 0 to 100")
        return cls(steps, analysis, sticky)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def canary_json(strategy: Strategy) -> dict[str, Any] | None:
    """The recorded form of a validated ``strategy:`` (None unless it is a canary)."""
    config = canary_config(strategy)
    return None if config is None else config.to_json()


def canary_config(strategy: Strategy) -> CanaryConfig | None:
    """The canary of a validated ``strategy:`` (None unless it is a canary)."""
    if strategy.type != "canary":
        return None
    analysis = None
    if strategy.analysis is not None:
        a = strategy.analysis
        analysis = AnalysisLimits(
            max_error_rate=a.max_error_rate,
            max_p95_ms=a.max_p95_ms,
            min_requests=a.min_requests,
            http=tuple(a.http),
            prometheus=tuple(PrometheusQuery(p.url, p.query, p.max) for p in a.prometheus),
        )
    sticky = None
    if strategy.sticky is not None:
        s = strategy.sticky
        sticky = (
            Stickiness("cookie", s.cookie)
            if s.cookie is not None
            else Stickiness("header", s.header or "")
        )
    steps = tuple(
        CanaryStep(s.weight, None if s.pause == "manual" else float(s.pause))
        for s in strategy.steps
    )
    return CanaryConfig(steps, analysis, sticky)


# --- the gates --------------------------------------------------------------------------------


@value
class GatePolicy:
    """The gates of one environment, as its spec states them."""

    environment: str
    listen: str
    """The environment's own listen address (``${URL}`` of checks when there is no source)."""
    base_dir: Path
    """The spec's directory: key paths and check commands are relative to it."""
    source: str | None = None
    """Where releases come from (``promote_from``), if anywhere."""
    source_listen: str | None = None
    """The source environment's listen address, as the spec states it."""
    soak: float | None = None
    require_signature: bool | tuple[str, ...] = False
    checks: tuple[tuple[str, ...], ...] = ()
    approvals: int = 0
    approvers: tuple[str, ...] = ()
    """Public key files (relative to ``base_dir``) whose signed approvals count."""

    @property
    def active(self) -> list[GateName]:
        """The gates that apply, in evaluation order."""
        on: list[GateName] = []
        if self.require_signature:
            on.append("require_signature")
        if self.source is not None:
            on.append("promote_from")
            if self.soak:
                on.append("soak")
        if self.approvals > 0:
            on.append("approvals")
        if self.checks:
            on.append("checks")
        return on

    def check_url(self, store: StateStore | None = None) -> str:
        """``http://HOST:PORT`` the checks run against: the source environment's address
        (as recorded when it was deployed, else as the spec states it), else this one's."""
        listen = self.listen
        if self.source is not None:
            row = store.get_environment(self.source) if store is not None else None
            listen = row.listen if row is not None else (self.source_listen or self.listen)
        return f"http://{listen}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "environment": self.environment,
            "source": self.source,
            "soak_s": self.soak,
            "require_signature": (
                list(self.require_signature)
                if isinstance(self.require_signature, tuple)
                else self.require_signature
            ),
            "checks": [list(c) for c in self.checks],
            "approvals": self.approvals,
            "approvers": list(self.approvers),
            "active": list(self.active),
        }


def gates_of(spec: Spec, environment: str, base_dir: Path) -> GatePolicy:
    """The gates of ``environment`` of the validated ``spec``.

    Raises:
        KeyError: when ``environment`` is not in the spec.
    """
    env = spec.environments[environment]
    source = env.promote_from
    return GatePolicy(
        environment=environment,
        listen=env.listen,
        base_dir=base_dir,
        source=source,
        source_listen=spec.environments[source].listen if source in spec.environments else None,
        soak=env.policy.soak,
        require_signature=env.policy.require_signature,
        checks=env.policy.checks,
        approvals=env.policy.approvals,
        approvers=env.policy.approvers,
    )


def gates_from_json(data: Mapping[str, Any], base_dir: Path) -> GatePolicy:
    """Rebuild the gates kept in the cache (:func:`dataclasses.asdict` without ``base_dir``).

    Raises:
        KeyError, TypeError, ValueError: when ``data`` is not such an object.
    """
    signature = data["require_signature"]
    return GatePolicy(
        environment=str(data["environment"]),
        listen=str(data["listen"]),
        base_dir=base_dir,
        source=data["source"],
        source_listen=data["source_listen"],
        soak=data["soak"],
        require_signature=tuple(signature) if isinstance(signature, list) else bool(signature),
        checks=tuple(tuple(str(a) for a in c) for c in data["checks"]),
        approvals=int(data["approvals"]),
        approvers=tuple(str(a) for a in data["approvers"]),
    )


# --- drift -----------------------------------------------------------------------------------


@value
class DriftRules:
    """What the spec's ``drift`` section says for one environment."""

    watch: float | None = None
    """Seconds between the agent's checks (None: only on demand)."""
    fix: bool = False
    """Whether the agent's checks fix what they find."""
    ignore: tuple[str, ...] = ()
    """Gitignore-style patterns of paths whose changes are not drift."""


# --- the resolved spec -------------------------------------------------------------------


@value
class DeploySettings:
    """How an environment's deployments run. One value: the resolved environment holds it, and
    the policy recorded with each environment (for rollback, recovery and ``down``, which need
    no spec file) holds the same value."""

    strategy: StrategyName = "blue-green"
    batch: int = 1
    drain_timeout: float = 30.0
    keep_warm: float = 600.0
    deploy_timeout: float = 60.0
    keep_warm_releases: int = 1
    """Previous releases kept warm at most (older warm instances are destroyed)."""
    canary: CanaryConfig | None = None
    """The canary's steps, analysis and stickiness (``strategy.type: canary`` only)."""
    router: Mapping[str, Any] | None = None
    """The router's limits and access log switch as JSON (see :func:`router_json`); None:
    the defaults."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (flat: the keys sit beside the policy's or environment's own)."""
        return {
            "strategy": self.strategy,
            "batch": self.batch,
            "drain_timeout": self.drain_timeout,
            "keep_warm": self.keep_warm,
            "keep_warm_releases": self.keep_warm_releases,
            "deploy_timeout": self.deploy_timeout,
            "canary": None if self.canary is None else self.canary.to_json(),
            "router": None if self.router is None else dict(self.router),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeploySettings:
        """The settings among ``data``'s keys (other keys ignored, missing ones defaulted); a
        damaged canary section reads as none (a canary then refuses to run without it)."""
        known = {k: data[k] for k in _SETTINGS_FIELDS if k in data}
        canary = known.get("canary")
        if canary is not None:
            try:
                known["canary"] = CanaryConfig.from_json(canary)
            except UsageError:
                known["canary"] = None
        return cls(**known)


_SETTINGS_FIELDS = (
    "strategy",
    "batch",
    "drain_timeout",
    "keep_warm",
    "deploy_timeout",
    "keep_warm_releases",
    "canary",
    "router",
)


class SettingsView:
    """Read access to the :class:`DeploySettings` a value holds as ``settings``."""

    settings: DeploySettings

    @property
    def strategy(self) -> StrategyName:
        return self.settings.strategy

    @property
    def batch(self) -> int:
        return self.settings.batch

    @property
    def drain_timeout(self) -> float:
        return self.settings.drain_timeout

    @property
    def keep_warm(self) -> float:
        return self.settings.keep_warm

    @property
    def deploy_timeout(self) -> float:
        return self.settings.deploy_timeout

    @property
    def keep_warm_releases(self) -> int:
        return self.settings.keep_warm_releases

    @property
    def canary(self) -> CanaryConfig | None:
        return self.settings.canary

    @property
    def router(self) -> Mapping[str, Any] | None:
        return self.settings.router


@value
class ResolvedEnvironment(SettingsView):
    """Everything the spec says about one environment, resolved."""

    config: ReleaseConfig
    """The config its releases run with (all but the image)."""
    listen: str
    gates: GatePolicy
    """The gates a change must pass before any instance is created."""
    settings: DeploySettings = field(default_factory=DeploySettings)
    """How its deployments run (strategy, batch, timeouts, keep-warm, canary, router)."""
    drift: DriftRules = field(default_factory=DriftRules)
    """The ``drift`` section: watch schedule, fix, ignore patterns."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, the form of the cache (the gates without ``base_dir``)."""
        gates = asdict(self.gates)
        del gates["base_dir"]
        return {
            "config": self.config.to_json(),
            "listen": self.listen,
            "gates": gates,
            **self.settings.to_json(),
            "drift": asdict(self.drift),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], base_dir: Path) -> ResolvedEnvironment:
        """Rebuild :meth:`to_json` output (``base_dir`` anchors the gates).

        Raises:
            KeyError, TypeError, ValueError, UsageError: when ``data`` is not such an object.
        """
        drift = data["drift"]
        canary = data["canary"]
        return cls(
            config=config_from_json(dict(data["config"])),
            listen=str(data["listen"]),
            gates=gates_from_json(data["gates"], base_dir),
            settings=DeploySettings(
                **{k: data[k] for k in _SETTINGS_FIELDS if k != "canary"},
                canary=None if canary is None else CanaryConfig.from_json(canary),
            ),
            drift=DriftRules(
                watch=drift["watch"], fix=bool(drift["fix"]), ignore=tuple(drift["ignore"])
            ),
        )


@value
class ResolvedSpec:
    """The validated spec, resolved: the app, the image recipe and, by name, each
    environment. Plain data (no pydantic)."""

    app: str
    path: Path
    """Absolute path of the spec file (its directory anchors ``file:`` secrets, key paths
    and check commands)."""
    environments: Mapping[str, ResolvedEnvironment] = field(default_factory=dict)
    image: Mapping[str, Any] | None = None
    """The ``image:`` section as plain JSON (:func:`castiron.images.build.recipe_json`): what
    ``deploy`` needs to find the image baked from the current spec and context."""
    service_port: int = 8000
    """``service.port``: part of what a bake is made from."""

    @property
    def base_dir(self) -> Path:
        """The spec file's directory."""
        return self.path.parent

    def environment(self, name: str) -> ResolvedEnvironment:
        """The environment called ``name``.

        Raises:
            UsageError: when the spec has no such environment.
        """
        env = self.environments.get(name)
        if env is None:
            known = ", ".join(sorted(self.environments)) or "none"
            raise UsageError(f"no environment {name!r} in {self.path} (known: {known})")
        return env


def default_deploy_timeout(health: HealthCheck) -> float:
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


def resolve_spec(loaded: LoadedSpec) -> ResolvedSpec:
    """The validated spec ``loaded``, resolved."""
    from castiron.images.build import recipe_json

    spec = loaded.spec
    environments: dict[str, ResolvedEnvironment] = {}
    for name, env in spec.environments.items():
        config = release_config(spec, name)
        environments[name] = ResolvedEnvironment(
            config=config,
            listen=env.listen,
            gates=gates_of(spec, name, loaded.base_dir),
            settings=DeploySettings(
                strategy=env.strategy.type,
                batch=env.strategy.batch,
                drain_timeout=env.drain_timeout,
                keep_warm=env.keep_warm,
                keep_warm_releases=env.keep_warm_releases,
                deploy_timeout=(
                    env.deploy_timeout
                    if env.deploy_timeout is not None
                    else default_deploy_timeout(config.health)
                ),
                canary=canary_config(env.strategy),
                router=router_json(env.router),
            ),
            drift=DriftRules(watch=env.drift.watch, fix=env.drift.fix, ignore=env.drift.ignore),
        )
    return ResolvedSpec(
        app=spec.app,
        path=loaded.path,
        image=recipe_json(spec.image),
        service_port=spec.service.port,
        environments=environments,
    )


# --- the cache ------------------------------------------------------------------------------

_MASK = "\x00castiron:env-value\x00"
"""Stands for every text value of an environment-variable map in a cache key."""

_SOURCES = (
    "spec/schema.py",
    "spec/load.py",
    "spec/tfoutputs.py",
    "engine/release.py",
    "engine/resolve.py",
)
"""Modules whose code decides what a spec resolves to: a change to one voids the cache."""

_code_hash: str | None = None


def cached_resolve_spec(path: Path, environ: Mapping[str, str], cache_dir: Path) -> ResolvedSpec:
    """:func:`resolve_spec` of the spec file at ``path`` (``environ`` for ``${VAR}``), with
    the result cached in ``cache_dir``.

    The file is parsed and interpolated every time; validation (pydantic) runs only when the
    parsed values, with the text values of environment-variable maps masked, differ from the
    cached ones. Those values are text wherever they are, so they validate alike; they are
    taken from this parse, never from the cache. A cache that cannot be read or written is
    ignored: the spec is then resolved as without one.

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
    result = resolve_spec(load_spec(path, environ))
    if key is not None:
        _store(entry, key, result)
    return result


def _resolving_code() -> str | None:
    """A hash of the bytes of the modules that decide what a spec resolves to (None when one
    cannot be read); computed once per process."""
    global _code_hash
    if _code_hash is None:
        here = Path(__file__).resolve().parent.parent
        digest = hashlib.sha256()
        try:
            for source in _SOURCES:
                digest.update(source.encode() + b"\0" + (here / source).read_bytes())
        except OSError:
            return None
        _code_hash = digest.hexdigest()
    return _code_hash


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

    code = _resolving_code()
    if code is None:
        return None
    payload = {"version": __version__, "code": code, "path": str(read.path), "v": masked}
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _cached(entry: Path, key: str, read: ReadSpec) -> ResolvedSpec | None:
    try:
        data = json.loads(entry.read_bytes())
        if data.get("key") != key:
            return None
        service_env = dict(read.value.get("service", {}).get("env", {}))
        environments: dict[str, ResolvedEnvironment] = {}
        for name, item in data["environments"].items():
            cached = ResolvedEnvironment.from_json(item, read.path.parent)
            env = {**service_env, **dict(read.value["environments"][name].get("env", {}))}
            config = replace(cached.config, env=tuple(sorted(env.items())))
            environments[name] = replace(cached, config=config)
        image = dict(data["image"])
        raw_image = read.value.get("image", {})
        for name in ("env", "labels"):  # text values come from this parse, as for env above
            image[name] = dict(raw_image.get(name, {}))
        return ResolvedSpec(
            app=str(data["app"]),
            path=read.path,
            environments=environments,
            image=image,
            service_port=int(data["service_port"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError):
        return None


def _store(entry: Path, key: str, result: ResolvedSpec) -> None:
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


__all__ = [
    "GATES",
    "STRATEGY_NAMES",
    "AnalysisLimits",
    "CanaryConfig",
    "CanaryStep",
    "DriftRules",
    "GateName",
    "GatePolicy",
    "PrometheusQuery",
    "ResolvedEnvironment",
    "ResolvedSpec",
    "StrategyName",
    "cached_resolve_spec",
    "canary_config",
    "default_deploy_timeout",
    "gates_of",
    "resolve_spec",
    "router_json",
]
