"""Warm instances never pile up on a real host: twenty alternating deployments within
``keep_warm`` leave the serving instance plus one warm previous release, counted as live
processes, not records."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Project

pytestmark = pytest.mark.slow


def processes_under(home: Path) -> list[int]:
    """Live processes whose working directory is inside ``home`` (instances run in their
    release tree with isolation none)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and cwd.startswith(str(home) + "/"):
            found.append(int(entry))
    return found


def test_twenty_alternating_deploys_leave_one_warm_release(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    for i in range(20):
        project.deploy("v1", "one" if i % 2 == 0 else "two")
    assert project.served() == "two"

    assert len(processes_under(project.home)) == 2  # replicas 1 serving + 1 warm
    instances = project.status()["instances"]
    assert isinstance(instances, list) and len(instances) == 1
    audit = project.json("audit")["entries"]
    assert isinstance(audit, list)
    assert any(
        e["action"] == "instance.reap" and "keep_warm_releases" in e["details"]["why"]
        for e in audit
    )
    rolled = project.ok("rollback", "staging")  # the warm release is a pointer flip away
    assert rolled.startswith("rolled staging back") and project.served() == "one"
    assert len(processes_under(project.home)) == 2
