"""Filesystem baselines of local instances: taken when an instance starts, dropped with it.

Owns :class:`BaselineDriver` (a wrapper that records the baseline
:func:`castiron.engine.fsdrift.take_baseline` of each instance it creates on a local tree),
where a baseline file lives (:func:`baseline_path`) and :class:`RootfsHolder`, the drivers
that run instances on a local read-only tree per image. Kept apart from
:mod:`castiron.engine.drift` so that commands which only build a driver (``status``, ``deploy``)
do not load the drift scanner until an instance is created.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from castiron.drivers.base import Driver
from castiron.errors import CastironError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, Observed


@runtime_checkable
class RootfsHolder(Protocol):
    """A driver whose instances run on a local read-only tree per image (the local runtime)."""

    def rootfs(self, digest: Digest) -> Path: ...

    def renew_rootfs(self, image: ImageRef) -> Path | None: ...

    def discard_rootfs(self, path: Path) -> None: ...


def baseline_path(baselines: Path, instance_id: str) -> Path:
    """Where the filesystem baseline of ``instance_id`` lives."""
    return baselines / f"{instance_id}.baseline"


class BaselineDriver:
    """A driver that takes a filesystem baseline of each instance it creates on a local tree
    (``take_baseline`` right after ``create``) and drops it when the instance is destroyed;
    everything else is the wrapped driver's."""

    def __init__(self, inner: Driver, baselines: Path) -> None:
        self.inner = inner
        self.baselines = baselines
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ensure_image(self, image: ImageRef) -> None:
        self.inner.ensure_image(image)

    def create(self, spec: InstanceSpec) -> Instance:
        """Create through the wrapped driver, then record the tree's baseline.

        Raises:
            RuntimeDriverError: as the wrapped driver raises it.
        """
        instance = self.inner.create(spec)
        if isinstance(self.inner, RootfsHolder):
            from castiron.engine.fsdrift import PathFilter, take_baseline

            # A baseline that cannot be taken costs only speed: a scan then hashes everything.
            with contextlib.suppress(CastironError):
                take_baseline(
                    self.inner.rootfs(spec.image.digest),
                    baseline_path(self.baselines, instance.id),
                    paths=PathFilter.of(writable=spec.writable),
                )
        return instance

    def destroy(self, instance: Instance, grace: float) -> None:
        self.inner.destroy(instance, grace)
        with contextlib.suppress(OSError):
            baseline_path(self.baselines, instance.id).unlink()

    def observe(self, app: str, environment: str) -> list[Observed]:
        return self.inner.observe(app, environment)

    def inspect(self, instance: Instance) -> Observed:
        return self.inner.inspect(instance)


__all__ = ["BaselineDriver", "RootfsHolder", "baseline_path"]
