"""The web dashboard of ``castiron serve``: server-rendered pages, one small script, no build.

Owns the pages (environments at a glance, an environment with its instances, live counters,
history and release diff, a deployment's live progress over server-sent events, the audit log
with its verification, promotion gates with approve buttons, rollback with a confirmation),
the login form that turns an API token into a session cookie (``HttpOnly``,
``SameSite=Strict``, ``Secure`` when serving behind TLS) and the CSRF token of every form.
Data comes from :mod:`castiron.api.service`, like the API's.

Templates (Jinja2, autoescaped) and the static files live in ``templates/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from castiron.api import service
from castiron.api.app import (
    HttpError,
    check_csrf,
    identify,
    principal,
    server_of,
    status_of,
    submit,
)
from castiron.api.auth import SESSION_COOKIE, SESSION_SECONDS
from castiron.engine.access import Permission, Principal, authenticate
from castiron.errors import CastironError, UsageError
from castiron.model import is_name

PAGES = Path(__file__).with_name("templates")
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
REDIRECT_WAIT = 10.0
"""Seconds a dashboard action waits for its deployment to start before showing the job."""

_templates = Environment(
    loader=FileSystemLoader(str(PAGES)),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _short(value: object, width: int = 12) -> str:
    text = "" if value is None else str(value)
    return text.removeprefix("sha256:")[:width]


def _age(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


_templates.filters["short"] = _short
_templates.filters["age"] = _age


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    who = request.scope.get("castiron.principal")
    cookie = request.scope.get("castiron.session")
    csrf = server_of(request).sessions.csrf(cookie) if isinstance(cookie, str) else ""
    html = _templates.get_template(name).render(
        who=who if isinstance(who, Principal) else None, csrf=csrf, **context
    )
    return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})


def page(permission: Permission, body: Any) -> Any:
    """A page handler: the caller must be logged in (else: the login page) with
    ``permission``; castiron's errors become an error page with the matching status."""

    async def handler(request: Request) -> Response:
        if identify(request) is None:
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        try:
            principal(request, permission)
            response: Response = await body(request)
            return response
        except HttpError as exc:
            return render(request, "error.html", exc.status, message=exc.message)
        except CastironError as exc:
            return render(request, "error.html", status_of(exc), message=str(exc))

    return handler


def _env(request: Request) -> str:
    name = str(request.path_params["env"])
    if not is_name(name):
        raise UsageError(f"{name!r} is not an environment name")
    return name


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


# --- login ------------------------------------------------------------------------------------


def _next(raw: str | None) -> str:
    # Only local paths: never an open redirect.
    return raw if raw and raw.startswith("/") and not raw.startswith("//") else "/"


async def login_page(request: Request) -> Response:
    return render(request, "login.html", next=_next(request.query_params.get("next")), error=None)


async def login(request: Request) -> Response:
    form = await _form(request)
    server = server_of(request)
    secret = form.get("token", "").strip()
    target = _next(form.get("next"))
    who = await run_in_threadpool(authenticate, server.auth_store, secret)
    if who is None:
        # 200, not 401: the form is shown again with its message (a browser logs any 4xx
        # page load as a console error).
        return render(request, "login.html", next=target, error="unknown or revoked token")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        server.sessions.issue(who.identity.id),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=server.options.secure_cookies,
        path="/",
    )
    return response


async def logout(request: Request) -> Response:
    form = await _form(request)
    if identify(request) is not None:
        check_csrf(request, form.get("csrf"))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- pages --------------------------------------------------------------------------------------


async def home(request: Request) -> Response:
    server = server_of(request)
    envs = await run_in_threadpool(server.overview.get, server.settings, server.watcher)
    return render(request, "home.html", environments=envs)


async def environment(request: Request) -> Response:
    name = _env(request)
    server = server_of(request)
    status = await run_in_threadpool(service.environment, server.settings, name)
    history = await run_in_threadpool(service.history, server.settings, name, 50)
    releases = await run_in_threadpool(service.releases, server.settings, name)
    return render(
        request,
        "environment.html",
        env=status,
        deployments=history["deployments"],
        releases=releases["releases"],
    )


async def diff(request: Request) -> Response:
    name = _env(request)
    server = server_of(request)
    before = request.query_params.get("from", "")
    after = request.query_params.get("to", "")
    for value in (before, after):
        if len(value) != 16 or any(c not in "0123456789abcdef" for c in value):
            raise UsageError(f"{value!r} is not a release id (16 hex digits)")
    changes = await run_in_threadpool(service.diff, server.settings, before, after)
    return render(request, "diff.html", env=name, diff=changes)


async def rollback_confirm(request: Request) -> Response:
    name = _env(request)
    server = server_of(request)
    status = await run_in_threadpool(service.environment, server.settings, name)
    to = request.query_params.get("to") or None
    return render(request, "rollback.html", env=status, to=to)


async def _follow(request: Request, action: str, body: dict[str, Any]) -> Response:
    job, _ = await submit(request, action, body, wait=False)
    deadline = time.monotonic() + REDIRECT_WAIT
    while job.deployment is None and not job.done.is_set() and time.monotonic() < deadline:
        await run_in_threadpool(job.done.wait, 0.05)
    if job.deployment is not None:
        return RedirectResponse(f"/deployments/{job.deployment}", status_code=303)
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


async def rollback(request: Request) -> Response:
    _env(request)
    form = await _form(request)
    check_csrf(request, form.get("csrf"))
    body: dict[str, Any] = {}
    if form.get("to"):
        body["to"] = form["to"]
    return await _follow(request, "rollback", body)


async def gates(request: Request) -> Response:
    name = _env(request)
    server = server_of(request)
    data = await run_in_threadpool(service.gates, server.settings, name)
    promotions = await run_in_threadpool(service.promotions, server.settings, name)
    return render(request, "gates.html", gates=data, promotions=promotions["promotions"][:20])


async def approve(request: Request) -> Response:
    name = _env(request)
    form = await _form(request)
    check_csrf(request, form.get("csrf"))
    who = principal(request, "approve")
    release = form.get("release", "")
    comment = form.get("comment", "")[:1000]
    server = server_of(request)
    await run_in_threadpool(service.approve, server.settings, who.identity, name, release, comment)
    return RedirectResponse(f"/environments/{name}/gates", status_code=303)


async def deployment(request: Request) -> Response:
    deployment_id = str(request.path_params["deployment"])
    if not deployment_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UsageError(f"{deployment_id!r} is not a deployment id")
    server = server_of(request)
    data = await run_in_threadpool(service.deployment, server.settings, deployment_id)
    return render(request, "deployment.html", d=data)


async def job(request: Request) -> Response:
    server = server_of(request)
    found = server.jobs.get(str(request.path_params["job"]))
    if found is None:
        raise HttpError(404, f"no job {request.path_params['job']!r}", "NotFoundError")
    return render(request, "job.html", job=found.to_json())


async def audit(request: Request) -> Response:
    server = server_of(request)
    name = request.query_params.get("environment") or None
    if name is not None and not is_name(name):
        raise UsageError(f"{name!r} is not an environment name")
    entries = await run_in_threadpool(service.audit, server.settings, name, None, 200)
    report = await run_in_threadpool(service.verify, server.settings)
    return render(
        request,
        "audit.html",
        entries=list(reversed(entries["entries"])),
        report=report,
        environment=name,
    )


async def static(request: Request) -> Response:
    name = str(request.path_params["name"])
    if name not in STATIC:
        return Response("not found\n", status_code=404, media_type="text/plain")
    return Response(
        (PAGES / "static" / name).read_bytes(),
        media_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=300"},
    )


def page_routes() -> list[Route]:
    """The dashboard's routes."""
    get, post = ["GET"], ["POST"]
    return [
        Route("/login", login_page, methods=get),
        Route("/login", login, methods=post),
        Route("/logout", logout, methods=post),
        Route("/static/{name}", static, methods=get),
        Route("/", page("read", home), methods=get),
        Route("/audit", page("read", audit), methods=get),
        Route("/environments/{env}", page("read", environment), methods=get),
        Route("/environments/{env}/diff", page("read", diff), methods=get),
        Route("/environments/{env}/gates", page("read", gates), methods=get),
        Route("/environments/{env}/approve", page("approve", approve), methods=post),
        Route("/environments/{env}/rollback", page("read", rollback_confirm), methods=get),
        Route("/environments/{env}/rollback", page("deploy", rollback), methods=post),
        Route("/deployments/{deployment}", page("read", deployment), methods=get),
        Route("/jobs/{job}", page("read", job), methods=get),
    ]


__all__ = ["page_routes"]
