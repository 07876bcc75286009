"""One CLI grammar, on a real project: every mutating command accepts ``--yes``; the ones that
ask refuse without a terminal and without it (exit 2, saying so); deploy without ``--image``
takes the image baked from the current tree (or refuses); status names each warm release and
exactly the release rollback goes to; a failing health gate talks; ``down`` says whether the
agent still runs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from .conftest import Project
from .firsthour import processes_under

pytestmark = pytest.mark.slow

NEEDS = "needs confirmation: pass --yes (no terminal to ask on)"


def test_every_mutating_command_accepts_yes_and_the_asking_ones_refuse_without_it(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    context = project.root / "app"
    # approvals are signed: the approver's key lives beside the spec, outside the context
    (project.root / "keys").mkdir()
    project.ok("keys", "generate", "--out", str(project.root / "keys" / "alice"))
    spec = project.root / "castiron.yaml"
    spec.write_text(
        spec.read_text().replace(
            "    isolation: none\n",
            "    isolation: none\n    policy: {approvers: [keys/alice.pub]}\n",
            1,
        )
    )
    unbaked = project.run("deploy", "staging", "--yes")
    assert (unbaked.returncode, unbaked.stderr) == (
        2,
        f"error: the current spec and context of app 'e2e' ({context}) are not baked yet; "
        "run castiron bake\n",
    )
    project.bake("v1")
    plan = project.ok("plan", "staging")
    assert "  image chosen: baked from the current spec and context (castiron bake)\n" in plan
    assert "(tag v1)" in plan
    release = project.json("plan", "staging", extra={"VERSION": "one"})["to"]
    asked = project.run("deploy", "staging", extra={"VERSION": "one"})
    assert (asked.returncode, asked.stderr.splitlines()[-1]) == (
        2,
        f"error: deploy release {release} to staging? {NEEDS}",
    )
    first = project.deploy("v1", "one")
    assert first["release"] == release
    # the tree changed since the bake: deploy refuses rather than take the newest image
    (context / "extra.txt").write_text("not baked\n")
    assert project.run("plan", "staging").returncode == 2
    (context / "extra.txt").unlink()
    project.bake("v2")
    planned = project.json("plan", "staging", extra={"VERSION": "two"})
    assert planned["image_chosen"] == "baked from the current spec and context (castiron bake)"
    assert planned["tag"] == "v2"
    second = project.json("deploy", "staging", "--yes", extra={"VERSION": "two"})
    given = project.ok("plan", "staging", "--image", "v1", extra={"VERSION": "one"})
    assert "  image chosen: given by --image v1\n" in given
    # --yes is accepted by every mutating command, asking or not
    assert project.ok("rollback", "staging", "--yes").startswith(
        f"rolled staging back to release {first['release']} in "
    )
    key = str(project.root / "keys" / "alice.key")
    approved = project.ok("approve", "staging", str(second["release"]), "--key", key, "--yes")
    assert re.match(rf"\S+ approved release {second['release']} for staging with key ", approved)
    drift = project.run("drift", "staging", "--fix", "--yes")
    assert drift.returncode == 0, drift.stderr
    for args in (("abort", "staging", "--yes"), ("deploy", "staging", "--continue", "--yes")):
        proc = project.run(*args)
        assert proc.returncode == 2 and "No such option" not in proc.stderr, proc.stderr
    prune = project.run("images", "prune", "--yes")
    assert prune.returncode == 0 and prune.stdout.startswith("removed "), prune.stdout
    project.ok("lock", "acquire", "staging", "-m", "maintenance")
    refused = project.run("lock", "break", "staging")
    assert (refused.returncode, refused.stderr) == (
        2,
        f"error: break the lock on staging whoever holds it? {NEEDS}\n",
    )
    assert project.ok("lock", "break", "staging", "--yes") == (
        "broke the lock of e2e@test on environment 'staging'\n"
    )
    refused = project.run("down", "staging")
    assert (refused.returncode, refused.stderr) == (
        2,
        f"error: take staging down (route removed, every instance destroyed)? {NEEDS}\n",
    )
    down = project.ok("down", "staging", "--yes")
    pid = re.search(r"the agent \(pid (\d+)\)", down)
    assert pid, down
    assert down.splitlines()[1] == (
        f"the agent (pid {pid[1]}) still runs for {project.home}; stop it with `castiron agent "
        "stop` (instances of other environments keep running)"
    )
    assert project.ok("agent", "stop") == f"agent stopped (pid {pid[1]})\n"
    assert processes_under(project.root) == []


def test_status_lists_each_warm_release_and_the_exact_rollback_target(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    spec = project.root / "castiron.yaml"  # two previous releases stay warm
    spec.write_text(
        spec.read_text().replace(
            "    keep_warm: 10m\n", "    keep_warm: 10m\n    keep_warm_releases: 2\n"
        )
    )
    releases = []
    for n in ("1", "2", "3"):
        project.bake(f"v{n}")
        releases.append(project.deploy(f"v{n}", n))
    status = project.status()
    warm = status["warm"]
    assert isinstance(warm, list)
    assert [(w["release"], w["digest"], len(w["instances"])) for w in warm] == [
        (releases[1]["release"], releases[1]["digest"], 1),
        (releases[0]["release"], releases[0]["digest"], 1),
    ]
    assert status["rollback_target"] == {
        "release": releases[1]["release"],
        "digest": releases[1]["digest"],
        "warm": True,
        "warm_instances": 1,
    }
    text = project.ok("status", "staging")
    short = str(releases[1]["digest"]).removeprefix("sha256:")[:19]
    assert (
        f"  rollback `castiron rollback staging` goes to release {releases[1]['release']}  "
        f"image {short} (a pointer flip to its warm instances)\n"
    ) in text
    for entry in warm:
        assert f"  warm     release {entry['release']}  image " in text
    back = project.json("rollback", "staging")
    assert back["release"] == releases[1]["release"]
    after = project.status()
    assert after["rollback_target"]["release"] == releases[2]["release"]  # type: ignore[index]
    assert project.run("down", "staging", "--yes").returncode == 0


def test_a_failing_health_gate_reports_probes_and_the_logs_command(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1, deploy_timeout="4s")
    project.bake("v1")
    project.deploy("v1", "one")
    proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two", "HEALTHY": "0"})
    assert proc.returncode == 1, proc.stderr
    waiting = re.findall(r"\] (\S+) not healthy yet after 3s of 4s: (.*)$", proc.stderr, re.M)
    assert waiting and waiting[0][1] == "GET /healthz: 503 Service Unavailable", proc.stderr
    instance = waiting[0][0]
    command = f"castiron logs staging --instance {instance}"
    assert proc.stderr.rstrip().endswith(f"all of its output: {command}"), proc.stderr
    assert "healthz: refusing, HEALTHY=0" in proc.stderr  # the last output, in the error
    logs = project.run("logs", "staging", "--instance", instance)
    assert logs.returncode == 0, logs.stderr
    assert "healthz: refusing, HEALTHY=0" in logs.stdout
    log_file = project.home / "agent" / "logs" / f"{instance}.log"
    assert logs.stderr == f"instance {instance} was destroyed; the output it left in {log_file}:\n"
    shown = json.loads(project.ok("logs", "staging", "--instance", instance, "--json"))
    assert shown["instances"][0]["state"] == "destroyed"
    assert project.run("down", "staging", "--yes").returncode == 0


def test_down_json_names_the_agent_that_still_runs(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    deployed = project.deploy("v1", "one")
    agent = project.json("agent", "status")
    down = project.json("down", "staging", "--yes")
    assert down["environment"] == "staging" and down["agent_pid"] == agent["pid"]
    assert isinstance(down["destroyed"], list) and len(down["destroyed"]) == 1
    assert str(down["destroyed"][0]).startswith(f"e2e-staging-{str(deployed['release'])[:6]}")
    project.ok("agent", "stop")
    assert processes_under(project.root) == []
