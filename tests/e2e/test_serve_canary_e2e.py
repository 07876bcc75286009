"""Canary control through the API: a canary started by ``POST .../deploy`` waits at its manual
pause; ``POST .../canary/abort`` undoes it, ``POST .../canary/continue`` lets it finish."""

from __future__ import annotations

import pytest

from .conftest import get, wait_for
from .servekit import serving, token
from .test_canary_e2e import MANUAL_STEPS, Factory, first_release, local_project

pytestmark = pytest.mark.slow

__all__ = ["local_project"]  # the fixture, shared with the CLI's canary tests


def test_canary_abort_and_continue_through_the_api(local_project: Factory) -> None:
    project = local_project(MANUAL_STEPS)
    stable = first_release(project)
    ci = token(project, "ci", "deployer")
    with serving(project, extra={"VERSION": "two"}) as server:

        def start() -> str:
            started = server.call(
                "POST",
                "/api/v1/environments/staging/deploy",
                ci,
                body={"image": "v1", "wait": False},
            )
            assert started.status == 202, started.text
            wait_for(
                lambda: "two" in {get(project.port)[1].strip() for _ in range(4)},
                what="the canary to take its share",
            )
            return str(started.json["id"])

        job = start()
        aborted = server.call("POST", "/api/v1/environments/staging/canary/abort", ci, body={})
        assert aborted.status == 200, aborted.text
        assert aborted.json["outcome"] == "aborted" and aborted.json["release"] == stable
        assert {get(project.port)[1].strip() for _ in range(10)} == {"one"}
        first = wait_for(
            lambda: (j := server.call("GET", f"/api/v1/jobs/{job}", ci).json)["state"]
            != "running"
            and j,
            what="the aborted job",
        )
        assert isinstance(first, dict) and first["state"] == "failed"
        assert first["error"]["kind"] == "CanaryAbortedError"
        assert "abort requested by token:ci" in first["error"]["message"]

        job = start()
        asked = server.call("POST", "/api/v1/environments/staging/canary/continue", ci, body={})
        assert asked.status == 200 and asked.json["requested"] == "continue"
        done = wait_for(
            lambda: (j := server.call("GET", f"/api/v1/jobs/{job}", ci).json)["state"]
            != "running"
            and j,
            what="the continued canary",
        )
        assert isinstance(done, dict) and done["state"] == "succeeded", done
        assert done["result"]["outcome"] == "succeeded"
        assert project.served() == "two"
        history = server.call("GET", "/api/v1/environments/staging/history", ci).json
        assert [d["outcome"] for d in history["deployments"][:2]] == ["succeeded", "aborted"]
        assert {d["actor"] for d in history["deployments"][:2]} == {"token:ci"}
