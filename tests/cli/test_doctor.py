"""``castiron doctor`` says in plain words what this host enforces for local instances."""

from __future__ import annotations

import json
from typing import Any

from castiron.agent import cgroups


def test_doctor_reports_limits_and_sandbox(run_cli: Any) -> None:
    result = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert set(checks) == {"limits", "sandbox"}
    host = cgroups.probe(cgroups.find_host())
    if host.problem is None:
        assert checks["limits"] == {
            "name": "limits",
            "ok": True,
            "detail": f"memory and cpus are enforced: {host.describe()}",
        }
    else:
        assert checks["limits"]["detail"] == (
            f"memory and cpus of local instances are NOT enforced: {host.problem}"
        )
    assert result.exit_code == (0 if all(c["ok"] for c in checks.values()) else 1)
    text = run_cli("doctor")
    assert text.stdout.splitlines()[0].startswith("limits    ")
    assert text.exit_code == result.exit_code and "Traceback" not in text.stderr
