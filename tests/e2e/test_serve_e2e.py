"""``castiron serve`` over real HTTP: tokens and roles, every read, the mutations through the
same engine, locks, gates and audit as the CLI, server-sent progress, Prometheus metrics and
signed webhooks received on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest

from castiron.api.openapi import document
from castiron.ports import free_port
from testkit import wait_for

from .conftest import Project
from .servekit import Answer, Receiver, serving, token

pytestmark = pytest.mark.slow

PRODUCTION = """
  production:
    listen: 127.0.0.1:{port}
    promote_from: staging
    deploy_timeout: 20s
    drain_timeout: 1s
    keep_warm: 10m
    isolation: none
    policy:
      approvals: 1
"""

SECRET = "hook-secret-for-tests"
API_KEY = "api-key-value-never-shown"


def _signed(received: object) -> bool:
    headers = received.headers  # type: ignore[attr-defined]
    body = received.body  # type: ignore[attr-defined]
    mac = hmac.new(
        SECRET.encode(), headers["x-castiron-timestamp"].encode() + b"." + body, hashlib.sha256
    )
    return bool(headers["x-castiron-signature"] == "sha256=" + mac.hexdigest())


def test_the_api_end_to_end(make_project: Callable[..., Project]) -> None:
    project = make_project(replicas=1)
    spec = project.root / "castiron.yaml"
    text = spec.read_text().replace(
        "  env:\n", "  secrets: {API_KEY: {env: E2E_API_KEY}}\n  env:\n", 1
    )
    spec.write_text(text + PRODUCTION.format(port=free_port()))
    project.bake("v1")
    first = project.deploy("v1", "one", E2E_API_KEY=API_KEY)
    project.bake("v2")
    ops = token(project, "ops", "admin")
    ci = token(project, "ci", "deployer")
    alice = token(project, "alice", "approver")
    viewer = token(project, "watcher", "viewer")

    with (
        Receiver(fail_first=1) as hooks,
        serving(
            project,
            "--webhook",
            hooks.url("/all"),
            "--slack-webhook",
            "production=" + hooks.url("/slack"),
            "--webhook-secret-env",
            "HOOK_SECRET",
            "--webhook-backoff",
            "0.05",
            extra={"VERSION": "two", "HOOK_SECRET": SECRET, "E2E_API_KEY": API_KEY},
        ) as server,
    ):
        answers: list[str] = []
        plain_call = server.call

        def call(*args: Any, **kwargs: Any) -> Answer:
            answer = plain_call(*args, **kwargs)
            answers.append(answer.text)
            return answer

        server.call = call  # type: ignore[method-assign]

        # --- auth -----------------------------------------------------------------------------
        anonymous = server.call("GET", "/api/v1/environments")
        assert anonymous.status == 401
        assert anonymous.json["error"]["message"] == (
            "authentication required: send `Authorization: Bearer TOKEN` (create one with "
            "`castiron token create NAME --role ROLE`)"
        )
        assert server.call("GET", "/api/v1/environments", "cit_wrong").status == 401
        assert server.call("GET", "/metrics").status == 401
        me = server.call("GET", "/api/v1/me", ci).json
        assert me == {"identity": {"kind": "token", "id": "ci"}, "role": "deployer"}
        refused = server.call("POST", "/api/v1/environments/staging/deploy", viewer, body={})
        assert refused.status == 403
        assert refused.json["error"]["message"] == "token 'watcher' (role viewer) may not deploy"
        assert server.call("POST", "/api/v1/environments/staging/down", ci, body={}).status == 403
        assert (
            server.call("POST", "/api/v1/environments/staging/approve", ci, body={}).status == 403
        )
        headers = server.call("GET", "/api/v1/me", ci).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]

        # --- bad input: one clear message, nothing started --------------------------------------
        bad = server.call("POST", "/api/v1/environments/staging/deploy", ci, raw=b"{nope")
        assert bad.status == 400 and bad.json["error"]["message"].startswith(
            "request body is not JSON: "
        )
        huge = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, raw=b"{" + b" " * 70000 + b"}"
        )
        assert huge.status == 400
        assert huge.json["error"]["message"] == "request body larger than 65536 bytes"
        unknown = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, body={"imag": "v2"}
        )
        assert unknown.status == 400
        assert unknown.json["error"]["message"] == (
            "unknown field(s): imag (known: image, lock_wait, wait)"
        )
        wrong = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, body={"lock_wait": "soon"}
        )
        assert wrong.json["error"]["message"] == (
            "lock_wait: must be a number of seconds between 0 and 3600"
        )
        assert server.call("GET", "/api/v1/environments/Bad_Name", ci).status == 400
        missing = server.call("GET", "/api/v1/environments/nowhere", ci)
        assert missing.status == 404
        assert missing.json["error"] == {
            "message": "environment 'nowhere' was never deployed",
            "kind": "NotFoundError",
            "exit_code": 2,
        }
        assert project.json("history", "staging")["deployments"][0]["id"] == first["deployment"]

        # --- reads ------------------------------------------------------------------------------
        envs = server.call("GET", "/api/v1/environments", viewer).json["environments"]
        assert [(e["name"], e["release"], e["health"]) for e in envs] == [
            ("staging", first["release"], "ok")
        ]
        status = server.call("GET", "/api/v1/environments/staging", viewer).json
        assert status["release"] == first["release"] and status["instances"][0]["healthy"]
        instances = server.call("GET", "/api/v1/environments/staging/instances", viewer).json
        assert len(instances["instances"]) == 1
        counters = server.call("GET", "/api/v1/environments/staging/counters", viewer).json
        assert counters["counters"][0]["release"] == first["release"]

        # --- deploy through the API: same engine, audited as the token --------------------------
        deployed = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, body={"image": "v2"}
        )
        assert deployed.status == 200, deployed.text
        result = deployed.json
        assert result["outcome"] == "succeeded"
        assert project.served() == "two"
        history = project.json("history", "staging")["deployments"]
        assert history[0]["actor"] == "token:ci"
        actions = [
            (e["actor"], e["action"])
            for e in project.json("audit", "--env", "staging")["entries"]
            if e["actor"] == "token:ci"
        ]
        assert ("token:ci", "deploy.start") in actions and ("token:ci", "lock.acquire") in actions

        detail = server.call("GET", f"/api/v1/deployments/{result['deployment']}", viewer).json
        assert detail["actor"] == "token:ci" and detail["outcome"] == "succeeded"
        assert next(s["step"] for s in detail["steps"]) == "start"
        assert detail["steps"][-1]["step"] == "finish"
        stream = server.call(
            "GET", f"/api/v1/deployments/{result['deployment']}/events", viewer
        )
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [b for b in stream.text.split("\n\n") if b.startswith("id:") or "event:" in b]
        assert sum("event: step" in e for e in events) == len(detail["steps"])
        assert events[-1].startswith("event: outcome") and '"outcome": "succeeded"' in events[-1]
        resumed = server.call(
            "GET",
            f"/api/v1/deployments/{result['deployment']}/events",
            viewer,
            headers={"Last-Event-ID": str(len(detail["steps"]) - 1)},
        )
        assert resumed.text.count("event: step") == 1

        releases = server.call("GET", "/api/v1/environments/staging/releases", viewer).json
        ids = [r["id"] for r in releases["releases"]]
        assert ids == [result["release"], first["release"]]
        diff = server.call("GET", f"/api/v1/releases/{ids[1]}/diff/{ids[0]}", viewer).json
        fields = {c["field"]: (c["before"], c["after"]) for c in diff["changes"]}
        assert fields["env.VERSION"] == ("one", "two")
        assert server.call("GET", f"/api/v1/releases/{ids[0]}", viewer).json["digest"]

        # --- rollback through the API (a warm pointer flip) ---------------------------------------
        rolled = server.call("POST", "/api/v1/environments/staging/rollback", ci, body={})
        assert rolled.status == 200, rolled.text
        assert rolled.json["release"] == first["release"]
        assert project.served() == "one"
        hist = server.call("GET", "/api/v1/environments/staging/history?limit=1", viewer).json
        assert hist["deployments"][0]["strategy"] == "rollback"
        assert hist["deployments"][0]["actor"] == "token:ci"

        # --- promotion gates and approvals (once per identity) -----------------------------------
        blocked = server.call(
            "POST", "/api/v1/environments/production/promote", ci, body={"from": "staging"}
        )
        assert blocked.status == 409, blocked.text
        assert blocked.json["error"]["exit_code"] == 5
        assert "other than the deployer (token:ci), it has 0" in (
            blocked.json["error"]["message"]
        )
        gates = server.call("GET", "/api/v1/environments/production/gates", viewer).json
        candidate = gates["candidate"]["release"]
        assert [g["gate"] for g in gates["preview"]] == ["promote_from", "approvals"]
        for _ in range(2):
            approved = server.call(
                "POST",
                "/api/v1/environments/production/approve",
                alice,
                body={"release": candidate, "comment": "looks good"},
            )
            assert approved.status == 200, approved.text
        assert approved.json["added"] is False
        assert approved.json["approvers"] == ["token:alice"]
        assert approved.json["identity"] == {"kind": "token", "id": "alice"}
        promoted = server.call(
            "POST", "/api/v1/environments/production/promote", ci, body={"from": "staging"}
        )
        assert promoted.status == 200, promoted.text
        assert promoted.json["outcome"] == "succeeded"
        assert [g["gate"] for g in promoted.json["gates"]] == ["promote_from", "approvals"]
        promotions = server.call("GET", "/api/v1/promotions?environment=production", viewer).json
        assert [p["passed"] for p in promotions["promotions"]] == [True, False]

        # --- audit, drift, locks, canary controls ------------------------------------------------
        verify = server.call("GET", "/api/v1/audit/verify", viewer).json
        assert verify["ok"] is True and verify["entries"] > 10
        audit = server.call("GET", "/api/v1/audit?environment=production&limit=3", viewer).json
        assert len(audit["entries"]) == 3
        drift = server.call("GET", "/api/v1/environments/staging/drift", viewer).json
        assert drift["environment"] == "staging" and drift["findings"] == []
        assert server.call("GET", "/api/v1/locks", viewer).json == {"locks": []}
        none_running = server.call(
            "POST", "/api/v1/environments/staging/canary/continue", ci, body={}
        )
        assert none_running.status == 404
        no_abort = server.call("POST", "/api/v1/environments/staging/canary/abort", ci, body={})
        assert no_abort.status == 404, no_abort.text
        assert no_abort.headers["x-castiron-job"].startswith("j-")
        openapi = server.call("GET", "/api/v1/openapi.json")
        assert openapi.status == 200 and openapi.json == document()
        assert server.call("GET", "/api/v1/deployments?limit=2", viewer).json["deployments"]

        # --- asynchronous job ---------------------------------------------------------------------
        job = server.call(
            "POST", "/api/v1/environments/staging/deploy", ci, body={"image": "v2", "wait": False}
        )
        assert job.status == 202 and job.json["state"] == "running"
        done = wait_for(
            lambda: (
                answer := server.call("GET", f"/api/v1/jobs/{job.json['id']}", viewer).json
            )["state"]
            != "running"
            and answer,
            what="the deploy job",
        )
        assert isinstance(done, dict) and done["state"] == "succeeded", done
        assert done["deployment"] == done["result"]["deployment"]

        # --- down needs an admin ------------------------------------------------------------------
        down = server.call("POST", "/api/v1/environments/production/down", ops, body={})
        assert down.status == 200 and len(down.json["destroyed"]) == 1

        # --- metrics and webhooks -----------------------------------------------------------------
        def metrics() -> str:
            return server.call("GET", "/metrics", viewer).text

        wait_for(
            lambda: 'castiron_rollbacks_total{environment="staging"} 1' in metrics(),
            timeout=10,
            what="rollback metric",
        )
        text = metrics()
        assert 'castiron_deployments_total{environment="staging",outcome="succeeded"} 4' in text
        assert 'castiron_gate_refusals_total{environment="production",rule="approvals"} 1' in text
        assert 'castiron_deployment_duration_seconds_count{environment="staging"} 4' in text

        def kinds() -> list[tuple[str, str]]:
            return [(e["event"], e["environment"]) for e in hooks.events("/all")]

        wait_for(
            lambda: ("deployment.succeeded", "production") in kinds()
            and len(hooks.events("/slack")) >= 3,
            timeout=20,
            what="webhooks",
        )
        got = kinds()
        assert got[:4] == [
            ("deployment.started", "staging"),
            ("deployment.succeeded", "staging"),
            ("deployment.started", "staging"),
            ("deployment.rolled_back", "staging"),
        ]
        assert ("approval.needed", "production") in got
        assert hooks.attempts == len(hooks.received) + 1  # the first one was retried
        assert all(_signed(r) for r in hooks.received)
        slack = hooks.events("/slack")
        assert all(set(m) == {"text"} for m in slack)
        assert slack[0]["text"].startswith("castiron: release ")
        assert "needs approval" in slack[0]["text"]
        started = hooks.events("/all")[0]
        assert started["actor"] == "token:ci" and started["deployment"] == result["deployment"]
        assert json.dumps(started).count(SECRET) == 0

        # No response ever carried a secret value (release configs name secrets only).
        release_config = server.call("GET", f"/api/v1/releases/{first['release']}", viewer).json
        assert release_config["config"]["secrets"] == {"API_KEY": "env:E2E_API_KEY"}
        assert len(answers) > 40
        assert not [a for a in answers if API_KEY in a or SECRET in a]
        assert not [r for r in hooks.received if API_KEY.encode() in r.body]


def test_a_taken_address_is_one_error_line(make_project: Callable[..., Project]) -> None:
    import socket

    project = make_project(replicas=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = project.run("serve", "--listen", f"127.0.0.1:{port}", timeout=60)
    assert done.returncode == 1
    assert done.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
