"""Deployment policy: the gates a change must pass before any instance is created.

Owns the evaluation of an environment's gates (:class:`~castiron.engine.resolve.GatePolicy`,
resolved with the spec) against the state store, the image store and the source
environment (:func:`evaluate`, :func:`preview`), running the ``checks`` commands, and
enforcement (:func:`enforce`): every evaluation is recorded (the ``gate_results`` table) with
one audit entry in the same transaction — ``policy.pass``, or ``policy.refuse`` with result
``refused`` — and a refusal raises :class:`~castiron.errors.PolicyRefusedError` naming the rule.

The gates, in the order they are checked (checks run only when the others pass):

``require_signature``
    the image carries a valid signature (and signed provenance) by one of the listed public
    keys (paths relative to the spec's directory); ``true`` means any key in
    ``CASTIRON_HOME/keys/*.pub``.
``promote_from``
    a deployment of the same image digest succeeded in the source environment.
``soak``
    the digest has served the source environment continuously for at least that long: from
    the end of the successful deployment that put it there, until now or until a later
    successful deployment (or rollback, or ``down``) replaced it. Any such period counts.
``approvals``
    that many approvals of exactly this release for this environment, each signed by one of
    the ``approvers`` public keys, by distinct keys and distinct OS users, none by the
    deploying OS user (``CASTIRON_ACTOR`` is a label and counts for nothing).
``checks``
    every command exits 0 within :data:`CHECK_TIMEOUT` seconds; ``${URL}`` (and ``$URL`` in
    the command's environment) is ``http://<source environment's listen address>`` (the
    environment's own address when it has no source).

The source environment is ``promote_from`` (or, for ``castiron promote`` to an environment
without it, the environment promoted from). ``soak`` and ``promote_from`` need a source.

It knows nothing of the CLI: it never prints or exits, and reads no process environment (the
engine passes the environment captured by the settings).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from castiron.engine.resolve import GATES, GateName, GatePolicy
from castiron.errors import CastironError, PolicyRefusedError
from castiron.model import Digest, ReleaseId
from castiron.state.base import (
    ApprovalRow,
    AuditDraft,
    GateResultRow,
    StateStore,
    StateTx,
    parse_time,
)

if TYPE_CHECKING:
    from castiron.engine.context import EngineContext
    from castiron.engine.release import Release
    from castiron.engine.strategies import Target
    from castiron.images.sign import VerifyKey
    from castiron.images.store import ImageStore

CHECK_TIMEOUT = 60.0
"""Seconds a ``checks`` command may run before it is killed (and the gate refuses)."""

OUTPUT_CAP = 4096
"""Bytes of a check's output kept (the end of it) in the gate results."""

KEYS_DIR = "keys"
"""The directory under ``CASTIRON_HOME`` whose ``*.pub`` keys ``require_signature: true``
trusts."""


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate."""

    gate: GateName
    passed: bool
    reason: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with the gate's data)."""
        return {"gate": self.gate, "passed": self.passed, "reason": self.reason, **self.data}


@dataclass(frozen=True)
class GateReport:
    """Every gate evaluated for one change; ``evaluation`` names it in the state store."""

    evaluation: str
    environment: str
    release: ReleaseId
    digest: Digest
    results: tuple[GateResult, ...]

    @property
    def ok(self) -> bool:
        """True when every evaluated gate passed."""
        return all(r.passed for r in self.results)

    @property
    def refused(self) -> tuple[GateResult, ...]:
        """The gates that refused, in evaluation order."""
        return tuple(r for r in self.results if not r.passed)

    def summary(self) -> list[dict[str, Any]]:
        """``[{gate, passed, reason}]``: what deployment details and audit entries carry."""
        return [{"gate": r.gate, "passed": r.passed, "reason": r.reason} for r in self.results]

    def details(self) -> dict[str, Any]:
        """What a deployment allowed by this report records in its details."""
        return {"gates": {"evaluation": self.evaluation, "results": self.summary()}}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, with each gate's data."""
        return {
            "evaluation": self.evaluation,
            "environment": self.environment,
            "release": self.release,
            "digest": self.digest,
            "ok": self.ok,
            "results": [r.to_json() for r in self.results],
        }


def refusal_message(result: GateResult) -> str:
    """``refused by policy (RULE): REASON``."""
    return f"refused by policy ({result.gate}): {result.reason}"


# --- the gates -------------------------------------------------------------------------------


def signature_keys(policy: GatePolicy, keys_dir: Path) -> tuple[list[Path], str]:
    """The public keys ``require_signature`` trusts, and how to name them in messages."""
    if isinstance(policy.require_signature, tuple):
        paths = [policy.base_dir / name for name in policy.require_signature]
        return paths, ", ".join(policy.require_signature)
    found = sorted(keys_dir.glob("*.pub")) if keys_dir.is_dir() else []
    names = ", ".join(p.name for p in found)
    return found, f"any key in {keys_dir}" + (f" ({names})" if names else "")


def check_signature(
    images: ImageStore, digest: Digest, policy: GatePolicy, keys_dir: Path
) -> GateResult:
    """The ``require_signature`` gate. Never raises for a bad signature, key or image: each
    is a refusal with its reason (the gate fails closed)."""
    from castiron.images.sign import verify_image

    paths, named = signature_keys(policy, keys_dir)
    if not paths:
        return GateResult(
            "require_signature",
            False,
            f"image {digest} cannot be verified: there is no public key in {keys_dir} "
            "(require_signature: true trusts the *.pub files there)",
        )
    try:
        result = verify_image(images, digest, paths)
    except CastironError as exc:
        return GateResult("require_signature", False, f"image {digest} cannot be verified: {exc}")
    data: dict[str, Any] = {"keys": named, "keyids": list(result.keyids)}
    if result.ok:
        by = result.verified_by
        who = f"{by.source} ({by.keyid})" if by is not None else named
        return GateResult("require_signature", True, f"signed by {who}", data)
    if not result.signature.ok:
        if not result.signature.artifacts:
            reason = f"image {digest} has no signature by {named}"
        else:
            reason = (
                f"image {digest} has no valid signature by {named}: {result.signature.summary()}"
            )
    else:
        reason = (
            f"image {digest}: its provenance is not signed by {named}: "
            f"{result.provenance.summary()}"
        )
    reasons = [str(r) for r in (*result.signature.reasons, *result.provenance.reasons)]
    return GateResult("require_signature", False, reason, {**data, "reasons": reasons})


def _digest_of(store: StateStore, release: str, cache: dict[str, Digest | None]) -> Digest | None:
    if release not in cache:
        row = store.get_release(ReleaseId(release))
        cache[release] = row.digest if row is not None else None
    return cache[release]


def check_promote_from(store: StateStore, source: str, digest: Digest) -> GateResult:
    """The ``promote_from`` gate: a deployment of ``digest`` succeeded in ``source``."""
    cache: dict[str, Digest | None] = {}
    tried: list[str] = []
    for deployment in store.list_deployments(source):
        if _digest_of(store, deployment.to_release, cache) != digest:
            continue
        if deployment.outcome == "succeeded":
            return GateResult(
                "promote_from",
                True,
                f"deployed successfully to {source} (deployment {deployment.id})",
                {"source": source, "deployment": deployment.id, "release": deployment.to_release},
            )
        tried.append(f"{deployment.id} {deployment.outcome}")
    if tried:
        why = f"its deployments there did not succeed ({', '.join(tried[:3])})"
    else:
        why = "it was never deployed there"
    return GateResult(
        "promote_from",
        False,
        f"image {digest} has not been deployed successfully to {source}: {why}",
        {"source": source},
    )


def serving_periods(
    store: StateStore, environment: str, digest: Digest, now: datetime
) -> list[tuple[datetime, datetime]]:
    """The periods during which ``digest`` was the serving image of ``environment``: from the
    end of the successful deployment (or rollback) that put it there until the next one that
    put another image there, or ``down``, or ``now`` (for the current period)."""
    cache: dict[str, Digest | None] = {}
    changes: list[tuple[datetime, Digest | None]] = []
    for d in store.list_deployments(environment):
        if d.outcome == "succeeded" and d.finished is not None:
            changes.append((d.finished, _digest_of(store, d.to_release, cache)))
    for entry in store.audit_entries(environment=environment):
        if entry.action == "env.down":
            with contextlib.suppress(ValueError):
                changes.append((parse_time(entry.time), None))
    changes.sort(key=lambda c: c[0])
    periods: list[tuple[datetime, datetime]] = []
    since: datetime | None = None
    for at, served in changes:
        if served == digest and since is None:
            since = at
        elif served != digest and since is not None:
            periods.append((since, at))
            since = None
    if since is not None:
        periods.append((since, max(now, since)))
    return periods


def human_duration(seconds: float) -> str:
    """``4m12s``, ``10m``, ``2h05m``, ``45s``, ``0.5s``."""
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m" + (f"{whole % 60:02d}s" if whole % 60 else "")
    return f"{whole // 3600}h" + (f"{(whole % 3600) // 60:02d}m" if whole % 3600 else "")


def check_soak(
    store: StateStore, source: str, digest: Digest, soak: float, now: datetime
) -> GateResult:
    """The ``soak`` gate: ``digest`` served ``source`` for at least ``soak`` seconds in a row."""
    periods = serving_periods(store, source, digest, now)
    longest = max(periods, key=lambda p: p[1] - p[0]) if periods else None
    served = (longest[1] - longest[0]).total_seconds() if longest is not None else 0.0
    data: dict[str, Any] = {"source": source, "required_s": soak, "served_s": round(served, 3)}
    if longest is not None:
        data["since"] = longest[0].isoformat()
    need = human_duration(soak)
    if longest is None:
        return GateResult(
            "soak", False, f"image {digest} has never served {source} (soak {need})", data
        )
    if served >= soak:
        return GateResult(
            "soak", True, f"served {source} for {human_duration(served)} (soak {need})", data
        )
    current = periods[-1][1] >= now
    state = "has served" if current and longest is periods[-1] else "served"
    return GateResult(
        "soak",
        False,
        f"image {digest} {state} {source} for {human_duration(served)}, less than the "
        f"soak of {need}",
        data,
    )


APPROVAL_TYPE = "castiron.approval.v1"
"""The ``type`` of the statement an approver signs."""


def approval_payload(environment: str, release: str, os_user: str) -> bytes:
    """The exact bytes an approval's signature covers: canonical JSON naming the type, the
    environment, the release id (a hash of the image digest and the resolved config) and the
    OS user who recorded it, so a signature can be neither moved to another release or
    environment nor claimed by another user."""
    doc = {
        "environment": environment,
        "os_user": os_user,
        "release": release,
        "type": APPROVAL_TYPE,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def approver_keys(policy: GatePolicy) -> list[VerifyKey]:
    """The public keys of ``policy.approvers`` (paths relative to the spec's directory).

    Raises:
        UsageError: naming a key file that is missing or not a P-256 public key.
    """
    from castiron.images.sign import load_verify_key

    return [load_verify_key(policy.base_dir / name, name) for name in policy.approvers]


def _why_not_token(store: StateStore, row: ApprovalRow, deployer: str) -> str:
    """Why an API token's approval cannot count (empty when it can): the token must still
    exist, not be revoked and hold a role that may approve."""
    assert row.identity is not None
    token = store.get_token(row.identity.id)
    if token is None:
        return f"{row.identity}: no such API token"
    if token.revoked is not None:
        return f"{row.identity}: the token was revoked"
    if token.role not in ("approver", "admin"):
        return f"{row.identity}: a {token.role} token may not approve"
    if deployer in (row.identity.actor, row.actor):
        return f"{row.identity}: the deployer's own approval does not count"
    return ""


def _why_not(
    row: ApprovalRow, keys: Mapping[str, VerifyKey], deployer: str
) -> tuple[str, VerifyKey | None]:
    """Why ``row`` cannot count (empty when it can), and the approver key it is bound to."""
    import base64
    import binascii

    if row.identity is None or row.identity.kind != "key":
        return f"{row.actor}: not signed (recorded before approvals were signed)", None
    key = keys.get(row.identity.id)
    if key is None:
        return f"{row.os_user}: key {row.identity.id[:19]}... is not an approver", None
    try:
        signature = base64.b64decode(row.signature, validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    if not key.verifies(signature, approval_payload(row.environment, row.release, row.os_user)):
        return f"{row.os_user}: the signature by {key.source} does not verify", None
    if row.os_user == deployer:
        return f"{row.os_user}: the deployer's own approval does not count", key
    return "", key


def check_approvals(
    store: StateStore,
    environment: str,
    release: ReleaseId,
    needed: int,
    deployer: str,
    approvers: Sequence[VerifyKey],
) -> GateResult:
    """The ``approvals`` gate: ``needed`` approvals of ``release`` for ``environment``, each
    signed by one of ``approvers``' keys, by distinct keys *and* distinct OS users, none by
    ``deployer`` (the deploying OS user). Never raises for a bad approval: it does not count."""
    keys = {k.keyid: k for k in approvers}
    # Deploying through the API, the deployer is the token (the server's OS user is no one).
    if store.actor.startswith("token:"):
        deployer = store.actor
    counted: list[str] = []
    not_counted: list[str] = []
    seen_keys: set[str] = set()
    seen_users: set[str] = set()
    seen_tokens: set[str] = set()
    for row in store.approvals(environment, release):
        if row.identity is not None and row.identity.kind == "token":
            why = _why_not_token(store, row, deployer)
            if not why and row.identity.id in seen_tokens:
                why = f"{row.identity}: already counted"
            if why:
                not_counted.append(why)
            else:
                seen_tokens.add(row.identity.id)
                counted.append(str(row.identity))
            continue
        why, key = _why_not(row, keys, deployer)
        if key is not None and not why:
            if key.keyid in seen_keys:
                why = f"{row.os_user}: key {key.source} already counted"
            elif row.os_user in seen_users:
                why = f"{row.os_user}: already counted with another key"
        if why:
            not_counted.append(why)
            continue
        assert key is not None
        seen_keys.add(key.keyid)
        seen_users.add(row.os_user)
        counted.append(f"{row.os_user} ({key.source})")
    data: dict[str, Any] = {"required": needed, "approvers": counted}
    if not_counted:
        data["not_counted"] = not_counted
    if len(counted) >= needed:
        return GateResult(
            "approvals", True, f"approved by {', '.join(counted)} ({needed} needed)", data
        )
    have = f"{len(counted)}" + (f" ({', '.join(counted)})" if counted else "")
    skipped = f"; not counted: {'; '.join(not_counted)}" if not_counted else ""
    return GateResult(
        "approvals",
        False,
        f"release {release} for {environment} needs {needed} approval(s) signed by approver "
        f"keys of distinct users (or by distinct approver API tokens) other than the deployer "
        f"({deployer}), it has {have}{skipped}: "
        f"run `castiron approve {environment} {release} --key KEY`",
        data,
    )


@dataclass(frozen=True)
class CheckRun:
    """One ``checks`` command as it ran."""

    argv: tuple[str, ...]
    exit_code: int | None
    """None when it could not start or was killed at the timeout."""
    output: str
    """The end of its combined stdout and stderr (at most :data:`OUTPUT_CAP` bytes)."""
    duration_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "exit_code": self.exit_code,
            "output": self.output,
            "duration_s": round(self.duration_s, 3),
            "error": self.error,
        }


def _cap(data: bytes, masks: Sequence[str]) -> str:
    text = data[-OUTPUT_CAP:].decode("utf-8", errors="replace")
    for value in masks:
        if value:
            text = text.replace(value, "(secret)")
    return ("..." if len(data) > OUTPUT_CAP else "") + text


def run_check(
    argv: Sequence[str],
    *,
    url: str,
    environ: Mapping[str, str],
    cwd: Path,
    timeout: float = CHECK_TIMEOUT,
    masks: Sequence[str] = (),
) -> CheckRun:
    """Run one check: ``${URL}`` (and other ``${VAR}``) substituted in its arguments, ``URL``
    set in its environment, in ``cwd``, killed (with its process group) after ``timeout``.
    Values in ``masks`` are replaced by ``(secret)`` in the output kept. Never raises for the
    command's own failure."""
    import signal
    import subprocess

    from castiron.spec.load import interpolate_text

    env = {**environ, "URL": url}
    args: list[str] = []
    problems: list[str] = []
    for arg in argv:
        text, errors = interpolate_text(arg, env)
        args.append(text)
        problems += errors
    started = time.monotonic()
    if problems:
        return CheckRun(tuple(argv), None, "", 0.0, "; ".join(problems))
    try:
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return CheckRun(tuple(args), None, "", 0.0, f"cannot run {args[0]!r}: {exc.strerror}")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return CheckRun(
            tuple(args),
            None,
            _cap(out, masks),
            time.monotonic() - started,
            f"timed out after {human_duration(timeout)}",
        )
    return CheckRun(tuple(args), proc.returncode, _cap(out, masks), time.monotonic() - started)


def check_commands(
    policy: GatePolicy,
    url: str,
    environ: Mapping[str, str],
    *,
    timeout: float = CHECK_TIMEOUT,
    masks: Sequence[str] = (),
) -> GateResult:
    """The ``checks`` gate: each command in turn must exit 0 (the first failure stops)."""
    import shlex

    runs: list[CheckRun] = []
    for argv in policy.checks:
        run = run_check(
            argv, url=url, environ=environ, cwd=policy.base_dir, timeout=timeout, masks=masks
        )
        runs.append(run)
        if not run.ok:
            break
    data = {"url": url, "checks": [r.to_json() for r in runs]}
    failed = next((r for r in runs if not r.ok), None)
    if failed is None:
        return GateResult("checks", True, f"{len(runs)} check(s) passed against {url}", data)
    how = failed.error or f"exited {failed.exit_code}"
    last = next((ln for ln in reversed(failed.output.splitlines()) if ln.strip()), "")
    tail = f": {last.strip()[:200]}" if last else ""
    return GateResult(
        "checks",
        False,
        f"check `{shlex.join(failed.argv)}` against {url} {how}{tail}",
        data,
    )


def secret_values(release: Release, environ: Mapping[str, str], base_dir: Path) -> list[str]:
    """The values of ``release``'s secrets that can be read now, to keep them out of stored
    check output."""
    values: list[str] = []
    for _, ref in release.config.secrets:
        kind, _, where = ref.partition(":")
        if kind == "env" and environ.get(where):
            values.append(environ[where])
        elif kind == "file":
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = (base_dir / where).read_text().strip()
                if text:
                    values.append(text)
    return sorted(values, key=len, reverse=True)


# --- evaluation -------------------------------------------------------------------------------


def keys_dir_of(engine: EngineContext) -> Path:
    """``CASTIRON_HOME/keys``: beside the engine's image store (``CASTIRON_HOME/images``)."""
    return engine.images.root.parent / KEYS_DIR


def evaluate(
    engine: EngineContext,
    target: Target,
    policy: GatePolicy,
    *,
    run_checks: bool = True,
    check_timeout: float = CHECK_TIMEOUT,
) -> GateReport:
    """Evaluate every gate of ``policy`` for ``target`` (records nothing). ``checks`` run only
    when ``run_checks`` and every other gate passed."""
    store = engine.store
    release = target.release
    results: list[GateResult] = []
    now = store.clock.now()
    for gate in policy.active:
        if gate == "require_signature":
            results.append(
                check_signature(engine.images, release.digest, policy, keys_dir_of(engine))
            )
        elif gate == "promote_from" and policy.source is not None:
            results.append(check_promote_from(store, policy.source, release.digest))
        elif gate == "soak" and policy.source is not None and policy.soak:
            results.append(check_soak(store, policy.source, release.digest, policy.soak, now))
        elif gate == "approvals":
            results.append(
                check_approvals(
                    store,
                    target.environment,
                    release.id,
                    policy.approvals,
                    engine.os_user,
                    approver_keys(policy),
                )
            )
        elif gate == "checks" and run_checks and all(r.passed for r in results):
            masks = secret_values(release, engine.environ, policy.base_dir)
            store.redactor.add(masks)
            url = policy.check_url(store)
            engine.observer.progress(f"running {len(policy.checks)} check(s) against {url}")
            results.append(
                check_commands(policy, url, engine.environ, timeout=check_timeout, masks=masks)
            )
    return GateReport(
        evaluation="g-" + secrets.token_hex(6),
        environment=target.environment,
        release=release.id,
        digest=release.digest,
        results=tuple(results),
    )


def preview(engine: EngineContext, target: Target, policy: GatePolicy) -> GateReport:
    """What the gates would say now, without running the checks (for plans)."""
    return evaluate(engine, target, policy, run_checks=False)


def record(store: StateStore, report: GateReport) -> None:
    """Record ``report``'s results with one audit entry: ``policy.pass`` (result ``ok``) or
    ``policy.refuse`` (result ``refused``, naming the rule).

    Raises:
        StateError: when the database cannot be written.
    """
    now = store.clock.now()
    rows = [
        GateResultRow(
            evaluation=report.evaluation,
            environment=report.environment,
            release=report.release,
            digest=report.digest,
            gate=r.gate,
            passed=r.passed,
            reason=r.reason,
            checked=now,
            data=dict(r.data),
        )
        for r in report.results
    ]
    refused = report.refused
    details: dict[str, Any] = {
        "evaluation": report.evaluation,
        "digest": report.digest,
        "gates": report.summary(),
    }
    if refused:
        details["rule"] = refused[0].gate
        details["reason"] = refused[0].reason

    def apply(tx: StateTx) -> None:
        tx.add_gate_results(rows)

    store.mutate(
        AuditDraft(
            "policy.refuse" if refused else "policy.pass",
            environment=report.environment,
            subject=report.release,
            to=report.release,
            result="refused" if refused else "ok",
            details=details,
        ),
        apply,
    )


def refuse(store: StateStore, target: Target, result: GateResult) -> PolicyRefusedError:
    """Record a refusal decided before evaluation (e.g. a promotion from the wrong
    environment) and return the error to raise.

    Raises:
        StateError: when the database cannot be written.
    """
    report = GateReport(
        evaluation="g-" + secrets.token_hex(6),
        environment=target.environment,
        release=target.release.id,
        digest=target.release.digest,
        results=(result,),
    )
    record(store, report)
    return PolicyRefusedError(refusal_message(result), rule=result.gate)


def enforce(
    engine: EngineContext, target: Target, *, check_timeout: float = CHECK_TIMEOUT
) -> GateReport | None:
    """Evaluate, record and enforce ``target``'s gates (call with the environment's lock
    held, after the plan is shown and before any instance is created). Returns the report
    (None when the environment has no gates).

    Raises:
        PolicyRefusedError: naming the first gate that refused (others on following lines).
        StateError: when the results cannot be recorded.
    """
    policy = target.gates
    if policy is None or not policy.active:
        return None
    report = evaluate(engine, target, policy, check_timeout=check_timeout)
    record(engine.store, report)
    refused = report.refused
    if refused:
        lines = [refusal_message(refused[0])]
        lines += [f"also refused by {r.gate}: {r.reason}" for r in refused[1:]]
        raise PolicyRefusedError("\n".join(lines), rule=refused[0].gate)
    for result in report.results:
        engine.observer.progress(f"gate {result.gate}: {result.reason}")
    return report


def with_source(policy: GatePolicy, source: str, listen: str | None) -> GatePolicy:
    """``policy`` with ``source`` as the environment releases come from (for a promotion to
    an environment that names none)."""
    return replace(policy, source=source, source_listen=listen)


__all__ = [
    "APPROVAL_TYPE",
    "CHECK_TIMEOUT",
    "GATES",
    "KEYS_DIR",
    "OUTPUT_CAP",
    "CheckRun",
    "GateName",
    "GatePolicy",
    "GateReport",
    "GateResult",
    "approval_payload",
    "approver_keys",
    "check_approvals",
    "check_commands",
    "check_promote_from",
    "check_signature",
    "check_soak",
    "enforce",
    "evaluate",
    "human_duration",
    "keys_dir_of",
    "preview",
    "record",
    "refusal_message",
    "refuse",
    "run_check",
    "secret_values",
    "serving_periods",
    "signature_keys",
    "with_source",
]
