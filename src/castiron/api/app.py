"""The ASGI application of ``castiron serve``: the ``/api/v1`` routes, auth, errors, metrics.

Owns request parsing and validation, authentication (a bearer token, or the dashboard's
session cookie plus its CSRF token on every form post), the role check of each route, the
mapping of castiron's errors to HTTP statuses, server-sent events of a deployment's progress
and ``/metrics``. The work is done by :mod:`castiron.api.service` (the same library calls as
the CLI); mutations run as :mod:`castiron.api.jobs` so the dashboard can follow them.

Errors are JSON ``{"error": {"message", "exit_code", "kind"}}``: 400 usage, 401 no or bad
token, 403 role or CSRF, 404 not found, 409 refused by policy, 423 locked, 422 the operation
failed (exit code 1), 500 a bug.

Only this package imports starlette (an import-linter contract says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route

from castiron.api import service
from castiron.api.auth import SESSION_COOKIE, SessionKeys
from castiron.api.events import EventWatcher, Webhook, WebhookSender
from castiron.api.jobs import Job, JobObserver, Jobs
from castiron.api.metrics import Metrics
from castiron.api.openapi import document
from castiron.engine.access import Permission, Principal, authenticate, principal_of
from castiron.errors import (
    CastironError,
    ExitCode,
    LockedError,
    NotFoundError,
    PolicyRefusedError,
    UsageError,
)
from castiron.model import is_name
from castiron.settings import Settings
from castiron.state.base import StateStore

API = "/api/v1"
MAX_BODY = 64 * 1024
"""Largest request body accepted (bytes)."""
SSE_POLL = 0.25
"""Seconds between two looks at a followed deployment's journal."""
SSE_MAX_SECONDS = 3600.0
"""A progress stream ends after this long (the client reconnects with Last-Event-ID)."""
MUTATION_WAIT = 3600.0
"""Longest a mutation with ``wait`` (the default) holds its request."""

_RELEASE = re.compile(r"^[0-9a-f]{16}$")
_DEPLOYMENT = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


@dataclass
class ServeOptions:
    """How ``castiron serve`` runs (everything but the address)."""

    webhooks: list[Webhook] = field(default_factory=list)
    secure_cookies: bool = False
    """Mark the session cookie ``Secure`` (serve behind TLS)."""
    event_interval: float = 0.5
    """Seconds between two reads of the audit chain for events and metrics."""
    webhook_backoff: float = 0.5
    """First retry delay of a webhook (doubled on each retry)."""
    webhook_attempts: int = 5


class Server:
    """What every request shares: settings, the auth store, metrics, events, jobs, sessions."""

    def __init__(self, settings: Settings, options: ServeOptions) -> None:
        self.settings = settings
        self.options = options
        self.metrics = Metrics()
        self.sessions = SessionKeys()
        self.jobs = Jobs()
        self.overview = service.OverviewCache()
        sender = WebhookSender(
            options.webhooks,
            self.metrics,
            attempts=options.webhook_attempts,
            backoff=options.webhook_backoff,
        )
        self.watcher = EventWatcher(
            lambda: service.state(settings), self.metrics, sender, interval=options.event_interval
        )
        self._auth: StateStore | None = None
        self._auth_lock = threading.Lock()
        self._stack = contextlib.ExitStack()

    @property
    def auth_store(self) -> StateStore:
        """The store token lookups use (opened on first use, shared: it is thread-safe)."""
        with self._auth_lock:
            if self._auth is None:
                self._auth = self._stack.enter_context(service.state(self.settings))
            return self._auth

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self._stack.close()
        self._auth = None


# --- errors and auth ------------------------------------------------------------------------


class HttpError(Exception):
    """An error answered with ``status`` (auth, bad requests the routes spot themselves)."""

    def __init__(self, status: int, message: str, kind: str = "UsageError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def status_of(exc: CastironError) -> int:
    """The HTTP status of a castiron error."""
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, LockedError):
        return 423
    if isinstance(exc, PolicyRefusedError):
        return 409
    if exc.exit_code == ExitCode.USAGE:
        return 400
    return 422


def error_response(status: int, message: str, kind: str, exit_code: int | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "kind": kind, "exit_code": exit_code}}, status_code=status
    )


def server_of(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def principal(request: Request, permission: Permission) -> Principal:
    """The caller, checked for ``permission``.

    Raises:
        HttpError: 401 without a live token or session, 403 when the role lacks
            ``permission`` or a cookie-authenticated change lacks its CSRF token.
    """
    cached = request.scope.get("castiron.principal")
    found: Principal | None = cached if isinstance(cached, Principal) else identify(request)
    if found is None:
        raise HttpError(
            401,
            "authentication required: send `Authorization: Bearer TOKEN` (create one with "
            "`castiron token create NAME --role ROLE`)",
            "Unauthorized",
        )
    who = found
    request.scope["castiron.principal"] = who
    if not who.can(permission):
        raise HttpError(
            403,
            f"token {who.identity.id!r} (role {who.role}) may not {permission}",
            "Forbidden",
        )
    return who


def identify(request: Request) -> Principal | None:
    """The caller of ``request`` by bearer token or session cookie, else None."""
    server = server_of(request)
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return authenticate(server.auth_store, secret.strip())
    cookie = request.cookies.get(SESSION_COOKIE)
    name = server.sessions.token_name(cookie)
    if name is None:
        return None
    request.scope["castiron.session"] = cookie
    return principal_of(server.auth_store, name)


def check_csrf(request: Request, presented: str | None) -> None:
    """Refuse a cookie-authenticated change without its CSRF token (a bearer token cannot be
    sent by another site's form, a cookie can).

    Raises:
        HttpError: 403.
    """
    cookie = request.scope.get("castiron.session")
    if not isinstance(cookie, str):
        return
    presented = presented or request.headers.get("x-csrf-token")
    if not server_of(request).sessions.csrf_ok(cookie, presented):
        raise HttpError(403, "missing or wrong CSRF token: reload the page", "Forbidden")


Handler = Callable[[Request], Awaitable[Response]]


def guarded(handler: Handler) -> Handler:
    """Turn errors into JSON responses."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message, exc.kind, None)
        except CastironError as exc:
            return error_response(status_of(exc), str(exc), type(exc).__name__, int(exc.exit_code))

    return wrapped


def env_param(request: Request) -> str:
    name = str(request.path_params["env"])
    if not is_name(name):
        raise UsageError(f"{name!r} is not an environment name")
    return name


def int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}: {raw!r} is not a whole number") from None
    if value < 0 or value > 1_000_000:
        raise UsageError(f"{name}: must be between 0 and 1000000")
    return value


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON object body of a mutation (empty body: ``{}``).

    Raises:
        UsageError: too large, not JSON, not an object.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:  # stop reading: never buffer more than the limit
            raise UsageError(f"request body larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise UsageError(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


def field_str(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise UsageError(f"{name}: required")
        return None
    if not isinstance(value, str) or not value or len(value) > 500:
        raise UsageError(f"{name}: must be a non-empty string")
    return value


def field_float(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 3600:
        raise UsageError(f"{name}: must be a number of seconds between 0 and 3600")
    return float(value)


def field_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise UsageError(f"{name}: must be true or false")
    return value


def check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed - {"wait"})
    if unknown:
        known = ", ".join(sorted(allowed | {"wait"}))
        raise UsageError(f"unknown field(s): {', '.join(unknown)} (known: {known})")


# --- reads ------------------------------------------------------------------------------------


def reader(permission: Permission, read: Callable[[Request, Server], dict[str, Any]]) -> Handler:
    async def handler(request: Request) -> Response:
        principal(request, permission)
        server = server_of(request)
        data = await run_in_threadpool(read, request, server)
        return JSONResponse(data)

    return guarded(handler)


def _me(request: Request, server: Server) -> dict[str, Any]:
    who = principal(request, "read")
    return {"identity": who.identity.to_json(), "role": who.role}


def _environments(request: Request, server: Server) -> dict[str, Any]:
    return {"environments": server.overview.get(server.settings, server.watcher)}


def _environment(request: Request, server: Server) -> dict[str, Any]:
    return service.environment(server.settings, env_param(request))


def _instances(request: Request, server: Server) -> dict[str, Any]:
    status = service.environment(server.settings, env_param(request))
    return {"environment": status["name"], "instances": status["instances"], "warm": status["warm"]}


def _counters(request: Request, server: Server) -> dict[str, Any]:
    status = service.environment(server.settings, env_param(request))
    return {"environment": status["name"], "counters": status["counters"]}


def _releases(request: Request, server: Server) -> dict[str, Any]:
    return service.releases(server.settings, env_param(request))


def _history(request: Request, server: Server) -> dict[str, Any]:
    return service.history(server.settings, env_param(request), int_param(request, "limit", None))


def _drift(request: Request, server: Server) -> dict[str, Any]:
    return service.drift(server.settings, env_param(request))


def _gates(request: Request, server: Server) -> dict[str, Any]:
    return service.gates(server.settings, env_param(request))


def _release_id(request: Request, key: str) -> str:
    value = str(request.path_params[key])
    if not _RELEASE.match(value):
        raise UsageError(f"{value!r} is not a release id (16 hex digits)")
    return value


def _release(request: Request, server: Server) -> dict[str, Any]:
    return service.release(server.settings, _release_id(request, "release"))


def _diff(request: Request, server: Server) -> dict[str, Any]:
    return service.diff(
        server.settings, _release_id(request, "release"), _release_id(request, "other")
    )


def _deployments(request: Request, server: Server) -> dict[str, Any]:
    env = request.query_params.get("environment")
    if env is not None and not is_name(env):
        raise UsageError(f"environment: {env!r} is not an environment name")
    return service.deployments(server.settings, env, int_param(request, "limit", 100))


def _deployment_id(request: Request) -> str:
    value = str(request.path_params["deployment"])
    if not _DEPLOYMENT.match(value):
        raise UsageError(f"{value!r} is not a deployment id")
    return value


def _deployment(request: Request, server: Server) -> dict[str, Any]:
    return service.deployment(server.settings, _deployment_id(request))


def _audit(request: Request, server: Server) -> dict[str, Any]:
    env = request.query_params.get("environment")
    if env is not None and not is_name(env):
        raise UsageError(f"environment: {env!r} is not an environment name")
    return service.audit(
        server.settings, env, request.query_params.get("since"), int_param(request, "limit", 1000)
    )


def _verify(request: Request, server: Server) -> dict[str, Any]:
    return service.verify(server.settings)


def _promotions(request: Request, server: Server) -> dict[str, Any]:
    env = request.query_params.get("environment")
    if env is not None and not is_name(env):
        raise UsageError(f"environment: {env!r} is not an environment name")
    return service.promotions(server.settings, env)


def _locks(request: Request, server: Server) -> dict[str, Any]:
    return service.locks(server.settings)


def _job(request: Request, server: Server) -> dict[str, Any]:
    job = server.jobs.get(str(request.path_params["job"]))
    if job is None:
        raise NotFoundError(f"no job {request.path_params['job']!r} (jobs live in memory)")
    return job.to_json()


# --- mutations --------------------------------------------------------------------------------

Work = Callable[[Server, Principal, str, dict[str, Any], JobObserver], dict[str, Any]]
"""A mutation's work, run in its job's thread; its body was checked by :func:`_validate`."""


def _deploy(
    server: Server, who: Principal, env: str, body: dict[str, Any], obs: JobObserver
) -> dict[str, Any]:
    return service.deploy(
        server.settings,
        who.identity,
        env,
        field_str(body, "image"),
        field_float(body, "lock_wait", 0.0),
        obs,
    )


def _rollback(
    server: Server, who: Principal, env: str, body: dict[str, Any], obs: JobObserver
) -> dict[str, Any]:
    return service.rollback(
        server.settings,
        who.identity,
        env,
        field_str(body, "to"),
        field_float(body, "lock_wait", 0.0),
        obs,
    )


def _promote(
    server: Server, who: Principal, env: str, body: dict[str, Any], obs: JobObserver
) -> dict[str, Any]:
    source = field_str(body, "from", required=True)
    assert source is not None
    return service.promote(
        server.settings,
        who.identity,
        source,
        env,
        field_str(body, "release"),
        field_float(body, "lock_wait", 0.0),
        obs,
    )


def _abort(
    server: Server, who: Principal, env: str, body: dict[str, Any], obs: JobObserver
) -> dict[str, Any]:
    return service.canary_abort(server.settings, who.identity, env, obs)


def _down(
    server: Server, who: Principal, env: str, body: dict[str, Any], obs: JobObserver
) -> dict[str, Any]:
    return service.down(
        server.settings, who.identity, env, field_float(body, "lock_wait", 0.0), obs
    )


MUTATIONS: dict[str, tuple[Permission, Work]] = {
    "deploy": ("deploy", _deploy),
    "rollback": ("deploy", _rollback),
    "promote": ("deploy", _promote),
    "canary/abort": ("deploy", _abort),
    "down": ("admin", _down),
}


async def submit(
    request: Request, action: str, body: dict[str, Any], wait: bool
) -> tuple[Job, Response | None]:
    """Start ``action`` on the route's environment as a job; with ``wait``, also the
    response once it is done (200 with its result, or its error)."""
    permission, work = MUTATIONS[action]
    who = principal(request, permission)
    env = env_param(request)
    server = server_of(request)
    # Validate the fields before anything starts (a bad field is a 400, not a failed job).
    check = {k: v for k, v in body.items() if k != "wait"}
    _validate(action, check)
    job = server.jobs.start(
        action, env, who.identity, lambda obs: work(server, who, env, check, obs)
    )
    if not wait:
        return job, None
    await run_in_threadpool(job.done.wait, MUTATION_WAIT)
    return job, job_response(job)


def _validate(action: str, body: dict[str, Any]) -> None:
    if action == "deploy":
        check_keys(body, {"image", "lock_wait"})
        field_str(body, "image")
    elif action == "rollback":
        check_keys(body, {"to", "lock_wait"})
        field_str(body, "to")
    elif action == "promote":
        check_keys(body, {"from", "release", "lock_wait"})
        field_str(body, "from", required=True)
        field_str(body, "release")
    elif action == "down":
        check_keys(body, {"lock_wait"})
    else:
        check_keys(body, set())
    if "lock_wait" in body:
        field_float(body, "lock_wait", 0.0)


def job_response(job: Job) -> Response:
    """The response of a finished (or still running) job."""
    if not job.done.is_set():
        return JSONResponse(job.to_json(), status_code=202)
    if job.state == "succeeded":
        return JSONResponse({**(job.result or {}), "job": job.id})
    code = job.exit_code or 1
    if job.error_kind == "InternalError":
        status = 500
    elif job.error_kind == "NotFoundError":
        status = 404
    elif code == ExitCode.LOCKED:
        status = 423
    elif code == ExitCode.REFUSED:
        status = 409
    elif code == ExitCode.USAGE:
        status = 400
    else:
        status = 422
    response = error_response(status, job.error or "failed", job.error_kind or "", code)
    response.headers["X-Castiron-Job"] = job.id
    return response


def mutation(action: str) -> Handler:
    async def handler(request: Request) -> Response:
        principal(request, MUTATIONS[action][0])
        check_csrf(request, None)
        body = await read_body(request)
        wait = field_bool(body, "wait", True)
        job, response = await submit(request, action, body, wait)
        if response is None:
            return JSONResponse(job.to_json(), status_code=202)
        return response

    return guarded(handler)


async def _approve(request: Request) -> Response:
    who = principal(request, "approve")
    check_csrf(request, None)
    body = await read_body(request)
    check_keys(body, {"release", "comment"})
    release = field_str(body, "release", required=True)
    comment = body.get("comment", "")
    if not isinstance(comment, str) or len(comment) > 1000:
        raise UsageError("comment: must be a string of at most 1000 characters")
    env = env_param(request)
    server = server_of(request)
    assert release is not None
    data = await run_in_threadpool(
        service.approve, server.settings, who.identity, env, release, comment
    )
    return JSONResponse(data)


async def _continue(request: Request) -> Response:
    who = principal(request, "deploy")
    check_csrf(request, None)
    body = await read_body(request)
    check_keys(body, set())
    server = server_of(request)
    data = await run_in_threadpool(
        service.canary_continue, server.settings, who.identity, env_param(request)
    )
    return JSONResponse(data)


# --- events, metrics, misc --------------------------------------------------------------------


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One server-sent event."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, sort_keys=True)}\n\n"


async def _progress(request: Request) -> Response:
    principal(request, "read")
    server = server_of(request)
    deployment_id = _deployment_id(request)
    first = await run_in_threadpool(service.deployment, server.settings, deployment_id)
    raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    try:
        after = int(raw)
    except ValueError:
        raise UsageError(f"Last-Event-ID: {raw!r} is not a step number") from None

    async def stream() -> AsyncIterator[str]:
        seen = after
        data = first
        started = time.monotonic()
        quiet = time.monotonic()
        yield "retry: 1000\n\n"
        while True:
            for step in data["steps"]:
                if step["seq"] > seen:
                    seen = step["seq"]
                    quiet = time.monotonic()
                    yield sse("step", step, seen)
            if data["outcome"] != "running":
                yield sse(
                    "outcome",
                    {k: data[k] for k in ("id", "outcome", "finished", "duration_s", "error")},
                )
                return
            if time.monotonic() - started > SSE_MAX_SECONDS:
                return
            if time.monotonic() - quiet > 10:
                quiet = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(SSE_POLL)
            data = await run_in_threadpool(service.deployment, server.settings, deployment_id)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _metrics(request: Request) -> Response:
    principal(request, "read")
    return PlainTextResponse(
        server_of(request).metrics.render(), media_type="text/plain; version=0.0.4"
    )


async def _openapi(request: Request) -> Response:
    return JSONResponse(document())


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def api_routes() -> list[Route]:
    """Every route under ``/api/v1`` (the OpenAPI document lists exactly these)."""
    get = ["GET"]
    post = ["POST"]
    return [
        Route("/openapi.json", _openapi, methods=get),
        Route("/me", reader("read", _me), methods=get),
        Route("/environments", reader("read", _environments), methods=get),
        Route("/environments/{env}", reader("read", _environment), methods=get),
        Route("/environments/{env}/instances", reader("read", _instances), methods=get),
        Route("/environments/{env}/counters", reader("read", _counters), methods=get),
        Route("/environments/{env}/releases", reader("read", _releases), methods=get),
        Route("/environments/{env}/history", reader("read", _history), methods=get),
        Route("/environments/{env}/drift", reader("read", _drift), methods=get),
        Route("/environments/{env}/gates", reader("read", _gates), methods=get),
        Route("/environments/{env}/deploy", mutation("deploy"), methods=post),
        Route("/environments/{env}/rollback", mutation("rollback"), methods=post),
        Route("/environments/{env}/promote", mutation("promote"), methods=post),
        Route("/environments/{env}/approve", guarded(_approve), methods=post),
        Route("/environments/{env}/canary/continue", guarded(_continue), methods=post),
        Route("/environments/{env}/canary/abort", mutation("canary/abort"), methods=post),
        Route("/environments/{env}/down", mutation("down"), methods=post),
        Route("/releases/{release}", reader("read", _release), methods=get),
        Route("/releases/{release}/diff/{other}", reader("read", _diff), methods=get),
        Route("/deployments", reader("read", _deployments), methods=get),
        Route("/deployments/{deployment}", reader("read", _deployment), methods=get),
        Route("/deployments/{deployment}/events", guarded(_progress), methods=get),
        Route("/audit", reader("read", _audit), methods=get),
        Route("/audit/verify", reader("read", _verify), methods=get),
        Route("/promotions", reader("read", _promotions), methods=get),
        Route("/locks", reader("read", _locks), methods=get),
        Route("/jobs/{job}", reader("read", _job), methods=get),
    ]


def service_routes() -> list[Route | Mount]:
    """The routes of the API itself: ``/api/v1``, ``/metrics`` and ``/healthz`` (the dashboard's
    pages are :func:`castiron.api.pages.page_routes`; :mod:`castiron.api.site` composes both)."""
    return [
        Mount(API, routes=api_routes()),
        Route("/metrics", guarded(_metrics), methods=["GET"]),
        Route("/healthz", _healthz, methods=["GET"]),
    ]


__all__ = [
    "API",
    "HttpError",
    "ServeOptions",
    "Server",
    "api_routes",
    "check_csrf",
    "identify",
    "job_response",
    "principal",
    "service_routes",
    "status_of",
    "submit",
]
