"""``castiron doctor`` says in plain words whether this host enforces instance limits."""

from __future__ import annotations

import json
from typing import Any

from castiron.agent import cgroups


def test_doctor_reports_whether_limits_are_enforced(run_cli: Any) -> None:
    result = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    host = cgroups.probe(cgroups.find_host())
    limits = checks["limits"]
    assert limits["required"] is False
    if host.problem is None:
        assert (limits["status"], limits["detail"]) == (
            "ok",
            "memory and cpus of local instances are enforced",
        )
    else:
        assert (limits["status"], limits["detail"]) == (
            "warning",
            f"memory and cpus of local instances are NOT enforced: {host.problem}",
        )
    text = run_cli("doctor")
    assert any(line.split()[1:2] == ["limits"] for line in text.stdout.splitlines())
    assert text.exit_code == result.exit_code and "Traceback" not in text.stderr
