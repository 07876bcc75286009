"""The agent masks the secret values of its spawn requests: in instance output (through the
log pump), in its events file and in its own log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from castiron.agent.client import AgentClient, AgentEvent, SpawnRequest
from castiron.agent.daemon import mask_log
from castiron.agent.events import EventLog
from castiron.redact import Redactor
from castiron.settings import Settings

SECRET = "hunter2-db-Pa55"


def test_events_are_masked_before_they_are_kept_or_written(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl", redactor=Redactor([SECRET]))
    kept = events.append(AgentEvent(seq=0, at=1.0, kind="instance-exited", detail=SECRET + "!"))
    assert kept.detail == "***!"
    assert SECRET not in (tmp_path / "events.jsonl").read_text()


def test_the_agents_log_is_masked(tmp_path: Path) -> None:
    redactor = Redactor()
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "agent.log")
    root.addHandler(handler)
    try:
        mask_log(redactor)
        redactor.add([SECRET])  # learnt from a spawn request after the log was set up
        logging.getLogger("castiron.agent").warning("instance said %s", SECRET)
    finally:
        root.removeHandler(handler)
        handler.close()
    assert (tmp_path / "agent.log").read_text() == "instance said ***\n"


def test_an_instance_with_secrets_writes_through_the_pump(
    agent: AgentClient, settings: Settings, python: str, helpers: Any
) -> None:
    script = (
        "import os, sys; v = os.environ['DB_PASSWORD']; "
        "sys.stdout.write('pw=' + v[:4]); sys.stdout.flush(); print(v[4:]); "
        "print('err', v, file=sys.stderr)"
    )
    agent.spawn(
        SpawnRequest(
            id="web-1",
            environment="staging",
            release="r1",
            argv=(python, "-c", script),
            env={"DB_PASSWORD": SECRET, "PATH": "/usr/bin:/bin"},
            public_env=("PATH",),
            secret_env=("DB_PASSWORD",),
        )
    )
    log = settings.agent_path / "logs" / "web-1.log"
    helpers.wait_for(lambda: log.exists() and log.read_text().count("\n") == 2, what="output")
    assert sorted(log.read_text().splitlines()) == ["err ***", "pw=***"]
