"""Promotion on the real local runtime, through the real CLI: staging → production with a
signature, a soak and a smoke check against staging over real HTTP; production then serves the
exact digest staging runs, with production's own config. (Approvals need approvers who are other
OS users than the deployer: tests/engine/test_promote.py and test_promote_cli.py cover them.)"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from .conftest import Project, free_port, get

pytestmark = pytest.mark.slow

SMOKE = (
    "import sys, urllib.request as u; "
    "body = u.urlopen(sys.argv[1] + '/', timeout=5).read().decode().strip(); "
    "print('staging answered', body); sys.exit(0 if body == 'one' else 1)"
)

PRODUCTION = """
  production:
    listen: 127.0.0.1:{port}
    promote_from: staging
    env:
      VERSION: prod-${{VERSION:-v1}}
    deploy_timeout: 20s
    drain_timeout: 2s
    keep_warm: 10m
    isolation: none
    policy:
      soak: 2s
      require_signature: [keys/prod.pub]
      checks:
        - ["python3", "-c", "{smoke}", "${{URL}}"]
"""


def test_staging_to_production_through_every_gate(make_project: Callable[..., Project]) -> None:
    project = make_project(replicas=1)
    prod_port = free_port()
    spec = project.root / "castiron.yaml"
    spec.write_text(spec.read_text() + PRODUCTION.format(port=prod_port, smoke=SMOKE))
    (project.root / "keys").mkdir()
    project.ok("keys", "generate", "--out", "keys/prod")
    project.bake("v1")
    staged = project.deploy("v1", "one")
    assert staged["outcome"] == "succeeded" and project.served() == "one"

    unsigned = project.run("promote", "staging", "production", "--yes")
    assert unsigned.returncode == 5, unsigned.stderr
    assert "refused by policy (require_signature)" in unsigned.stderr
    assert "has no signature by keys/prod.pub" in unsigned.stderr
    project.ok("sign", "v1", "--key", "keys/prod.key")

    deadline = time.monotonic() + 30
    while True:  # the soak (2 s) runs from the end of the staging deployment
        early = project.run("promote", "staging", "production", "--yes", "--json")
        if early.returncode == 0:
            break
        assert early.returncode == 5, early.stderr
        assert "refused by policy (soak)" in early.stderr
        assert time.monotonic() < deadline, early.stderr
        time.sleep(0.5)
    promoted = json.loads(early.stdout)
    release = promoted["release"]
    assert promoted["outcome"] == "succeeded", promoted
    assert promoted["digest"] == staged["digest"]
    assert promoted["release"] == release != staged["release"]
    gates = promoted["gates"]
    assert isinstance(gates, list)
    assert [g["gate"] for g in gates] == [
        "require_signature", "promote_from", "soak", "checks",
    ]  # fmt: skip
    assert all(g["passed"] for g in gates)
    assert get(prod_port)[1].strip() == "prod-v1"  # production's own config
    assert project.served() == "one"  # staging untouched

    status = project.json("status", "production")["environments"]
    assert isinstance(status, list)
    assert status[0]["release"] == release
    entries = project.json("audit", "--env", "production")["entries"]
    assert isinstance(entries, list)
    actions = [(e["action"], e["result"]) for e in entries]
    assert ("policy.refuse", "refused") in actions
    assert ("policy.pass", "ok") in actions
    history = project.json("history", "production")["deployments"]
    assert isinstance(history, list) and history[0]["outcome"] == "succeeded"
    assert project.ok("verify", "v1", "--key", "keys/prod.pub")
