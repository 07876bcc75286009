"""What to deploy: a spec's environment and an image reference resolved to a
:class:`~castiron.engine.strategies.Target` (:func:`resolve`), and what deploying it would do
(:func:`plan_target`, pure apart from reads of the records).

Owns resolving an image reference to a digest, once (the newest baked image of the app by
default: :func:`newest_image`), and reading how an image says to run it
(:func:`image_runtime`). It changes nothing and must not know drivers or traffic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from castiron.engine.records import current_release, in_service
from castiron.engine.release import Release, release_id
from castiron.engine.strategies import ImageRuntime, Policy, Target
from castiron.errors import ImageError, NotFoundError, UsageError
from castiron.model import Digest

if TYPE_CHECKING:
    from castiron.engine.context import EngineContext
    from castiron.engine.plan import Plan
    from castiron.engine.resolve import ResolvedSpec
    from castiron.images.store import ImageStore
    from castiron.spec.load import LoadedSpec


def image_runtime(images: ImageStore, digest: str) -> ImageRuntime:
    """How the image ``digest`` says to run it: entrypoint + cmd, env, workdir, user.

    Raises:
        NotFoundError: when the image is not in the store.
        ImageError: when its config is damaged.
    """
    config = images.image(digest).config.get("config") or {}
    if not isinstance(config, dict):
        raise ImageError(f"image {digest}: config is not an object")
    command = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    env: list[tuple[str, str]] = []
    for item in config.get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep:
            env.append((name, value))
    if not command:
        raise ImageError(f"image {digest} has no entrypoint or cmd: nothing to run")
    user = config.get("User")
    return ImageRuntime(
        command=tuple(str(a) for a in command),
        env=tuple(env),
        workdir=str(config.get("WorkingDir") or "/"),
        user=str(user) if user else None,
    )


def newest_image(images: ImageStore, app: str) -> tuple[Digest, str | None]:
    """The most recently added image of ``app`` in the store, and its most recent tag.

    Raises:
        UsageError: when the store has no image of ``app`` (bake one first).
    """
    from castiron.images import oci

    for descriptor in reversed(images.index()):
        if descriptor.artifact_type is not None:
            continue
        try:
            title = images.image(descriptor.digest).annotations.get(oci.ANN_TITLE)
        except (ImageError, NotFoundError):
            continue
        if title == app:
            return descriptor.digest, descriptor.annotations.get(oci.ANN_REF_NAME)
    raise UsageError(
        f"no image of app {app!r} in {images.root}: run `castiron bake` first (or pass --image REF)"
    )


def resolve(
    ctx: EngineContext, spec: ResolvedSpec | LoadedSpec, environment: str, image: str | None = None
) -> Target:
    """Resolve ``environment`` of the spec with image ``image`` (a tag, digest or unique
    prefix; default: the newest baked image of the app) to a :class:`Target`.

    ``spec`` is the resolved spec (:func:`~castiron.engine.resolve.cached_resolve_spec`
    gives it without pydantic), or a validated one, resolved here.
    The reference is resolved to a digest here, once; everything after uses the digest.

    Raises:
        UsageError: unknown environment, no image, unsupported strategy.
        NotFoundError: when ``image`` names nothing in the store.
    """
    from castiron.engine.resolve import STRATEGY_NAMES, ResolvedSpec, resolve_spec
    from castiron.images import oci

    resolved = spec if isinstance(spec, ResolvedSpec) else resolve_spec(spec)
    env = resolved.environment(environment)
    if image is None:
        digest, tag = newest_image(ctx.images, resolved.app)
    else:
        digest = ctx.images.resolve(image)
        tag = image if image in ctx.images.tags() else None
    if env.strategy not in STRATEGY_NAMES:
        raise UsageError(
            f"environments.{environment}.strategy.type: {env.strategy!r} is not "
            f"available yet (use one of: {', '.join(STRATEGY_NAMES)})"
        )
    stored = ctx.images.image(digest)
    release = Release(id=release_id(digest, env.config), digest=digest, config=env.config)
    policy = Policy(
        app=resolved.app,
        runtime=env.config.runtime,
        listen=env.listen,
        settings=env.settings,
        base_dir=str(resolved.base_dir),
    )
    return Target(
        release,
        policy,
        tag,
        stored.annotations.get(oci.ANN_REVISION),
        env.gates,
        env.drift,
    )


def plan_target(ctx: EngineContext, target: Target, strategy: str | None = None) -> Plan:
    """What deploying ``target`` with ``strategy`` (default: its policy's) would do, with
    the operations that will run (reads state; changes nothing)."""
    current = current_release(ctx.store, target.environment)
    running = [
        r
        for r in in_service(ctx.store, target.environment)
        if current is not None and r.release == current.id
    ]
    from dataclasses import replace

    from castiron.engine.operations import Serving, plan_deploy
    from castiron.engine.plan import plan_deployment
    from castiron.engine.strategies import desired_of

    strategy = strategy or target.policy.strategy
    plan = plan_deployment(current, target.release, len(running), strategy)
    serving = Serving(None if current is None else current.id, len(running))
    operations = plan_deploy(serving, desired_of(target.release, target.policy, strategy))
    return replace(plan, operations=operations if plan.has_changes else ())


__all__ = ["image_runtime", "newest_image", "plan_target", "resolve"]
