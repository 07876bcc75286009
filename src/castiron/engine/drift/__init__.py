"""Drift: what runs compared with what each instance's release says, and its remedy.

Owns :func:`detect_drift`, which reports one :class:`DriftFinding` per difference, of four
kinds:

- ``image``: an instance runs another image than its release's digest;
- ``config``: its command, environment (secrets by name only, never values), user, working
  directory, port, labels, mounts or limits differ from what the release and the image's
  config say (or the container was re-created outside castiron);
- ``filesystem``: its root filesystem differs from the image's file manifest. Local runtime:
  the release's shared read-only tree, by a fast scan against the baseline taken when the
  tree was unpacked (``releases/sha256/<hex>/rootfs.baseline``, see
  :func:`~castiron.engine.baselines.check_tree`) or a full re-hash
  (:mod:`castiron.engine.fsdrift`), so a tree changed before an instance started is found; a finding
  about a shared tree is reported for every serving instance of it. Docker: ``docker diff``
  judged against the manifest;
- ``membership``: instances missing or stopped, extra instances, strays, serving instances the
  router does not send to, and a router pointing at something outside the release; and
  (``config``, instance ``-``) the route's own object edited by hand, where the traffic
  controller keeps one (:class:`~castiron.traffic.controller.RouteDiffer`: a Kubernetes
  Service's type, ports or selector), fixed by re-applying the route.

It also owns :func:`fix_drift`, the remedy, which never patches: under the environment's lock
it destroys strays (audited), re-unpacks a modified release tree to a fresh directory,
replaces every drifted instance with a fresh one of the same release with zero downtime
(created, health-gated, swapped into the route atomically, drained, destroyed: journaled like
a deployment, strategy ``drift-fix``), re-applies a wrong route from the records, and writes
one ``drift.fix`` audit entry per run listing what it replaced.

The package's modules: :mod:`~castiron.engine.drift.report` (the values and the JSON output),
:mod:`~castiron.engine.drift.detect` (detection) and :mod:`~castiron.engine.drift.fix` (the
remedy); every public name is importable from ``castiron.engine.drift``.

Drift is a result, not an exception. It knows nothing of click or rendering, never reads the
process environment, and reaches runtimes only through the driver protocol plus the optional
read-only capabilities below (:class:`RootfsHolder`, :class:`ChangeLister`,
:class:`LiveDiffer`: a Kubernetes Deployment compared with a server-side apply dry run of the
one castiron would apply, so what the server defaults cancels out and what someone changed in
castiron's fields shows).
"""

from castiron.engine.baselines import BaselineDriver, RootfsHolder, baseline_path
from castiron.engine.drift.detect import (
    ChangeLister,
    Expected,
    LiveDiff,
    LiveDiffer,
    config_findings,
    default_threads,
    detect_drift,
    image_finding,
    record_detection,
    scan_tree,
)
from castiron.engine.drift.fix import FIX_STRATEGY, fix_drift
from castiron.engine.drift.report import (
    KINDS,
    DriftFinding,
    DriftReport,
    FindingKind,
    FixResult,
    check_output,
)
from castiron.engine.resolve import DriftRules

__all__ = [
    "FIX_STRATEGY",
    "KINDS",
    "BaselineDriver",
    "ChangeLister",
    "DriftFinding",
    "DriftReport",
    "DriftRules",
    "Expected",
    "FindingKind",
    "FixResult",
    "LiveDiff",
    "LiveDiffer",
    "RootfsHolder",
    "baseline_path",
    "check_output",
    "config_findings",
    "default_threads",
    "detect_drift",
    "fix_drift",
    "image_finding",
    "record_detection",
    "scan_tree",
]
