"""The read side: status of environments, deployment history and releases, as JSON-ready data.

Owns what ``castiron status``, ``history`` and ``releases`` show: the release an environment
serves (digest, tag), its listen address, its instances with their health (one quick probe
each), the router's per-release counters when the agent runs, the warm previous release, a
held lock, an interrupted deployment, and strays (instances the runtime shows that castiron's
records do not know; None when the runtime cannot be asked). It changes nothing.

It knows nothing of click or rendering, and never starts the agent.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from castiron.engine.deploy import Engine
from castiron.engine.rollback import choose, known_good
from castiron.engine.runtimes import environment_strays
from castiron.errors import CastironError, NotFoundError
from castiron.model import HealthCheck
from castiron.state.base import DeploymentRow, format_time_short
from castiron.state.locks import LockManager
from castiron.traffic.controller import Routing

STATUS_PROBE_TIMEOUT = 1.0
"""Seconds one health probe of ``status`` may take."""


def _tags_by_digest(engine: Engine) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    try:
        for tag, digest in engine.images.tags().items():
            out.setdefault(digest, []).append(tag)
    except CastironError:
        pass
    return out


def _last(items: list[str]) -> str | None:
    return items[-1] if items else None


def _warm_releases(engine: Engine, name: str, warm_rows: list[Any]) -> list[dict[str, Any]]:
    """Each warm release with its own id, digest and instances; newest known-good first (the
    order rollback considers them in)."""
    by_release: dict[str, list[Any]] = {}
    for r in warm_rows:
        by_release.setdefault(r.release, []).append(r)
    rank = {rid: i for i, rid in enumerate(known_good(engine.context, name))}
    out: list[dict[str, Any]] = []
    for release_id in sorted(by_release, key=lambda rid: rank.get(rid, len(rank))):
        members = by_release[release_id]
        try:
            digest: str | None = engine.load_release(release_id).digest
        except CastironError:
            digest = None
        until = [str(r.data.get("warm_until")) for r in members if r.data.get("warm_until")]
        out.append(
            {
                "release": release_id,
                "digest": digest,
                "until": max(until) if until else None,
                "instances": [
                    {"id": r.id, "address": r.address, "until": r.data.get("warm_until")}
                    for r in members
                ],
            }
        )
    return out


def _rollback_target(engine: Engine, name: str) -> dict[str, Any] | None:
    """Exactly what ``castiron rollback NAME`` would choose now (None: nothing to go back to)."""
    try:
        choice = choose(engine.context, name)
    except CastironError:
        return None
    return {
        "release": choice.release.id,
        "digest": choice.release.digest,
        "warm": len(choice.warm) >= choice.release.config.replicas,
        "warm_instances": len(choice.warm),
    }


def environment_status(
    engine: Engine, name: str, *, router: bool = True, tags: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The status of environment ``name`` as a JSON-ready object.

    Raises:
        NotFoundError: when the environment was never deployed.
    """
    row = engine.store.get_environment(name)
    if row is None:
        raise NotFoundError(f"environment {name!r} was never deployed")
    tags = tags if tags is not None else _tags_by_digest(engine)
    release = engine.load_release(row.current_release) if row.current_release else None
    check: HealthCheck | None = None
    env: dict[str, str] = {}
    if release is not None:
        check = replace(
            release.config.health,
            timeout=min(release.config.health.timeout, STATUS_PROBE_TIMEOUT),
        )
        env = dict(release.config.env)
    routing: Routing | None = None
    counters: list[dict[str, Any]] | None = None
    if router:
        try:
            routing = engine.traffic.current(name)
            counters = [
                {
                    "release": c.release,
                    "requests": c.requests,
                    "responses_2xx": c.responses_2xx,
                    "responses_5xx": c.responses_5xx,
                    "connect_errors": c.connect_errors,
                    "p95_ms": c.latency.p95_ms,
                }
                for c in engine.traffic.counters(name)
            ]
        except CastironError:
            routing, counters = None, None
    rows = engine.store.list_instances(name)
    serving = [r for r in rows if r.status == "running"]
    instances: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in serving:
        seen.add(r.id)
        instances.append(
            {"id": r.id, "address": r.address, "release": r.release, "status": r.status}
        )
    if routing is not None:
        for backend_set in (routing.stable, routing.canary):
            if backend_set is None:
                continue
            for backend in backend_set.backends:
                if backend.id not in seen:  # a replacement the agent made
                    seen.add(backend.id)
                    instances.append(
                        {
                            "id": backend.id,
                            "address": backend.address,
                            "release": backend_set.release,
                            "status": "running",
                            "replacement": True,
                        }
                    )
    for item in instances:
        item["healthy"] = (
            engine.prober(check, item["address"], env).ok if check is not None else False
        )
        item["in_route"] = item["id"] in routing.backend_ids if routing else None
    warm = _warm_releases(engine, name, [r for r in rows if r.status == "warm"])
    pending = [d.id for d in engine.store.list_deployments(name, limit=5) if d.outcome == "running"]
    strays = environment_strays(
        engine.context, name, seen | {r.id for r in rows}, agent_running=router
    )
    locks = LockManager(engine.store).status(name)
    return {
        "name": name,
        "runtime": row.runtime,
        "listen": row.listen,
        "url": f"http://{row.listen}/" if row.current_release else None,
        "release": row.current_release,
        "digest": release.digest if release else None,
        "tag": _last(tags.get(release.digest, [])) if release else None,
        "known_good": row.known_good_release,
        "strategy": row.config.get("strategy"),
        "updated": format_time_short(row.updated) if row.updated else None,
        "instances": instances,
        "warm": warm,
        "rollback_target": _rollback_target(engine, name),
        "router": None if routing is None else {"releases": list(routing.releases)},
        "counters": counters,
        "lock": locks[0].as_json() if locks else None,
        "interrupted": pending,
        "strays": strays,
    }


def status(
    engine: Engine, environment: str | None = None, *, router: bool = True
) -> dict[str, Any]:
    """``{"environments": [...]}`` for ``environment`` or every deployed environment.

    Raises:
        NotFoundError: when ``environment`` was never deployed.
    """
    names = (
        [environment]
        if environment is not None
        else [e.name for e in engine.store.list_environments()]
    )
    tags = _tags_by_digest(engine)
    return {
        "environments": [environment_status(engine, n, router=router, tags=tags) for n in names]
    }


def _deployment_json(d: DeploymentRow) -> dict[str, Any]:
    duration = (d.finished - d.started).total_seconds() if d.finished is not None else None
    return {
        "id": d.id,
        "from": d.from_release,
        "to": d.to_release,
        "strategy": d.strategy,
        "actor": d.actor,
        "started": format_time_short(d.started),
        "finished": format_time_short(d.finished) if d.finished else None,
        "duration_s": None if duration is None else round(duration, 3),
        "outcome": d.outcome,
        "git_commit": d.git_commit,
        "digest": d.details.get("digest"),
        "tag": d.details.get("tag"),
        "error": d.details.get("error"),
        "recovered": bool(d.details.get("recovered")),
    }


def history(engine: Engine, environment: str, limit: int | None = None) -> dict[str, Any]:
    """Every deployment of ``environment``, newest first."""
    deployments = engine.store.list_deployments(environment, limit=limit)
    return {
        "environment": environment,
        "deployments": [_deployment_json(d) for d in deployments],
    }


def releases(engine: Engine, environment: str) -> dict[str, Any]:
    """Every release recorded for ``environment``, newest first, with its standing."""
    row = engine.store.get_environment(environment)
    good = set(known_good(engine.context, environment))
    warm = {r.release for r in engine.store.list_instances(environment) if r.status == "warm"}
    tags = _tags_by_digest(engine)
    last: dict[str, str] = {}
    for d in reversed(engine.store.list_deployments(environment)):
        last[d.to_release] = d.outcome
    items = []
    for r in reversed(engine.store.list_releases(environment)):
        items.append(
            {
                "id": r.id,
                "digest": r.digest,
                "tags": tags.get(r.digest, []),
                "created": format_time_short(r.created),
                "current": row is not None and row.current_release == r.id,
                "known_good": r.id in good,
                "warm": r.id in warm,
                "last_outcome": last.get(r.id),
                "replicas": r.config.get("replicas"),
            }
        )
    return {"environment": environment, "releases": items}


__all__ = ["STATUS_PROBE_TIMEOUT", "environment_status", "history", "releases", "status"]
