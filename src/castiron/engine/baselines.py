"""Release trees checked before they are trusted: the baseline taken when a tree is unpacked,
and the check every reuse of the tree goes through.

Owns :class:`BaselineDriver` (a wrapper of a driver that runs instances on a local read-only
tree per image: before :meth:`~BaselineDriver.ensure_image` reuses a tree already on disk it
checks it against the image's file manifest, and re-unpacks it from the verified image when it
differs), where a tree's baseline lives (:func:`tree_baseline_path`), :func:`certify_tree`
(the baseline of a freshly unpacked tree, whose layer digests the unpacker verified) and
:func:`check_tree` (fast: only paths whose stat tuple moved since the baseline are re-hashed;
full: every file is re-hashed). A tree without a baseline (unpacked by an older castiron) is
checked in full and certified when clean.

Kept apart from :mod:`castiron.engine.drift` so that commands which only build a driver
(``status``, ``deploy``) do not load the drift scanner until a tree is actually checked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from castiron.drivers.base import Driver
from castiron.errors import CastironError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, Observed

if TYPE_CHECKING:
    from castiron.engine.fsdrift import ManifestSource, PathFilter, ScanResult
    from castiron.images.manifest import FileEntry


@runtime_checkable
class RootfsHolder(Protocol):
    """A driver whose instances run on a local read-only tree per image (the local runtime)."""

    def rootfs(self, digest: Digest) -> Path: ...

    def renew_rootfs(self, image: ImageRef) -> Path | None: ...

    def discard_rootfs(self, path: Path) -> None: ...


def baseline_path(baselines: Path, instance_id: str) -> Path:
    """Where an older castiron kept the baseline of ``instance_id`` (removed with it)."""
    return baselines / f"{instance_id}.baseline"


def tree_baseline_path(rootfs: Path) -> Path:
    """Where the baseline of the release tree ``rootfs`` lives (beside it, same owner)."""
    return rootfs.with_name(f"{rootfs.name}.baseline")


def certify_tree(rootfs: Path) -> None:
    """Record the baseline of ``rootfs`` right after it was unpacked from a verified image.

    Raises:
        ImageError: when the tree cannot be read.
        StateError: when the baseline cannot be written.
    """
    from castiron.engine.fsdrift import take_baseline

    take_baseline(rootfs, tree_baseline_path(rootfs))


def check_tree(
    rootfs: Path,
    manifest: ManifestSource,
    *,
    label: str,
    full: bool = False,
    paths: PathFilter | None = None,
    threads: int = 1,
) -> ScanResult:
    """Compare the release tree ``rootfs`` with its image's file ``manifest``: fast against
    the tree's baseline, or in full (every file re-hashed) with ``full`` or when there is no
    usable baseline. A full check of the whole tree (no ``paths`` filter) that finds nothing
    certifies the tree, so the next check is fast.

    Raises:
        ImageError: when the tree cannot be read.
    """
    from castiron.engine.fsdrift import scan_fast, scan_full, take_baseline
    from castiron.errors import NotFoundError, StateError

    baseline = tree_baseline_path(rootfs)
    if not full:
        with contextlib.suppress(NotFoundError, StateError):  # damaged or missing: in full
            return scan_fast(rootfs, manifest, baseline, instance=label, paths=paths)
    certify = paths is None or not (paths.writable or paths.ignore.patterns)
    pending = baseline.with_name(f".{baseline.name}.{os.getpid()}.pending")
    if certify:
        # Taken before the scan: a change made during the scan moves a ctime past it.
        try:
            take_baseline(rootfs, pending)
        except CastironError:
            certify = False
    try:
        result = scan_full(rootfs, manifest, instance=label, paths=paths, threads=threads)
        if certify and result.clean:
            with contextlib.suppress(OSError):
                os.replace(pending, baseline)
    finally:
        with contextlib.suppress(OSError):
            pending.unlink()
    return result


def describe_findings(result: ScanResult, limit: int = 3) -> str:
    """A short text of what a check found: ``/app/x.py (content), /app/y (added), +2 more``."""
    items = [f"{f.path} ({f.change})" for f in result.findings[:limit]]
    more = len(result.findings) - limit
    return ", ".join(items) + (f", +{more} more" if more > 0 else "")


class BaselineDriver:
    """A driver whose local release trees are checked before each reuse (see the module);
    everything else is the wrapped driver's."""

    def __init__(
        self,
        inner: Driver,
        baselines: Path,
        *,
        manifest_for: Callable[[ImageRef], Mapping[str, FileEntry]] | None = None,
        verify: bool = False,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.baselines = baselines
        self.name = inner.name
        self.verify = verify
        """Re-hash every file of a reused tree (``deploy --verify``), not only changed ones."""
        self._manifest_for = manifest_for or _file_index
        self._notice = notice or (lambda message: None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def ensure_image(self, image: ImageRef) -> None:
        """Make ``image``'s tree ready: a tree already on disk is checked first and, when it
        differs from the image, moved aside and unpacked again from the verified image.

        Raises:
            RuntimeDriverError: when the tree cannot be moved aside.
            ImageError, DigestMismatchError: as unpacking or reading the manifest raises them.
        """
        inner = self.inner
        if isinstance(inner, RootfsHolder):
            rootfs = inner.rootfs(image.digest)
            if rootfs.is_dir():
                result = check_tree(
                    rootfs,
                    lambda: self._manifest_for(image),
                    label=image.digest,
                    full=self.verify,
                )
                if not result.clean:
                    self._notice(
                        f"the release tree of {image.digest[:19]} differs from the image "
                        f"({describe_findings(result)}): unpacking it again from the image"
                    )
                    inner.renew_rootfs(image)
                    return
        inner.ensure_image(image)

    def create(self, spec: InstanceSpec) -> Instance:
        return self.inner.create(spec)

    def destroy(self, instance: Instance, grace: float) -> None:
        self.inner.destroy(instance, grace)
        with contextlib.suppress(OSError):
            baseline_path(self.baselines, instance.id).unlink()

    def observe(self, app: str, environment: str) -> list[Observed]:
        return self.inner.observe(app, environment)

    def inspect(self, instance: Instance) -> Observed:
        return self.inner.inspect(instance)


def _file_index(image: ImageRef) -> Mapping[str, FileEntry]:
    from castiron.images.manifest import file_index
    from castiron.images.store import ImageStore

    return file_index(ImageStore(image.store), image.digest)


__all__ = [
    "BaselineDriver",
    "RootfsHolder",
    "baseline_path",
    "certify_tree",
    "check_tree",
    "describe_findings",
    "tree_baseline_path",
]
