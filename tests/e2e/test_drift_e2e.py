"""Drift end to end, through the real CLI: each kind of drift made by hand is found with the
right kind by ``castiron drift`` (exit 3), and ``castiron drift --fix`` removes it by
replacement while a bounded load through the router sees zero failed requests.

Local runtime (real processes): a file changed in the release's shared read-only tree (root
writes through the read-only bits), a file added there, an instance stopped by hand through
the agent. Docker: a stray container with castiron's labels, a container re-created by hand
with another environment, a container stopped by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.driftkit import CHECK_OUTPUT_SCHEMA, violations

from castiron.agent.client import AgentClient

from .conftest import Load, Project, wait_for
from .test_docker_e2e import APP as DOCKER_APP

# The Docker e2e fixtures: the SDK client (cleaning up after the module) and a project
# deploying to Docker (``staging``), registered here as ``docker_project``.
from .test_docker_e2e import docker  # noqa: F401
from .test_docker_e2e import make_project as docker_project  # noqa: F401

pytestmark = pytest.mark.slow


def drift(project: Project, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``castiron drift staging ARGS --json``; (exit code, its JSON object)."""
    proc = project.run("drift", "staging", *args, "--json")
    assert proc.returncode in (0, 3), f"{proc.returncode}: {proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def assert_clean(project: Project) -> None:
    code, data = drift(project)
    assert (code, data["findings"]) == (0, []), json.dumps(data["findings"], indent=1)


def kinds(data: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, path) of every finding."""
    return {(f["kind"], f["path"]) for f in data["findings"]}


def serving_ids(project: Project) -> list[str]:
    instances = project.status()["instances"]
    assert isinstance(instances, list)
    return sorted(i["id"] for i in instances)


def fix_under_load(project: Project) -> dict[str, Any]:
    """``castiron drift staging --fix --json`` while a bounded load runs through the router;
    asserts zero failed requests and returns what was fixed."""
    with Load(project.port, max_seconds=90) as load:
        wait_for(lambda: load.ok > 5, what="load to start")
        proc = project.run("drift", "staging", "--fix", "--json")
        seen = load.ok
        wait_for(lambda: load.ok > seen + 5, what="load after the fix")
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert load.failed == 0, load.errors[:5]
    data = json.loads(proc.stdout)
    (env,) = data["environments"]
    return dict(env["fixed"])


def release_tree(project: Project) -> Path:
    (tree,) = (project.home / "releases" / "sha256").glob("*/rootfs")
    return tree


# --- local runtime -------------------------------------------------------------------------------


def test_a_tree_edited_before_a_deploy_is_unpacked_again_not_reused(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    tree = release_tree(project)
    (app_py,) = tree.glob("**/app.py")
    app_py.chmod(0o644)
    with app_py.open("a") as fh:
        fh.write("# changed by hand\n")
    app_py.chmod(0o444)
    in_image = "/" + str(app_py.relative_to(tree))
    code, found = drift(project)
    assert code == 3 and (in_image, "filesystem") in {
        (f["path"], f["kind"]) for f in found["findings"]
    }

    # A new release of the same image (another VERSION) reuses the tree: it is checked first.
    proc = project.run("deploy", "staging", "--yes", "--json", extra={"VERSION": "two"})

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"differs from the image ({in_image} (content)): unpacking it again" in proc.stderr
    assert project.served() == "two"
    fresh = release_tree(project)
    assert "changed by hand" not in next(fresh.glob("**/app.py")).read_text()
    assert_clean(project)
    verified = project.run("deploy", "staging", "--yes", "--verify", extra={"VERSION": "three"})
    assert verified.returncode == 0 and "differs" not in verified.stderr


def test_local_tree_changes_are_found_and_replaced_with_zero_failed_requests(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=2)
    project.bake("v1")
    project.deploy("v1", "one")
    code, clean = drift(project)
    assert code == 0 and clean["findings"] == []
    before = serving_ids(project)
    assert (release_tree(project).parent / "rootfs.baseline").is_file()  # taken at unpack

    tree = release_tree(project)
    (app_py,) = tree.glob("**/app.py")
    app_py.chmod(0o644)  # root writes through the read-only bits
    with app_py.open("a") as fh:
        fh.write("# changed by hand\n")
    app_py.chmod(0o444)
    added = app_py.parent / "backdoor.sh"
    added.write_text("#!/bin/sh\n")
    in_image = "/" + str(app_py.relative_to(tree))

    code, found = drift(project)
    assert code == 3
    by_path = {(f["instance"], f["path"]): f for f in found["findings"]}
    for iid in before:  # the tree is shared: every instance of the release is reported
        content = by_path[(iid, in_image)]
        assert content["kind"] == "filesystem"
        assert content["expected"].startswith("sha256:") and content["actual"].startswith("sha256:")
        assert content["expected"] != content["actual"]
        extra = by_path[(iid, in_image.replace("app.py", "backdoor.sh"))]
        assert (extra["kind"], extra["expected"], extra["actual"]) == ("filesystem", None, "file")
    assert {f["kind"] for f in found["findings"]} == {"filesystem"}
    text = project.run("drift", "staging")
    assert text.returncode == 3 and f"filesystem  {before[0]}  {in_image}" in text.stdout

    fixed = fix_under_load(project)
    assert sorted(fixed["replaced"]) == before and len(fixed["created"]) == 2
    assert fixed["trees_renewed"]
    after = serving_ids(project)
    assert not set(after) & set(before)
    fresh = release_tree(project)
    assert "changed by hand" not in next(fresh.glob("**/app.py")).read_text()
    assert not list(fresh.glob("**/backdoor.sh"))
    assert not list(tree.parent.glob("rootfs.drifted-*"))  # the drifted tree is gone
    code, again = drift(project)
    assert code == 0 and again["findings"] == []
    assert again["environments"] == [
        {"environment": "staging", "release": found["environments"][0]["release"], "findings": []}
    ]
    entries = project.json("audit")["entries"]
    fix_entries = [e for e in entries if e["action"] == "drift.fix"]
    assert len(fix_entries) == 1
    assert sorted(fix_entries[0]["details"]["replaced"]) == before
    history = project.json("history", "staging")["deployments"]
    assert history[0]["strategy"] == "drift-fix" and history[0]["outcome"] == "succeeded"
    assert project.run("audit", "verify").returncode == 0


def test_local_instance_stopped_by_hand_is_replaced_with_zero_failed_requests(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=2)
    project.bake("v1")
    project.deploy("v1", "one")
    before = serving_ids(project)
    AgentClient(project.home / "agent" / "agent.sock").stop_instance(before[0], grace=2.0)

    code, found = drift(project)
    assert code == 3
    assert ("membership", "state") in kinds(found)
    (stopped,) = [f for f in found["findings"] if f["path"] == "state"]
    assert stopped["instance"] == before[0] and stopped["expected"] == "running"
    assert stopped["actual"] in ("missing", "exited")

    fixed = fix_under_load(project)
    assert fixed["replaced"] == [before[0]] and len(fixed["created"]) == 1
    after = serving_ids(project)
    assert before[1] in after and before[0] not in after and len(after) == 2
    assert_clean(project)
    assert project.served() == "one"


def test_the_agent_watches_and_fixes_drift_on_schedule(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    spec = project.root / "castiron.yaml"
    spec.write_text(spec.read_text() + '    drift: {watch: 1s, fix: true, ignore: ["*.log"]}\n')
    project.bake("v1")
    project.deploy("v1", "one")  # registers the watch with the agent
    agent = AgentClient(project.home / "agent" / "agent.sock")
    (watch,) = agent.watches()
    assert (watch.environment, watch.interval, watch.fix) == ("staging", 1.0, True)
    assert watch.argv[-3:] == ("staging", "--json", "--fix")
    before = serving_ids(project)
    tree = release_tree(project)
    (app_py,) = tree.glob("**/app.py")
    (app_py.parent / "ignored.log").write_text("not drift\n")  # matches drift.ignore
    (app_py.parent / "dropped.txt").write_text("drift\n")

    def event(kind: str) -> bool:
        return any(e.kind == kind and e.environment == "staging" for e in agent.events())

    wait_for(lambda: event("drift-fixed"), timeout=60, what="the agent's check to fix drift")
    found = [e for e in agent.events() if e.kind == "drift-found"]
    assert found and "filesystem" in found[0].detail
    assert not event("drift-check-failed")
    wait_for(lambda: serving_ids(project) != before, what="the replacement in the records")
    assert project.served() == "one"
    entries = project.json("audit")["entries"]
    assert any(e["action"] == "drift.fix" for e in entries)


def test_a_watch_without_fix_reports_and_audits_drift_but_changes_nothing(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    spec = project.root / "castiron.yaml"
    spec.write_text(spec.read_text() + "    drift: {watch: 1s}\n")
    project.bake("v1")
    project.deploy("v1", "one")
    agent = AgentClient(project.home / "agent" / "agent.sock")
    (watch,) = agent.watches()
    assert watch.fix is False and watch.argv[-2:] == ("staging", "--json")
    before = serving_ids(project)
    (app_py,) = release_tree(project).glob("**/app.py")
    (app_py.parent / "dropped.txt").write_text("drift\n")

    def detected() -> list[dict[str, Any]]:
        entries = project.json("audit")["entries"]
        return [e for e in entries if e["action"] == "drift.detected"]

    wait_for(lambda: bool(detected()), timeout=60, what="the agent's check to audit drift")
    (entry, *_) = detected()
    assert entry["environment"] == "staging" and entry["result"] == "drift"
    assert entry["details"]["source"] == "agent watch"
    assert entry["details"]["kinds"] == {"filesystem": 1}
    assert entry["details"]["first"][0]["path"].endswith("/dropped.txt")
    assert any(e.kind == "drift-found" for e in agent.events())
    assert serving_ids(project) == before  # found, not fixed
    assert project.served() == "one"
    # The deployment registered the watch through the engine, audited with its interval.
    (registered,) = [
        e for e in project.json("audit")["entries"] if e["action"] == "drift.watch.registered"
    ]
    assert registered["details"] == {"interval": 1.0, "fix": False}
    # Exactly what the agent runs prints what the agent reads: the pinned schema.
    ran = subprocess.run(
        watch.argv,
        cwd=watch.cwd,
        env={**os.environ, **dict(watch.env), "CASTIRON_DRIFT_WATCH": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 3, ran.stderr  # drift found
    printed = json.loads(ran.stdout.strip().splitlines()[-1])
    assert violations(printed, CHECK_OUTPUT_SCHEMA) == []
    assert [f["kind"] for f in printed["findings"]] == ["filesystem"]


# --- Docker --------------------------------------------------------------------------------------


def _container(docker: Any, instance: str) -> Any:  # noqa: F811
    return docker.containers.get(f"{DOCKER_APP}.staging.{instance}")


@pytest.mark.docker
def test_docker_stray_with_castiron_labels_is_destroyed(
    docker_project: Callable[..., Project],  # noqa: F811
    docker: Any,  # noqa: F811
) -> None:
    project = docker_project()
    project.bake("v1")
    project.deploy("v1", "one")
    assert_clean(project)
    serving = _container(docker, serving_ids(project)[0])
    labels = {k: v for k, v in serving.labels.items() if k.startswith("castiron.")}
    labels["castiron.instance"] = "intruder"
    intruder = docker.containers.run(
        serving.image.id,
        entrypoint=["/bin/busybox", "sleep", "300"],
        network_mode="host",
        detach=True,
        labels=labels,
        name=f"{DOCKER_APP}-intruder",
    )
    code, found = drift(project)
    assert code == 3
    (stray,) = found["findings"]
    assert (stray["kind"], stray["path"], stray["instance"]) == ("membership", "stray", "intruder")
    assert stray["expected"] is None and "running" in stray["actual"]

    fixed = fix_under_load(project)
    assert fixed["strays_destroyed"] == [f"{DOCKER_APP}-intruder"] and fixed["replaced"] == []
    with pytest.raises(Exception, match=r"No such container|404"):
        intruder.reload()
    assert_clean(project)
    audit = project.json("audit")["entries"]
    assert any(e["action"] == "drift.stray.destroy" for e in audit)


@pytest.mark.docker
def test_docker_container_recreated_with_other_env_is_replaced(
    docker_project: Callable[..., Project],  # noqa: F811
    docker: Any,  # noqa: F811
) -> None:
    project = docker_project()
    project.bake("v1")
    project.deploy("v1", "one")
    before = serving_ids(project)
    old = _container(docker, before[0])
    attrs = old.attrs
    env = [e for e in attrs["Config"]["Env"] if not e.startswith("VERSION=")] + ["VERSION=hacked"]
    old.remove(force=True)
    docker.containers.run(
        attrs["Image"],
        entrypoint=attrs["Config"]["Entrypoint"],
        environment=env,
        labels=attrs["Config"]["Labels"],
        network_mode="host",
        read_only=True,
        tmpfs={"/tmp": "rw"},
        working_dir=attrs["Config"]["WorkingDir"],
        detach=True,
        name=attrs["Name"].lstrip("/"),
    )
    wait_for(lambda: "hacked" in {project.served() for _ in range(6)}, what="the hand-made one")
    code, found = drift(project)
    assert code == 3
    by_path = {f["path"]: f for f in found["findings"] if f["instance"] == before[0]}
    assert by_path["env.VERSION"]["kind"] == "config"
    assert (by_path["env.VERSION"]["expected"], by_path["env.VERSION"]["actual"]) == (
        "one",
        "hacked",
    )
    assert by_path["container"]["actual"].endswith("(re-created)")

    fixed = fix_under_load(project)
    assert fixed["replaced"] == [before[0]]
    assert {project.served() for _ in range(8)} == {"one"}
    assert_clean(project)


@pytest.mark.docker
def test_docker_container_stopped_by_hand_is_replaced(
    docker_project: Callable[..., Project],  # noqa: F811
    docker: Any,  # noqa: F811
) -> None:
    project = docker_project()
    project.bake("v1")
    project.deploy("v1", "one")
    before = serving_ids(project)
    _container(docker, before[1]).stop(timeout=2)
    code, found = drift(project)
    assert code == 3
    (stopped,) = found["findings"]
    assert (stopped["kind"], stopped["instance"], stopped["path"]) == (
        "membership",
        before[1],
        "state",
    )
    assert stopped["actual"].startswith("exited")
    fixed = fix_under_load(project)
    assert fixed["replaced"] == [before[1]]
    assert_clean(project)
    with pytest.raises(Exception, match=r"No such container|404"):
        _container(docker, before[1])


def test_drift_of_an_environment_never_deployed_is_a_usage_error(
    make_project: Callable[..., Project],
) -> None:
    project = make_project()
    proc = project.run("drift", "staging")
    assert proc.returncode == 2 and "never deployed" in proc.stderr
    assert "Traceback" not in proc.stderr
