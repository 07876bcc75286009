"""Drift's results: what differs (:class:`DriftFinding`), what one environment's check found
(:class:`DriftReport`), what a fix did (:class:`FixResult`), and the one JSON object
``castiron drift --json`` prints of them (:func:`check_output`).

Values only: it must not know how drift is found or fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from castiron.model import Digest, Instance, Observed

FindingKind = Literal["image", "config", "filesystem", "membership"]
"""What differs: the image, the runtime config, the filesystem, or who serves."""

KINDS: tuple[FindingKind, ...] = ("image", "config", "filesystem", "membership")


@dataclass(frozen=True)
class DriftFinding:
    """One difference between what runs and what the release says."""

    kind: FindingKind
    instance: str
    """The instance concerned (``-`` for the environment as a whole)."""
    path: str
    """A file path (filesystem) or a field (``env.LOG_LEVEL``, ``command``, ``route``...)."""
    expected: str | None
    """What the release says (None: nothing should be there)."""
    actual: str | None
    """What runs (None: it is not there)."""

    def to_json(self) -> dict[str, Any]:
        """The object ``castiron drift --json`` prints for this finding."""
        return {
            "kind": self.kind,
            "instance": self.instance,
            "path": self.path,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass(frozen=True)
class DriftReport:
    """What :func:`detect_drift` found in one environment, and what fixing it needs."""

    environment: str
    release: str | None
    findings: tuple[DriftFinding, ...] = ()
    replace: tuple[str, ...] = ()
    """Serving instances to replace (drifted, stopped or gone)."""
    extra: tuple[str, ...] = ()
    """Serving instances beyond the release's replicas (or of another release)."""
    add: int = 0
    """Instances to create beyond the replacements (replicas missing)."""
    strays: tuple[Observed, ...] = ()
    reroute: bool = False
    """The route must be re-applied from the records."""
    modified_trees: tuple[Digest, ...] = ()
    """Images whose shared local tree was modified (re-unpacked before replacing)."""
    recreated: tuple[Instance, ...] = ()
    """What runs under a recorded instance's name but was re-created outside castiron (a
    new handle): destroyed with the instance it stands in for."""

    @property
    def clean(self) -> bool:
        """True when nothing differs."""
        return not self.findings

    def to_json(self) -> dict[str, Any]:
        """The object ``castiron drift --json`` prints for this environment."""
        return {
            "environment": self.environment,
            "release": self.release,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True)
class FixResult:
    """What :func:`fix_drift` did."""

    report: DriftReport
    """The drift found (under the lock, right before fixing)."""
    replaced: tuple[str, ...] = ()
    created: tuple[str, ...] = ()
    destroyed: tuple[str, ...] = ()
    """Extra instances taken out of service and destroyed."""
    strays_destroyed: tuple[str, ...] = ()
    route_reapplied: bool = False
    trees_renewed: tuple[str, ...] = ()
    deployment: str | None = None

    @property
    def acted(self) -> bool:
        """True when anything was changed."""
        return bool(
            self.replaced
            or self.created
            or self.destroyed
            or self.strays_destroyed
            or self.route_reapplied
            or self.trees_renewed
        )

    def to_json(self) -> dict[str, Any]:
        """The ``fixed`` object of ``castiron drift --fix --json``."""
        return {
            "replaced": list(self.replaced),
            "created": list(self.created),
            "destroyed": list(self.destroyed),
            "strays_destroyed": list(self.strays_destroyed),
            "route_reapplied": self.route_reapplied,
            "trees_renewed": list(self.trees_renewed),
            "deployment": self.deployment,
        }


def check_output(results: Sequence[tuple[DriftReport, FixResult | None]]) -> dict[str, Any]:
    """The one JSON object ``castiron drift --json`` prints, which the host agent reads back
    for a drift watch: every finding, and per environment its report (with ``fixed`` after a
    fix). ``tests/engine/test_driftwatch.py`` pins its shape."""
    return {
        "findings": [f.to_json() for report, _ in results for f in report.findings],
        "environments": [
            report.to_json() if fixed is None else {**report.to_json(), "fixed": fixed.to_json()}
            for report, fixed in results
        ],
    }


__all__ = ["KINDS", "DriftFinding", "DriftReport", "FindingKind", "FixResult", "check_output"]
