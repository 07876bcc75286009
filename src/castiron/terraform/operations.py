"""What the Terraform provider does, as plain data in and plain data out.

Owns the meaning of the provider's resource and data sources in castiron's words: the
arguments of a ``castiron_deployment`` (:class:`DeploymentArgs`), what planning one resolves
(the digest and release id a deployment would run), deploying it (a castiron deployment by
replacement with the environment's strategy, or a promotion), observing what really runs
(release, digest, drift findings), taking it down, importing an environment, and the facts
of the ``castiron_image`` and ``castiron_environment`` data sources.

It calls the library like the CLI does and knows nothing of the plugin protocol: the ``tf``
framework is imported only by :mod:`castiron.terraform.provider`. Failures are the library's
:class:`~castiron.errors.CastironError` subclasses, unchanged, so their text reaches
Terraform's diagnostics as the CLI would print it. It prints nothing and does not read the
process environment (the caller passes it in).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.errors import NotFoundError, UsageError
from castiron.settings import Settings, load_settings

if TYPE_CHECKING:
    from castiron.engine.deploy import Engine, Target
    from castiron.engine.drift import DriftFinding
    from castiron.engine.promote import Promotion
    from castiron.engine.resolve import DriftRules, ResolvedSpec

IMPORT_SEPARATOR = "#"
"""Separates the spec path from the environment in an import id (``castiron.yaml#staging``)."""


@dataclass(frozen=True)
class DeploymentArgs:
    """The arguments of one ``castiron_deployment`` resource."""

    spec: str
    """The spec file, as written in the configuration (relative to Terraform's directory)."""
    environment: str
    """The environment of the spec to deploy."""
    image: str | None = None
    """A tag, digest or unique digest prefix (None: the newest baked image of the app)."""
    promote_from: str | None = None
    """Deploy by promotion: the release this environment of the spec serves (its digest)."""
    replicas: int | None = None
    """Overrides the environment's replicas."""
    env: Mapping[str, str] = field(default_factory=dict)
    """Environment variables merged over the environment's own (never secrets)."""


@dataclass(frozen=True)
class Planned:
    """What deploying a :class:`DeploymentArgs` would run, resolved before anything acts."""

    release: str
    digest: str
    url: str
    changes: bool
    """False when the environment already serves this release."""


@dataclass(frozen=True)
class Observed:
    """What an environment really runs."""

    release: str
    digest: str
    url: str
    deployed_at: str | None
    drift: tuple[str, ...]
    """One line per drift finding (empty: what runs is what the release says)."""
    tag: str | None = None
    """The newest tag bound to the digest (None: untagged)."""


def settings_for(environ: Mapping[str, str], spec: str, home: str | None) -> Settings:
    """castiron's settings for the spec file ``spec`` with state in ``home`` (None: as the CLI
    finds it, from ``$CASTIRON_HOME`` or beside the spec)."""
    return load_settings(environ, spec_path=Path(spec), home=Path(home) if home else None)


def _resolved_spec(settings: Settings, args: DeploymentArgs) -> ResolvedSpec:
    """The settings' spec with ``args``'s overrides applied to its environment.

    Raises:
        SpecError: when the spec cannot be read or does not validate.
        UsageError: when the environment is not in the spec, or an override is invalid.
    """
    from castiron.compose import resolved_spec

    spec = resolved_spec(settings)
    env = spec.environment(args.environment)
    if args.replicas is None and not args.env:
        return spec
    config = env.config
    if args.replicas is not None:
        if not 1 <= args.replicas <= 1000:
            raise UsageError(f"replicas: must be between 1 and 1000 (got {args.replicas})")
        config = replace(config, replicas=args.replicas)
    if args.env:
        merged = {**dict(config.env), **dict(args.env)}
        config = replace(config, env=tuple(sorted(merged.items())))
    environments = {**spec.environments, args.environment: replace(env, config=config)}
    return replace(spec, environments=environments)


def _target(
    engine: Engine, settings: Settings, args: DeploymentArgs
) -> tuple[Target, Promotion | None]:
    """The target deploying ``args`` resolves to, and the promotion when ``promote_from``.

    Raises:
        SpecError, UsageError, NotFoundError: see :meth:`Engine.resolve` and
            :func:`castiron.engine.promote.prepare`.
    """
    spec = _resolved_spec(settings, args)
    if args.promote_from is None:
        return engine.resolve(spec, args.environment, args.image), None
    from castiron.engine.promote import prepare

    promotion = prepare(engine.context, spec, args.promote_from, args.environment)
    if args.image is not None:
        wanted = engine.images.resolve(args.image)
        if wanted != promotion.target.release.digest:
            raise UsageError(
                f"image {args.image} is not what {args.promote_from} serves "
                f"({promotion.target.release.digest}): deploy it to {args.promote_from} first"
            )
    return promotion.target, promotion


def _url(listen: str) -> str:
    return f"http://{listen}/"


def plan(settings: Settings, args: DeploymentArgs) -> Planned:
    """What deploying ``args`` would run (reads state and the image store; changes nothing).

    Raises:
        SpecError, UsageError, NotFoundError: when the spec, environment or image is wrong.
    """
    from castiron.compose import open_engine

    with open_engine(settings, start_agent=False) as engine:
        if args.promote_from is not None and args.image is not None:
            # The release a promotion of this digest will deploy: the source may only serve
            # it once an earlier step of the same apply has deployed it there.
            spec = _resolved_spec(settings, args)
            target = engine.resolve(spec, args.environment, args.image)
        else:
            target, _ = _target(engine, settings, args)
        changes = engine.plan(target).has_changes
    return Planned(
        release=target.release.id,
        digest=target.release.digest,
        url=_url(target.policy.listen),
        changes=changes,
    )


def deploy(settings: Settings, args: DeploymentArgs, *, fix_drift: bool = False) -> Observed:
    """Deploy ``args`` (a deployment by replacement, or a promotion through the gates); when
    the environment already serves that release and ``fix_drift``, replace what drifted.

    Raises:
        SpecError, UsageError, NotFoundError: when the spec, environment or image is wrong.
        PolicyRefusedError: when a gate refuses (nothing was created).
        DeployFailedError: when the new instances failed their health gate (undone; the old
            release still serves).
        LockedError, RuntimeDriverError, RouterError, AgentError, StateError: as
            :meth:`Engine.deploy`.
    """
    from castiron.compose import drift_dir, open_engine

    with open_engine(settings) as engine:
        target, promotion = _target(engine, settings, args)
        if promotion is not None:
            from castiron.engine.promote import promote

            promote(engine.context, promotion)
        else:
            # The provider's scans report and fix drift on Terraform's terms: no agent watch.
            engine.deploy(replace(target, drift=None))
        if fix_drift:
            from castiron.engine.drift import fix_drift as fix

            fix(
                engine.context,
                args.environment,
                baselines=drift_dir(settings),
                rules=_drift_rules(settings, args.environment),
            )
        observed = _observe(engine, settings, args.environment, with_drift=False)
    if observed is None:  # pragma: no cover - a deployment that succeeded records its release
        raise NotFoundError(f"environment {args.environment!r} serves nothing after deploying")
    return observed


def observe(settings: Settings, environment: str) -> Observed | None:
    """What ``environment`` really runs, with its drift findings (None: it serves nothing).

    Raises:
        SpecError: when the spec's drift rules cannot be read.
        RuntimeDriverError, AgentError, ImageError, StateError: when what runs cannot be seen.
    """
    from castiron.compose import open_engine

    if not settings.state_present():
        return None
    with open_engine(settings) as engine:
        return _observe(engine, settings, environment, with_drift=True)


def _observe(
    engine: Engine, settings: Settings, environment: str, *, with_drift: bool
) -> Observed | None:
    row = engine.store.get_environment(environment)
    if row is None or row.current_release is None:
        return None
    release = engine.load_release(row.current_release)
    drift: tuple[str, ...] = ()
    if with_drift:
        from castiron.compose import drift_dir
        from castiron.engine.drift import detect_drift

        report = detect_drift(
            engine.context,
            environment,
            baselines=drift_dir(settings),
            rules=_drift_rules(settings, environment),
        )
        drift = tuple(finding_line(f) for f in report.findings)
    tags = sorted(t for t, d in engine.images.tags().items() if d == release.digest)
    return Observed(
        release=release.id,
        digest=release.digest,
        url=_url(row.listen),
        deployed_at=row.updated.isoformat().replace("+00:00", "Z") if row.updated else None,
        drift=drift,
        tag=tags[-1] if tags else None,
    )


def finding_line(finding: DriftFinding) -> str:
    """One drift finding as a line of the resource's ``drift`` attribute."""
    expected = "(none)" if finding.expected is None else finding.expected
    actual = "(none)" if finding.actual is None else finding.actual
    return f"{finding.kind} {finding.instance} {finding.path}: expected {expected}, actual {actual}"


def _drift_rules(settings: Settings, environment: str) -> DriftRules:
    """The drift rules of ``environment`` in the settings' resolved spec, with only their ignore
    patterns: the provider's scans report and fix on Terraform's terms, never on the agent's
    watch schedule."""
    from castiron.compose import drift_rules
    from castiron.engine.resolve import DriftRules

    return DriftRules(ignore=drift_rules(settings, environment).ignore)


def take_down(settings: Settings, environment: str) -> list[str]:
    """``castiron down``: remove the environment's route and destroy its instances.

    Raises:
        LockedError, RuntimeDriverError, RouterError, AgentError, StateError: as
            :meth:`Engine.down`.
    """
    from castiron.compose import open_engine

    if not settings.state_present():
        return []
    with open_engine(settings) as engine:
        return engine.down(environment)


def parse_import_id(text: str) -> tuple[str, str]:
    """``SPEC#ENVIRONMENT`` → (spec, environment).

    Raises:
        UsageError: when ``text`` is not of that form.
    """
    spec, sep, environment = text.rpartition(IMPORT_SEPARATOR)
    if not sep or not spec or not environment:
        raise UsageError(
            f"import id {text!r}: write SPEC{IMPORT_SEPARATOR}ENVIRONMENT "
            f"(e.g. castiron.yaml{IMPORT_SEPARATOR}staging), SPEC as in the configuration"
        )
    return spec, environment


def import_environment(settings: Settings, environment: str) -> Observed:
    """What an existing environment runs, for ``terraform import``.

    Raises:
        NotFoundError: when the environment serves nothing.
        RuntimeDriverError, AgentError, ImageError, StateError: when what runs cannot be seen.
    """
    observed = observe(settings, environment)
    if observed is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    return observed


def image_facts(settings: Settings, ref: str, public_keys: list[str]) -> dict[str, Any]:
    """The ``castiron_image`` data source: digest, tags, signature and provenance facts of
    the image ``ref`` names; with ``public_keys``, whether its signature verifies.

    Raises:
        NotFoundError: when ``ref`` names no image in the store.
        UsageError: when a key cannot be loaded.
        ImageError: when the image is damaged.
    """
    from castiron.images import oci, provenance
    from castiron.images.sign import ANN_KEYID, DSSE, SIGNATURE_ARTIFACT, verify_image
    from castiron.images.store import ImageStore

    store = ImageStore(settings.images_path)
    digest = store.resolve(ref)
    image = store.image(digest)
    referrers = store.referrers(digest)
    signatures = sorted(
        str(store.read_json(d.digest).get("annotations", {}).get(ANN_KEYID, ""))
        for d in referrers
        if d.artifact_type == SIGNATURE_ARTIFACT
    )
    statements = provenance.read(store, digest)
    facts: dict[str, Any] = {
        "digest": digest,
        "tags": sorted(t for t, d in store.tags().items() if d == digest),
        "created": str(image.config.get("created", "")),
        "git_commit": image.annotations.get(oci.ANN_REVISION),
        "signed": bool(signatures),
        "signature_keyids": signatures,
        "provenance": bool(statements) or any(d.artifact_type == DSSE for d in referrers),
        "verified": None,
        "verification": None,
    }
    if public_keys:
        result = verify_image(store, digest, [Path(k) for k in public_keys])
        facts["verified"] = result.ok
        facts["verification"] = result.message()
    return facts


def environment_facts(settings: Settings, environment: str) -> dict[str, Any]:
    """The ``castiron_environment`` data source: the release it serves, its url and health.

    Raises:
        NotFoundError: when the environment was never deployed.
        StateError: when the state store cannot be read.
    """
    from castiron.compose import agent_running, open_engine
    from castiron.engine.status import environment_status

    if not settings.state_present():
        raise NotFoundError(f"environment {environment!r} was never deployed")
    running = agent_running(settings) is not None
    with open_engine(settings, start_agent=False) as engine:
        data = environment_status(engine, environment, router=running)
    instances = data["instances"]
    healthy = sum(1 for i in instances if i.get("healthy"))
    return {
        "release": data["release"],
        "digest": data["digest"],
        "tag": data["tag"],
        "url": data["url"],
        "known_good": data["known_good"],
        "instances": len(instances),
        "healthy_instances": healthy,
        "healthy": bool(instances) and healthy == len(instances),
    }


__all__ = [
    "IMPORT_SEPARATOR",
    "DeploymentArgs",
    "Observed",
    "Planned",
    "deploy",
    "environment_facts",
    "finding_line",
    "image_facts",
    "import_environment",
    "observe",
    "parse_import_id",
    "plan",
    "settings_for",
    "take_down",
]
