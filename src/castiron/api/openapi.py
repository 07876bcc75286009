"""The OpenAPI 3.1 document of ``/api/v1`` (served at ``/api/v1/openapi.json``).

Written by hand next to the routes; a test checks that it names exactly the routes the app
serves, with the same methods. It knows nothing of HTTP frameworks.
"""

from __future__ import annotations

from typing import Any

from castiron import __version__

_OBJ: dict[str, Any] = {"type": "object"}
_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _OBJ}}}


def _param(name: str, where: str = "path", description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer" if name == "limit" else "string"}
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description or name,
        "schema": schema,
    }


_ENV = _param("env", description="environment name")


def _get(summary: str, *params: dict[str, Any], permission: str = "read") -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "description": f"Needs a token with the `{permission}` permission.",
            "parameters": list(params),
            "responses": {"200": _ok(summary), "401": _ERROR, "404": _ERROR},
        }
    }


def _post(
    summary: str, fields: dict[str, Any], permission: str, job: bool = True
) -> dict[str, Any]:
    properties = dict(fields)
    if job:
        properties["wait"] = {
            "type": "boolean",
            "default": True,
            "description": "Answer when done (200 or an error); false: answer 202 with the job",
        }
    responses: dict[str, Any] = {
        "200": _ok("done"),
        "400": _ERROR,
        "401": _ERROR,
        "403": _ERROR,
        "404": _ERROR,
        "409": _ERROR,
        "422": _ERROR,
        "423": _ERROR,
    }
    if job:
        responses["202"] = _ok("started: the job (follow /jobs/{job} or the deployment's events)")
    return {
        "post": {
            "summary": summary,
            "description": f"Needs a token with the `{permission}` permission. Audited as the "
            "token's identity (`token:NAME`).",
            "parameters": [_ENV],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": properties,
                        }
                    }
                },
            },
            "responses": responses,
        }
    }


_STR = {"type": "string"}
_WAIT = {"type": "number", "minimum": 0, "maximum": 3600, "description": "lock wait (seconds)"}


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    paths: dict[str, Any] = {
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok("the OpenAPI document")},
            }
        },
        "/me": _get("The caller's identity and role"),
        "/environments": _get("Every environment at a glance"),
        "/environments/{env}": _get("An environment's status (probes, counters)", _ENV),
        "/environments/{env}/instances": _get("Instances and their health", _ENV),
        "/environments/{env}/counters": _get("Router counters per release", _ENV),
        "/environments/{env}/releases": _get("Releases of an environment", _ENV),
        "/environments/{env}/history": _get(
            "Deployments of an environment", _ENV, _param("limit", "query")
        ),
        "/environments/{env}/drift": _get("A quick drift scan (records nothing)", _ENV),
        "/environments/{env}/gates": _get("Promotion gates, candidate and approvals", _ENV),
        "/environments/{env}/deploy": _post(
            "Deploy (the newest baked image, or `image`)",
            {"image": _STR, "lock_wait": _WAIT},
            "deploy",
        ),
        "/environments/{env}/rollback": _post(
            "Roll back to the last known-good release (or `to`)",
            {"to": _STR, "lock_wait": _WAIT},
            "deploy",
        ),
        "/environments/{env}/promote": _post(
            "Promote `from`'s release to this environment, through its gates",
            {"from": _STR, "release": _STR, "lock_wait": _WAIT},
            "deploy",
        ),
        "/environments/{env}/approve": _post(
            "Approve a release for this environment (once per identity)",
            {"release": _STR, "comment": _STR},
            "approve",
            job=False,
        ),
        "/environments/{env}/canary/continue": _post(
            "Let the running canary go past its pause", {}, "deploy", job=False
        ),
        "/environments/{env}/canary/abort": _post("Abort the running canary", {}, "deploy"),
        "/environments/{env}/down": _post(
            "Remove the route and destroy every instance", {"lock_wait": _WAIT}, "admin"
        ),
        "/releases/{release}": _get("A release", _param("release")),
        "/releases/{release}/diff/{other}": _get(
            "Changes from one release to another", _param("release"), _param("other")
        ),
        "/deployments": _get(
            "Deployments, newest first",
            _param("environment", "query"),
            _param("limit", "query"),
        ),
        "/deployments/{deployment}": _get(
            "A deployment with its steps and events", _param("deployment")
        ),
        "/deployments/{deployment}/events": {
            "get": {
                "summary": "A deployment's progress as server-sent events",
                "description": "Events `step` (id = step number; resume with Last-Event-ID) "
                "and a final `outcome`. Needs `read`.",
                "parameters": [_param("deployment"), _param("after", "query")],
                "responses": {
                    "200": {
                        "description": "event stream",
                        "content": {"text/event-stream": {"schema": _STR}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                },
            }
        },
        "/audit": _get(
            "Audit entries",
            _param("environment", "query"),
            _param("since", "query"),
            _param("limit", "query"),
        ),
        "/audit/verify": _get("Verify the audit chain and its signed head"),
        "/promotions": _get("Policy evaluations, newest first", _param("environment", "query")),
        "/locks": _get("Environment locks"),
        "/jobs/{job}": _get("A mutation job", _param("job")),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "castiron API",
            "version": __version__,
            "description": "The HTTP API of `castiron serve`: the same operations as the CLI.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "message": _STR,
                                "kind": _STR,
                                "exit_code": {"type": ["integer", "null"]},
                            },
                        }
                    },
                }
            },
        },
        "paths": paths,
    }


__all__ = ["document"]
