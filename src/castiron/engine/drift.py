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

Drift is a result, not an exception. It knows nothing of click or rendering, never reads the
process environment, and reaches runtimes only through the driver protocol plus the optional
read-only capabilities below (:class:`RootfsHolder`, :class:`ChangeLister`,
:class:`LiveDiffer`: a Kubernetes Deployment compared with a server-side apply dry run of the
one castiron would apply, so what the server defaults cancels out and what someone changed in
castiron's fields shows).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from castiron.drivers.base import Driver
from castiron.engine.baselines import BaselineDriver, RootfsHolder, baseline_path, check_tree
from castiron.engine.fsdrift import Finding, PathFilter, ScanResult
from castiron.engine.journal import Journal, new_deployment_id
from castiron.engine.operations import Operation, plan_drift_fix
from castiron.engine.release import Release
from castiron.engine.resolve import DriftRules
from castiron.engine.runtimes import find_strays, instance_port
from castiron.engine.strategies import (
    ImageRuntime,
    Policy,
    Rollout,
    backends_of,
    execute,
    release_instance_spec,
    remove_instances,
    row_instance,
)
from castiron.errors import (
    CastironError,
    ImageError,
    NotFoundError,
)
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, Observed
from castiron.state.base import AuditDraft, DeploymentRow, InstanceRow, StateTx, format_time
from castiron.traffic.controller import RouteDiffer

if TYPE_CHECKING:
    from castiron.engine.deploy import Engine
    from castiron.images.manifest import FileEntry

FindingKind = Literal["image", "config", "filesystem", "membership"]
"""What differs: the image, the runtime config, the filesystem, or who serves."""

KINDS: tuple[FindingKind, ...] = ("image", "config", "filesystem", "membership")

RUNTIME_ENV = frozenset(
    {"PORT", "HOST", "TMPDIR", "PATH", "HOSTNAME", "HOME", "CASTIRON_APP", "CASTIRON_ENVIRONMENT"}
)
"""Variables a runtime sets itself; compared only when the image or the release sets them."""

DOCKER_RUNTIME_PATHS = (
    "/tmp",
    "/dev",
    "/proc",
    "/sys",
    "/run",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/mtab",
    "/.dockerenv",
    "/sbin/docker-init",
)
"""Paths the Docker engine itself creates or mounts in every container: never drift."""

FIX_STRATEGY = "drift-fix"
"""The strategy name a fix run is recorded under in the deployment history."""


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


# --- optional driver capabilities (read only) ---------------------------------------------------


@runtime_checkable
class ChangeLister(Protocol):
    """A driver that can list an instance's filesystem changes against its image (Docker)."""

    def changes(self, instance: Instance) -> list[tuple[str, str]]: ...


class LiveDiff(Protocol):
    """One field of a live runtime object that differs from what castiron would apply."""

    @property
    def target(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def want(self) -> object: ...
    @property
    def have(self) -> object: ...


@runtime_checkable
class LiveDiffer(Protocol):
    """A driver that can ask its runtime how the live objects of a release differ from those
    it would create (Kubernetes: a server-side apply dry run, server defaults cancelled out)."""

    def live_diff(self, spec: InstanceSpec) -> Sequence[LiveDiff]: ...


COVERED_LIVE_PATHS = ("spec.replicas", "spec.template.spec.containers[app].image")
"""Live differences already reported by name elsewhere (``replicas``, ``image``)."""
COVERED_LIVE_PREFIXES = ("spec.template.spec.containers[app].env[",)
"""Live differences already reported as ``env.NAME``."""


# --- what the release expects -------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What one release says an instance runs with."""

    release: Release
    runtime: ImageRuntime
    config_digest: str | None

    @property
    def env(self) -> dict[str, str]:
        return {**dict(self.runtime.env), **dict(self.release.config.env)}

    @property
    def secret_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.release.config.secrets)


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _memory_bytes(text: str) -> int | None:
    try:
        from castiron.drivers.docker import parse_memory
    except ImportError:  # pragma: no cover - docker extras missing: limits unknown
        return None
    try:
        return parse_memory(text)
    except ValueError:
        return None


def config_findings(expected: Expected, observed: Observed, row: InstanceRow) -> list[DriftFinding]:
    """Differences between what ``expected`` says and ``observed``'s runtime config.

    Only what the runtime shows is compared (a runtime that does not report limits is not
    judged on them). Secret values are never read or shown: secrets are compared by name.
    """
    iid = row.id
    cfg = observed.config
    out: list[DriftFinding] = []

    def add(path: str, want: object, have: object) -> None:
        out.append(DriftFinding("config", iid, path, _text(want), _text(have)))

    handle = row.data.get("handle")
    if handle and observed.instance.handle and observed.instance.handle != handle:
        add("container", str(handle)[:12], f"{observed.instance.handle[:12]} (re-created)")
    want_secrets = expected.secret_names
    declared = cfg.get("secrets")
    actual_env = cfg.get("env")
    env: dict[str, str] = dict(actual_env) if isinstance(actual_env, Mapping) else {}
    have_secrets = set(declared) if isinstance(declared, list | tuple) else set()
    have_secrets |= want_secrets & set(env)
    hidden = want_secrets | have_secrets
    if isinstance(actual_env, Mapping):
        want_env = expected.env
        for name in sorted(set(want_env) | set(env)):
            if name in hidden:
                continue
            if name not in want_env and name in RUNTIME_ENV:
                continue
            if want_env.get(name) != env.get(name):
                add(f"env.{name}", want_env.get(name), env.get(name))
    for name in sorted(want_secrets - have_secrets):
        add(f"secrets.{name}", "set", None)
    for name in sorted(have_secrets - want_secrets):
        add(f"secrets.{name}", None, "set")
    if "command" in cfg and cfg["command"] is not None:
        want_cmd = list(expected.runtime.command)
        if list(cfg["command"]) != want_cmd:  # type: ignore[call-overload]
            add("command", want_cmd, cfg["command"])
    if "user" in cfg and (cfg["user"] or None) != (expected.runtime.user or None):
        add("user", expected.runtime.user, cfg["user"])
    workdir = cfg.get("workdir")
    want_dir = posixpath.normpath(expected.runtime.workdir)
    if workdir is not None and posixpath.normpath(str(workdir)) != want_dir:
        add("workdir", expected.runtime.workdir, workdir)
    rcfg = expected.release.config
    fixed_port = instance_port(rcfg)
    if fixed_port and cfg.get("port") is not None and cfg["port"] != fixed_port:
        add("port", fixed_port, cfg["port"])
    labels = cfg.get("labels")
    if isinstance(labels, Mapping):
        want_labels = {
            "castiron.app": rcfg.app,
            "castiron.release": expected.release.id,
            "castiron.image": expected.release.digest,
        }
        env_label = labels.get("castiron.environment", labels.get("castiron.env"))
        if env_label != rcfg.environment:
            add("labels.castiron.environment", rcfg.environment, env_label)
        for key, want in want_labels.items():
            if labels.get(key) != want:
                add(f"labels.{key}", want, labels.get(key))
    if cfg.get("replicas") is not None and cfg["replicas"] != cfg.get("wanted", 1):
        # Kubernetes: one pod of its release's Deployment per instance (`kubectl scale`).
        add("replicas", cfg.get("wanted", 1), cfg["replicas"])
    if "read_only" in cfg and not cfg["read_only"]:
        add("read_only", "true", "false")
    mounts = cfg.get("mounts")
    if isinstance(mounts, list):
        for mount in mounts:
            if isinstance(mount, Mapping) and mount.get("type") != "tmpfs":
                add(f"mounts.{mount.get('destination')}", None, mount.get("type"))
    tmpfs = cfg.get("tmpfs")
    if isinstance(tmpfs, Mapping):
        want_tmpfs = {"/tmp", *(p.rstrip("/") for p in rcfg.writable)}
        for path in sorted(want_tmpfs - set(tmpfs)):
            add(f"mounts.{path}", "tmpfs", None)
        for path in sorted(set(tmpfs) - want_tmpfs):
            add(f"mounts.{path}", None, "tmpfs")
    if "memory" in cfg:
        want_mem = _memory_bytes(rcfg.memory) if rcfg.memory else None
        known = rcfg.memory is None or want_mem is not None
        if known and (cfg["memory"] or None) != want_mem:
            add("limits.memory", want_mem, cfg["memory"])
    if "nano_cpus" in cfg:
        want_cpus = round(rcfg.cpus * 1e9) if rcfg.cpus is not None else None
        if (cfg["nano_cpus"] or None) != want_cpus:
            add("limits.nano_cpus", want_cpus, cfg["nano_cpus"])
    return out


def image_finding(expected: Expected, observed: Observed, iid: str) -> DriftFinding | None:
    """A finding when ``observed`` runs another image than the release's digest."""
    want = expected.release.digest
    ran = {str(observed.image or ""), str(observed.config.get("image_id") or "")}
    if want in ran or (expected.config_digest and expected.config_digest in ran):
        return None
    actual = observed.config.get("image_id") or observed.image
    return DriftFinding("image", iid, "image", want, str(actual) if actual else None)


# --- filesystem ---------------------------------------------------------------------------------


_CHANGE_TEXT = {"mode": "mode {}", "target": "link to {}"}


def _fs_finding(f: Finding, instance: str) -> DriftFinding:
    fmt = _CHANGE_TEXT.get(f.change, "{}")
    expected = None if f.expected is None else fmt.format(f.expected)
    actual = None if f.actual is None else fmt.format(f.actual)
    if f.change == "content" and actual is not None and not actual.startswith("sha256:"):
        actual = f"content {actual}"
    return DriftFinding("filesystem", instance, f.path, expected, actual)


def scan_tree(
    root: Path,
    manifest: Callable[[], Mapping[str, FileEntry]],
    instance_ids: Sequence[str],
    paths: PathFilter,
    *,
    full: bool,
    threads: int,
) -> ScanResult:
    """Scan a shared local tree: fast against the baseline taken when it was unpacked, else
    (or with ``full``) in full (see :func:`~castiron.engine.baselines.check_tree`).

    Raises:
        ImageError: when the tree cannot be read.
    """
    label = ",".join(instance_ids)
    return check_tree(root, manifest, label=label, full=full, paths=paths, threads=threads)


def _docker_findings(
    changes: Iterable[tuple[str, str]],
    manifest: Callable[[], Mapping[str, FileEntry]],
    paths: PathFilter,
    iid: str,
) -> list[DriftFinding]:
    """Findings of one container's ``docker diff`` judged against the image's manifest."""
    parents = {posixpath.dirname(r) for r in DOCKER_RUNTIME_PATHS} - {"/"}
    items = [
        (p, k)
        for p, k in changes
        if not any(p == r or p.startswith(r + "/") for r in DOCKER_RUNTIME_PATHS)
        and not (p in parents and k != "removed")  # made to hold a runtime mount point
        and not _skipped(paths, p)
    ]
    if not items:
        return []
    files = manifest()
    out: list[DriftFinding] = []
    for path, kind in items:
        entry = files.get(path)
        if kind == "added":
            out.append(DriftFinding("filesystem", iid, path, None, "added"))
        elif kind == "removed":
            out.append(DriftFinding("filesystem", iid, path, entry.type if entry else None, None))
        elif entry is None or entry.type != "dir":  # a directory changes when its entries do
            want = f"sha256:{entry.sha256}" if entry is not None and entry.sha256 else None
            out.append(DriftFinding("filesystem", iid, path, want, "changed"))
    return out


def _skipped(paths: PathFilter, path: str) -> bool:
    rel = path.lstrip("/")
    parts = rel.split("/")
    return any(paths.skips("/".join(parts[:i]), i < len(parts)) for i in range(1, len(parts) + 1))


# --- detection ----------------------------------------------------------------------------------


@dataclass
class _Context:
    engine: Engine
    environment: str
    policy: Policy
    release: Release
    driver: Driver
    baselines: Path
    rules: DriftRules
    full: bool
    threads: int
    expected: dict[str, Expected] = field(default_factory=dict)
    manifests: dict[str, Mapping[str, FileEntry]] = field(default_factory=dict)

    def expect(self, release_id: str) -> Expected:
        if release_id not in self.expected:
            release = self.engine.load_release(release_id)
            from castiron.engine.deploy import image_runtime

            runtime = image_runtime(self.engine.images, release.digest)
            config_digest = self.engine.images.image(release.digest).config_digest
            self.expected[release_id] = Expected(release, runtime, config_digest)
        return self.expected[release_id]

    def manifest(self, digest: str) -> Callable[[], Mapping[str, FileEntry]]:
        def load() -> Mapping[str, FileEntry]:
            if digest not in self.manifests:
                from castiron.images.manifest import file_index

                self.manifests[digest] = file_index(self.engine.images, Digest(digest))
            return self.manifests[digest]

        return load

    def path_filter(self) -> PathFilter:
        try:
            return PathFilter.of(writable=self.release.config.writable, ignore=self.rules.ignore)
        except ImageError as exc:
            raise ImageError(f"environments.{self.environment}.{exc}") from exc


def _successors(observed: Iterable[Observed]) -> dict[str, str]:
    """Instance id -> the id of the instance the agent replaced it with."""
    out: dict[str, str] = {}
    for o in observed:
        replaced = o.config.get("replaces")
        if isinstance(replaced, str) and replaced:
            out[replaced] = o.instance.id
    return out


def _final(successors: Mapping[str, str], iid: str) -> str:
    seen = {iid}
    while iid in successors and successors[iid] not in seen:
        iid = successors[iid]
        seen.add(iid)
    return iid


def detect_drift(
    engine: Engine,
    environment: str,
    *,
    baselines: Path,
    rules: DriftRules | None = None,
    full: bool = False,
    threads: int = 1,
) -> DriftReport:
    """Compare what runs in ``environment`` with what its release says (changes nothing).

    ``baselines`` is the directory of filesystem baselines (``CASTIRON_HOME/drift``);
    ``full`` re-hashes every file instead of the fast scan; ``threads`` hash in parallel.

    Raises:
        NotFoundError: when the environment was never deployed.
        RuntimeDriverError, AgentError: when the runtime or the router cannot be asked.
        ImageError: when the image or a tree cannot be read, or an ignore pattern is bad.
    """
    row = engine.store.get_environment(environment)
    if row is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    policy = Policy.from_json(row.config)
    if row.current_release is None:
        return DriftReport(environment, None)
    release = engine.load_release(row.current_release)
    ctx = _Context(
        engine,
        environment,
        policy,
        release,
        engine.driver(policy.runtime),
        baselines,
        rules or DriftRules(),
        full,
        threads,
    )
    return _detect(ctx)


def _detect(ctx: _Context) -> DriftReport:
    engine, environment, release, driver = ctx.engine, ctx.environment, ctx.release, ctx.driver
    rows = engine.store.list_instances(environment)
    serving = [r for r in rows if r.status == "running"]
    observed_list = driver.observe(ctx.policy.app, environment)
    observed = {o.instance.id: o for o in observed_list}
    successors = _successors(observed_list)
    traffic = engine.traffic
    routing = traffic.current(environment)
    routed = routing.backend_ids if routing is not None else frozenset()
    findings: list[DriftFinding] = []
    replace: list[str] = []
    extra: list[str] = []
    reroute = False
    healthy: list[InstanceRow] = []
    recreated: list[Instance] = []
    for r in serving:
        o = observed.get(r.id)
        if o is None:
            o = driver.inspect(row_instance(r))
        if o.state not in ("running", "starting"):
            final = _final(successors, r.id)
            if final != r.id and final in routed:
                continue  # the agent replaced it; the records catch up on the next change
            state = o.state if o.exit_code is None else f"{o.state} (status {o.exit_code})"
            findings.append(DriftFinding("membership", r.id, "state", "running", state))
            replace.append(r.id)
            continue
        if r.release != release.id:
            findings.append(DriftFinding("membership", r.id, "release", release.id, r.release))
            extra.append(r.id)
            continue
        expected = ctx.expect(r.release)
        found_image = image_finding(expected, o, r.id)
        drifted = [found_image] if found_image is not None else []
        drifted += config_findings(expected, o, r)
        if not isinstance(driver, RootfsHolder) and isinstance(driver, ChangeLister):
            changes = driver.changes(o.instance)
            drifted += _docker_findings(
                changes, ctx.manifest(release.digest), ctx.path_filter(), r.id
            )
        findings += drifted
        handle = r.data.get("handle")
        if handle and o.instance.handle and o.instance.handle != handle:
            recreated.append(o.instance)
        if drifted:
            replace.append(r.id)
        else:
            healthy.append(r)
        if routing is not None and r.id not in routed:
            findings.append(DriftFinding("membership", r.id, "route", "routed", "not routed"))
            reroute = True
    # live objects against what would be applied (server-side dry run)
    if isinstance(driver, LiveDiffer):
        present = {o.instance.id for o in observed_list if o.state in ("running", "starting")}
        unchanged = [r for r in serving if r.release == release.id and r.id in present]
        if unchanged:
            for diff in _live_diffs(ctx, driver):
                path = f"{diff.target}: {diff.path}" if diff.path else diff.target
                for r in unchanged:
                    want, have = _shown(diff.want), _shown(diff.have)
                    findings.append(DriftFinding("config", r.id, path, want, have))
                    if r.id not in replace:
                        replace.append(r.id)
    # surplus of the current release beyond its replicas
    current = [r for r in serving if r.release == release.id]
    replicas = release.config.replicas
    if len(current) > replicas:
        surplus = [r.id for r in current if r.id in replace][: len(current) - replicas]
        keep_out = [r.id for r in reversed(current) if r.id not in replace and r.id not in surplus]
        surplus += keep_out[: len(current) - replicas - len(surplus)]
        for iid in surplus:
            findings.append(
                DriftFinding("membership", iid, "replicas", str(replicas), str(len(current)))
            )
            if iid in replace:
                replace.remove(iid)
            extra.append(iid)
    add = max(0, replicas - len(current))
    if add:
        findings.append(
            DriftFinding("membership", "-", "replicas", str(replicas), str(len(current)))
        )
    modified: list[Digest] = []
    if isinstance(driver, RootfsHolder):
        by_digest: dict[str, list[str]] = {}
        for r in current:
            if r.id in extra:
                continue
            digest = str(r.data.get("image") or release.digest)
            by_digest.setdefault(digest, []).append(r.id)
        for digest, ids in sorted(by_digest.items()):
            live = [i for i in ids if i not in replace or observed.get(i) is not None]
            result = scan_tree(
                driver.rootfs(Digest(digest)),
                ctx.manifest(digest),
                live or ids,
                ctx.path_filter(),
                full=ctx.full,
                threads=ctx.threads,
            )
            if result.clean:
                continue
            modified.append(Digest(digest))
            for iid in ids:
                findings += [_fs_finding(f, iid) for f in result.findings]
                if iid not in replace:
                    replace.append(iid)
    # the route
    known = {r.id for r in rows} | set(routed)
    expected_backends = {r.id for r in serving if r.id not in extra}
    expected_backends |= {_final(successors, i) for i in expected_backends}
    if routing is None or routing.stable is None:
        if serving:
            findings.append(
                DriftFinding("membership", "-", "route", f"release {release.id}", "no listener")
            )
            reroute = True
    else:
        if routing.stable.release != release.id:
            findings.append(
                DriftFinding("membership", "-", "route", release.id, routing.stable.release)
            )
            reroute = True
        if routing.canary is not None and routing.canary_weight > 0:
            findings.append(
                DriftFinding(
                    "membership",
                    "-",
                    "route.canary",
                    None,
                    f"{routing.canary.release} ({routing.canary_weight}%)",
                )
            )
            reroute = True
        for backend_set in (routing.stable, routing.canary):
            if backend_set is None:
                continue
            for b in backend_set.backends:
                if b.id not in expected_backends:
                    findings.append(
                        DriftFinding("membership", b.id, "route", None, f"routed ({b.address})")
                    )
                    reroute = True
    # the route's own object, edited by hand (a Kubernetes Service's type, ports, selector)
    if routing is not None and routing.stable is not None and isinstance(traffic, RouteDiffer):
        for diff in traffic.route_diff(environment, release.id):
            findings.append(
                DriftFinding(
                    "config",
                    "-",
                    f"{diff.target}: {diff.path}",
                    _shown(diff.want),
                    _shown(diff.have),
                )
            )
            reroute = True
    # strays
    images: list[ImageRef] = []
    for rel_row in engine.store.list_releases(environment):
        with contextlib.suppress(CastironError):
            stored = engine.images.image(rel_row.digest)
            ref = ImageRef(Digest(rel_row.digest), stored.config_digest, engine.images.root)
            if ref not in images:
                images.append(ref)
    pending = {o.instance.id for o in observed_list if o.config.get("replaces") and not o.stray}
    strays = [
        o
        for o in find_strays(driver, ctx.policy.app, environment, known, images)
        if o.instance.id not in pending
    ]
    for o in strays:
        name = o.config.get("container") or o.instance.handle or o.instance.id
        findings.append(
            DriftFinding(
                "membership", o.instance.id or str(name), "stray", None, f"{o.state} {name}"
            )
        )
    return DriftReport(
        environment=environment,
        release=release.id,
        findings=tuple(findings),
        replace=tuple(replace),
        extra=tuple(extra),
        add=add,
        strays=tuple(strays),
        reroute=reroute,
        modified_trees=tuple(modified),
        recreated=tuple(recreated),
    )


def _shown(value: object) -> str | None:
    """A live value as text (JSON for structures)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _live_diffs(ctx: _Context, driver: LiveDiffer) -> list[LiveDiff]:
    """The differences of the current release's live objects not reported elsewhere."""
    expected = ctx.expect(ctx.release.id)
    image = ImageRef(
        ctx.release.digest, Digest(expected.config_digest or ""), ctx.engine.images.root
    )
    # Secret values are not compared (the Secret is checked for presence only): names will do.
    secrets = dict.fromkeys(expected.secret_names, "")
    spec = release_instance_spec(ctx.release, image, expected.runtime, secrets, "drift", "drift")
    return [
        d
        for d in driver.live_diff(spec)
        if d.path not in COVERED_LIVE_PATHS and not d.path.startswith(COVERED_LIVE_PREFIXES)
    ]


def record_detection(engine: Engine, report: DriftReport, source: str) -> None:
    """Record drift found without fixing it as one ``drift.detected`` audit entry (what the
    agent's watch does on each check that finds something; a clean report records nothing).

    Raises:
        StateError: when the audit entry cannot be written.
    """
    if report.clean:
        return
    kinds: dict[str, int] = {}
    for finding in report.findings:
        kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
    engine.store.mutate(
        AuditDraft(
            "drift.detected",
            environment=report.environment,
            subject=report.release,
            result="drift",
            details={
                "source": source,
                "findings": len(report.findings),
                "kinds": kinds,
                "first": [f.to_json() for f in report.findings[:20]],
            },
        ),
        lambda tx: None,
    )


# --- the remedy ---------------------------------------------------------------------------------


def fix_drift(
    engine: Engine,
    environment: str,
    *,
    baselines: Path,
    rules: DriftRules | None = None,
    full: bool = False,
    threads: int = 1,
    lock_wait: float = 0.0,
) -> FixResult:
    """Find drift in ``environment`` under its lock and remove it by replacement.

    Strays are destroyed; a modified local tree is re-unpacked to a fresh directory; each
    drifted, stopped or missing instance is replaced by a fresh one of the same release
    (created, health-gated, swapped into the route atomically with the healthy ones, then the
    drifted ones are drained and destroyed); extra instances leave the route and are
    destroyed; a wrong route is re-applied from the records. Nothing is patched. One
    ``drift.fix`` audit entry lists what was done.

    Raises:
        NotFoundError: when the environment was never deployed.
        LockedError: when another process holds the environment's lock.
        DeployFailedError: when a replacement does not become healthy (it was undone; the
            environment serves as before).
        UsageError: when a secret of the release cannot be resolved.
        RuntimeDriverError, RouterError, AgentError, ImageError, StateError: on
            infrastructure failures.
    """
    if engine.store.get_environment(environment) is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    with engine.locked(environment, "drift fix", lock_wait):
        report = detect_drift(
            engine, environment, baselines=baselines, rules=rules, full=full, threads=threads
        )
        if report.clean or report.release is None:
            return FixResult(report)
        return _fix(engine, report)


def _fix(engine: Engine, report: DriftReport) -> FixResult:
    environment = report.environment
    row = engine.store.get_environment(environment)
    assert row is not None and report.release is not None
    policy = Policy.from_json(row.config)
    release = engine.load_release(report.release)
    driver = engine.driver(policy.runtime)
    grace = min(policy.drain_timeout, 10.0)
    strays_destroyed: list[str] = []
    for stray in report.strays:
        name = str(stray.config.get("container") or stray.instance.id or stray.instance.handle)
        engine.store.mutate(
            AuditDraft(
                "drift.stray.destroy",
                environment=environment,
                subject=name,
                details={"instance": stray.instance.id, "handle": stray.instance.handle},
            ),
            lambda tx: None,
        )
        driver.destroy(stray.instance, grace=grace)
        strays_destroyed.append(name)
        engine.observer.progress(f"destroyed stray {name}")
    renewed: list[tuple[str, Path | None]] = []
    if report.modified_trees and isinstance(driver, RootfsHolder):
        stored = engine.images.image(release.digest)
        for digest in report.modified_trees:
            engine.store.mutate(
                AuditDraft("drift.tree.renew", environment=environment, subject=digest),
                lambda tx: None,
            )
            image = ImageRef(digest, stored.config_digest, engine.images.root)
            if digest != release.digest:
                image = ImageRef(
                    digest, engine.images.image(digest).config_digest, engine.images.root
                )
            renewed.append((digest, driver.renew_rootfs(image)))
            engine.observer.progress(f"re-unpacked the modified tree of {digest[:19]}")
    rows = {r.id: r for r in engine.store.list_instances(environment)}
    leaving = [rows[i] for i in (*report.replace, *report.extra) if i in rows]
    kept = [
        r
        for r in rows.values()
        if r.status == "running" and r.id not in report.replace and r.id not in report.extra
    ]
    replacing = len([i for i in report.replace if i in rows])
    operations = plan_drift_fix(
        release.id, len(kept), replacing, report.add, len(leaving) - replacing
    )
    created: list[Instance] = []
    deployment: str | None = None
    route_reapplied = False
    if operations:
        created, deployment = _replace(engine, release, policy, driver, kept, leaving, operations)
        route_reapplied = True
        for instance in report.recreated:
            driver.destroy(instance, grace=grace)
    elif report.reroute:
        engine.traffic.switch(
            environment,
            policy.listen,
            backends_of(release.id, kept),
            drain_timeout=policy.drain_timeout,
            limits=policy.limits,
            access_log=policy.access_log,
        )
        route_reapplied = True
        engine.observer.progress(f"route of {environment} re-applied from the records")
    for _digest, aside in renewed:
        if aside is not None and isinstance(driver, RootfsHolder):
            with contextlib.suppress(CastironError):
                driver.discard_rootfs(aside)
    replaced = tuple(i for i in report.replace if i in rows)
    destroyed = tuple(i for i in report.extra if i in rows)
    result = FixResult(
        report=report,
        replaced=replaced,
        created=tuple(i.id for i in created),
        destroyed=destroyed,
        strays_destroyed=tuple(strays_destroyed),
        route_reapplied=route_reapplied,
        trees_renewed=tuple(d for d, _ in renewed),
        deployment=deployment,
    )
    details = {
        **result.to_json(),
        "release": release.id,
        "findings": len(report.findings),
        "kinds": sorted({f.kind for f in report.findings}),
    }
    engine.store.mutate(
        AuditDraft(
            "drift.fix",
            environment=environment,
            subject=release.id,
            from_=release.id,
            to=release.id,
            details=details,
        ),
        lambda tx: None,
    )
    return result


@dataclass
class Replacement(Rollout):
    """A rollout that replaces instances of the release already serving: the fresh ones join
    ``kept`` (its instances that stay) in one switch, and the leaving ones are destroyed once
    the router has drained them (forgotten when the replacement finishes)."""

    kept: Sequence[InstanceRow] = ()

    def switch(self, new: Sequence[Instance], keep: Sequence[InstanceRow], *, final: bool) -> None:
        """Route ``kept`` and ``new`` together, atomically.

        Raises:
            RouterError, AgentError: when the router refuses or cannot be reached.
        """
        to: list[Instance | InstanceRow] = [*self.kept, *new]
        ids = [i.id for i in to]
        self.journal.step("switch", {"to": ids, "keep": [], "final": True})
        self.traffic.switch(
            self.environment,
            self.policy.listen,
            backends_of(self.release.id, to),
            drain_timeout=self.policy.drain_timeout,
            limits=self.policy.limits,
            access_log=self.policy.access_log,
        )
        new_ids = [i.id for i in new]

        def serve(tx: StateTx) -> None:
            for iid in new_ids:
                tx.set_instance_status(iid, "running")

        self.journal.step("switched", {"to": ids, "keep": [], "final": True}, serve)
        self.progress(
            f"traffic switched: {len(new)} fresh instance(s) in, {len(self.previous)} out"
        )

    def take_out(self, leaving: Sequence[InstanceRow], *, warm: bool) -> None:
        """Journal ``leaving`` as stopping (never kept warm: it drifted)."""
        leaving_ids = [r.id for r in leaving]
        until = format_time(self.journal.store.clock.now())

        def stopping(tx: StateTx) -> None:
            for iid in leaving_ids:
                tx.set_instance_status(iid, "stopping", {"warm_until": until})

        self.journal.step("drain", {"instances": leaving_ids, "keep_warm": 0}, stopping)

    def destroy(self, leaving: Sequence[InstanceRow], why: str) -> None:
        """Destroy ``leaving`` once requests already sent to them had time to finish.

        Raises:
            RuntimeDriverError: when the runtime cannot destroy one.
        """
        if leaving:
            # Let requests already sent to the leaving instances finish (the router drains them).
            self.sleep(min(self.policy.drain_timeout, 1.0))
        for r in leaving:
            self.driver.destroy(row_instance(r), grace=min(self.policy.drain_timeout, 10.0))


def _replace(
    engine: Engine,
    release: Release,
    policy: Policy,
    driver: Driver,
    kept: list[InstanceRow],
    leaving: list[InstanceRow],
    operations: Sequence[Operation],
) -> tuple[list[Instance], str]:
    """Run ``operations`` (see :func:`~castiron.engine.operations.plan_drift_fix`): create
    fresh instances, health-gate them, route ``kept`` + them atomically, then drain and
    destroy ``leaving``; journaled as a deployment so a crash is recovered."""
    from castiron.engine.deploy import image_runtime
    from castiron.engine.secrets import resolve_secrets

    environment = release.environment
    secret_values = resolve_secrets(
        release, engine.environ, Path(policy.base_dir), engine.store.redactor
    )
    runtime = image_runtime(engine.images, release.digest)
    stored = engine.images.image(release.digest)
    image = ImageRef(release.digest, stored.config_digest, engine.images.root)
    now = engine.store.clock.now()
    deployment = DeploymentRow(
        id=new_deployment_id(),
        environment=environment,
        from_release=release.id,
        to_release=release.id,
        strategy=FIX_STRATEGY,
        actor=engine.store.actor,
        started=now,
        details={"digest": release.digest, "replace": [r.id for r in leaving]},
    )
    journal = Journal.open(
        engine.store,
        deployment,
        engine.observer,
        lambda tx: None,
        {"previous": [r.id for r in leaving], "release": release.id, "why": "drift"},
    )
    rollout = Replacement(
        journal=journal,
        release=release,
        policy=policy,
        image=image,
        runtime=runtime,
        secrets=secret_values,
        driver=driver,
        traffic=engine.traffic,
        previous=leaving,
        prober=engine.prober,
        instance_logs=engine.instance_logs,
        monotonic=engine.monotonic,
        sleep=engine.sleep,
        kept=kept,
    )
    # Up to the switch a failure is undone; after it the environment serves the fresh set.
    switched = next(i for i, op in enumerate(operations) if op.kind == "switch") + 1
    try:
        driver.ensure_image(image)
        execute(rollout, operations[:switched])
    except (Exception, KeyboardInterrupt) as exc:
        engine.observer.progress("replacing drifted instances failed: undoing it")
        engine.undo_failed(
            exc,
            deployment,
            journal.steps(),
            policy,
            "failed",
            what=f"replacing drifted instances of {environment!r}",
        )
        raise
    execute(rollout, operations[switched:])
    new = list(rollout.created)
    leaving_ids = [r.id for r in leaving]

    def forget(tx: StateTx) -> None:
        remove_instances(tx, leaving_ids)

    journal.finish(
        "succeeded",
        {"replaced": leaving_ids, "created": [i.id for i in new], "why": "drift"},
        forget,
    )
    for iid in leaving_ids:
        engine.observer.progress(f"drained and destroyed {iid}")
    return new, deployment.id


def default_threads() -> int:
    """Threads a full scan hashes on: every core."""
    return os.cpu_count() or 1


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
