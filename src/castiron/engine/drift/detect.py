"""Drift detection: what runs compared with what each instance's release says.

Owns :func:`detect_drift`, which reports one :class:`~castiron.engine.drift.report.DriftFinding`
per difference (see :mod:`castiron.engine.drift` for the four kinds), and
:func:`record_detection`, the ``drift.detected`` audit entry of a check that did not fix.
It changes nothing, and reaches runtimes only through the driver protocol plus the optional
read-only capabilities below (:class:`RootfsHolder`, :class:`ChangeLister`,
:class:`LiveDiffer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from castiron.drivers.base import Driver
from castiron.engine.baselines import RootfsHolder, check_tree
from castiron.engine.drift.report import DriftFinding, DriftReport
from castiron.engine.fsdrift import Finding, PathFilter, ScanResult
from castiron.engine.records import load_release
from castiron.engine.release import Release
from castiron.engine.resolve import DriftRules
from castiron.engine.runtimes import find_strays, instance_port
from castiron.engine.strategies import (
    ImageRuntime,
    Policy,
    release_instance_spec,
    row_instance,
)
from castiron.errors import (
    CastironError,
    ImageError,
    NotFoundError,
)
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, Observed
from castiron.state.base import AuditDraft, InstanceRow
from castiron.traffic.controller import RouteDiffer

if TYPE_CHECKING:
    from castiron.engine.context import EngineContext
    from castiron.images.manifest import FileEntry


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
    context: EngineContext
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
            release = load_release(self.context.store, release_id)
            from castiron.engine.targets import image_runtime

            runtime = image_runtime(self.context.images, release.digest)
            config_digest = self.context.images.image(release.digest).config_digest
            self.expected[release_id] = Expected(release, runtime, config_digest)
        return self.expected[release_id]

    def manifest(self, digest: str) -> Callable[[], Mapping[str, FileEntry]]:
        def load() -> Mapping[str, FileEntry]:
            if digest not in self.manifests:
                from castiron.images.manifest import file_index

                self.manifests[digest] = file_index(self.context.images, Digest(digest))
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
    context: EngineContext,
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
    row = context.store.get_environment(environment)
    if row is None:
        raise NotFoundError(f"environment {environment!r} was never deployed")
    policy = Policy.from_json(row.config)
    if row.current_release is None:
        return DriftReport(environment, None)
    release = load_release(context.store, row.current_release)
    ctx = _Context(
        context,
        environment,
        policy,
        release,
        context.driver(policy.runtime),
        baselines,
        rules or DriftRules(),
        full,
        threads,
    )
    return _detect(ctx)


def _detect(ctx: _Context) -> DriftReport:
    context, environment, release, driver = ctx.context, ctx.environment, ctx.release, ctx.driver
    rows = context.store.list_instances(environment)
    serving = [r for r in rows if r.status == "running"]
    observed_list = driver.observe(ctx.policy.app, environment)
    observed = {o.instance.id: o for o in observed_list}
    successors = _successors(observed_list)
    traffic = context.traffic
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
    for rel_row in context.store.list_releases(environment):
        with contextlib.suppress(CastironError):
            stored = context.images.image(rel_row.digest)
            ref = ImageRef(Digest(rel_row.digest), stored.config_digest, context.images.root)
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
        ctx.release.digest, Digest(expected.config_digest or ""), ctx.context.images.root
    )
    # Secret values are not compared (the Secret is checked for presence only): names will do.
    secrets = dict.fromkeys(expected.secret_names, "")
    spec = release_instance_spec(ctx.release, image, expected.runtime, secrets, "drift", "drift")
    return [
        d
        for d in driver.live_diff(spec)
        if d.path not in COVERED_LIVE_PATHS and not d.path.startswith(COVERED_LIVE_PREFIXES)
    ]


def record_detection(context: EngineContext, report: DriftReport, source: str) -> None:
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
    context.store.mutate(
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


def default_threads() -> int:
    """Threads a full scan hashes on: every core."""
    return os.cpu_count() or 1
