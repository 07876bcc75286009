"""The fault matrix (docs/reliability.md), through the real CLI, agent and instances.

At every journal step of a deployment a process is killed with SIGKILL: the host agent, an
instance, HAProxy (the CLI itself: ``test_deploy_e2e.test_kill_9_at_each_journal_step_recovers``).
Then: the disk is full (a small tmpfs home), a second writer holds the SQLite lock, the audit
head file is damaged. For each: the environment serves the old or the new release (a client
never gets anything else), nothing is lost (history says what happened, the agent runs exactly
the recorded instances), the next command recovers or the error says exactly what to do, and
no command prints a traceback. (The system clock jumping back: tests/engine/test_clock_jump.py.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from castiron.engine.journal import STEPS
from castiron.ports import free_port

from .conftest import APP, SPEC, Project, get, project_env, reap_home, wait_for

pytestmark = pytest.mark.slow

FAULT_STEPS = [s for s in STEPS if s not in ("start", "finish")]


def no_traceback(proc: subprocess.CompletedProcess[str] | tuple[int, str, str]) -> None:
    err = proc.stderr if isinstance(proc, subprocess.CompletedProcess) else proc[2]
    assert "Traceback" not in err, err


def error_line(stderr: str) -> str:
    """The one ``error: ...`` line a failed command ends with."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert lines, stderr
    return lines[0]


class Watcher:
    """A client polling the environment in the background: every answer must be the old or the
    new version (a request may wait while the agent is down: the listening socket is kept)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = get(self.port, timeout=30)
                self.seen.append(body.strip() if status == 200 else f"HTTP {status}")
            except (OSError, http.client.HTTPException):  # cut when the proxy dies: never wrong
                self.errors += 1
                time.sleep(0.05)
            time.sleep(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=40)


def processes(match: Callable[[list[str]], bool]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if match(argv):
            found.append(int(entry))
    return found


def kill_agent(project: Project) -> None:
    os.kill(int((project.home / "agent" / "agent.pid").read_text()), signal.SIGKILL)


def kill_instance(project: Project) -> None:
    """The newest instance the agent runs (the new release's once it has one)."""
    records = json.loads((project.home / "agent" / "instances.json").read_text())["instances"]
    running = [r for r in records if r["state"] == "running"]
    newest = max(running, key=lambda r: r["started_at"])
    os.killpg(newest["pid"], signal.SIGKILL)


def kill_haproxy(project: Project) -> None:
    home = str(project.home)
    pids = processes(lambda a: os.path.basename(a[0]) == "haproxy" and any(home in x for x in a))
    assert pids, "no HAProxy runs for this project"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def leaks(project: Project) -> tuple[list[str], set[str]]:
    """(processes the agent runs that castiron does not record, recorded instances that run
    nowhere). An instance killed by hand is replaced by the agent under a new id (recorded by
    the next change): a replacement counts as its original."""
    status = project.status()
    warm = status["warm"] or []
    assert isinstance(warm, list) and isinstance(status["instances"], list)
    warm_instances = [i for release in warm for i in release["instances"]]
    recorded = {str(i["id"]) for i in [*status["instances"], *warm_instances]}
    records = json.loads((project.home / "agent" / "instances.json").read_text())["instances"]
    replaces = {r["id"]: r.get("replaces", "") for r in records}
    running = [r["id"] for r in records if r["state"] == "running"]

    def chain(iid: str) -> set[str]:
        """``iid`` and every instance it replaced."""
        out = {iid}
        while replaces.get(iid) and replaces[iid] not in out:
            iid = replaces[iid]
            out.add(iid)
        return out

    alive = [chain(i) for i in running]
    return [min(c) for c in alive if not c & recorded], recorded - set().union(*alive)


def agent_matches_records(project: Project, step: str = "") -> None:
    """Nothing leaked: every process the agent runs is an instance castiron records (or its
    replacement), and every recorded instance runs (once the agent has replaced one that was
    killed: that takes a back-off and a health check)."""
    deadline = time.monotonic() + 30
    while leaks(project) != ([], set()):
        if time.monotonic() > deadline:
            events = (project.home / "agent" / "events.jsonl").read_text().splitlines()[-8:]
            pytest.fail(f"{step}: {leaks(project)}; the agent's last events: {events}")
        time.sleep(0.2)


def fault_at_each_step(project: Project, inject: Callable[[Project], None]) -> None:
    """Deploy, then for every journal step: pause a deployment there, inject the fault, let the
    deployment go on, run the next command, and check the outcome (see the module)."""
    project.bake("v1")
    project.deploy("v1", "v0")
    current = "v0"
    for n, step in enumerate(FAULT_STEPS, start=1):
        new = f"v{n}"
        proc = project.start(
            "deploy", "staging", "--yes", extra={"VERSION": new, "CASTIRON_TEST_PAUSE_AT": step}
        )
        with Watcher(project.port) as watcher:
            paused = project.home / f"paused-at-{step}"
            wait_for(paused.exists, what=f"the pause at {step}")
            inject(project)
            (project.home / f"resume-{step}").write_text("")
            out, err = proc.communicate(timeout=120)
            paused.unlink()
            (project.home / f"resume-{step}").unlink()
            no_traceback((proc.returncode, out, err))
            assert proc.returncode in (0, 1), f"{step}: {err}"
            if proc.returncode == 1:
                error_line(err)
            nxt = project.run("status", "staging")  # the next command recovers
            no_traceback(nxt)
            assert nxt.returncode == 0, f"{step}: {nxt.stderr}"
            served = project.served()
        assert served in (current, new), f"{step}: serves {served!r}"
        wrong = [s for s in watcher.seen if s not in (current, new)]
        assert not wrong, f"{step}: a client got {wrong[:3]}"
        history = project.json("history", "staging")["deployments"]
        assert isinstance(history, list)
        assert history[0]["outcome"] in ("succeeded", "failed", "aborted"), f"{step}"
        assert (history[0]["outcome"] == "succeeded") == (served == new), f"{step}: {history[0]}"
        agent_matches_records(project, step)
        current = served
    audit = project.run("audit", "verify")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_kill_9_of_the_agent_at_each_journal_step(make_project: Callable[..., Project]) -> None:
    fault_at_each_step(make_project(replicas=1, deploy_timeout="10s"), kill_agent)


def test_kill_9_of_an_instance_at_each_journal_step(make_project: Callable[..., Project]) -> None:
    # Two replicas: when the instance killed is one that serves, the other still does.
    fault_at_each_step(make_project(replicas=2, deploy_timeout="10s"), kill_instance)


@pytest.fixture
def short_project() -> Iterator[Project]:
    """A project under a short path: HAProxy refuses Unix socket paths over 97 bytes, which a
    pytest temporary directory can exceed."""
    root = Path(tempfile.mkdtemp(prefix="ci-", dir="/tmp"))
    (root / "app").mkdir()
    (root / "app" / "app.py").write_text(APP)
    port = free_port()
    (root / "castiron.yaml").write_text(SPEC.format(replicas=1, port=port, deploy_timeout="10s"))
    project = Project(root, port, project_env(root))
    try:
        yield project
    finally:
        reap_home(project.home)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.haproxy
def test_kill_9_of_haproxy_at_each_journal_step(short_project: Project) -> None:
    short_project.ok("agent", "start", "--router", "haproxy")  # the agent's data plane
    fault_at_each_step(short_project, kill_haproxy)


# --- disk, lock, audit head ------------------------------------------------------------------


@pytest.fixture
def small_home(make_project: Callable[..., Project]) -> Iterator[Project]:
    """A project whose CASTIRON_HOME is a 64 MiB tmpfs (root only: CI runs as root)."""
    project = make_project(replicas=1, deploy_timeout="10s")
    project.home.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(project.home)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        why = f"cannot mount a tmpfs (root with CAP_SYS_ADMIN needed): {mounted.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":  # CI runs as root: never skip there
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield project
    finally:
        reap_home(project.home)
        for _ in range(50):
            if subprocess.run(["umount", str(project.home)], check=False).returncode == 0:
                break
            time.sleep(0.1)


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(bytes(1 << 20))


def test_disk_full(small_home: Project) -> None:
    project = small_home
    project.bake("v1")
    project.deploy("v1", "one")
    filler = project.home / "filler"
    fill(filler)

    proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two"})

    no_traceback(proc)
    assert proc.returncode == 1
    assert "is full" in error_line(proc.stderr) and "free some space" in proc.stderr
    assert project.served() == "one"
    filler.unlink()
    nxt = project.run("status", "staging")
    no_traceback(nxt)
    assert nxt.returncode == 0 and project.served() == "one"
    project.deploy("v1", "two")
    assert project.served() == "two"
    agent_matches_records(project)
    assert project.run("audit", "verify").returncode == 0


def test_a_second_writer_holding_the_sqlite_lock(make_project: Callable[..., Project]) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    db = sqlite3.connect(project.home / "state.db", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two"})
        assert project.served() == "one"
    finally:
        db.execute("ROLLBACK")
        db.close()
    no_traceback(proc)
    assert proc.returncode == 1
    assert error_line(proc.stderr) == (
        f"error: {project.home / 'state.db'}: another process holds the state store's write "
        "lock (database is locked after waiting for it); run the command again once that "
        f"process has finished (`fuser {project.home / 'state.db'}` names it). An interrupted "
        "deployment is recovered by the next command"
    )
    project.deploy("v1", "two")
    assert project.served() == "two"
    agent_matches_records(project)


def test_a_damaged_audit_head(make_project: Callable[..., Project]) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    head = project.home / "audit.head"
    head.write_text("{not json\n")

    proc = project.run("deploy", "staging", "--yes", extra={"VERSION": "two"})

    no_traceback(proc)
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert line.startswith(f"error: the audit head file {head} is damaged (")
    assert line.endswith(
        f"nothing was changed. Run `castiron audit verify` to check the audit log; if only this "
        f"file is wrong, move it aside (mv {head} {head}.damaged) and run the command again: "
        "the next change records a fresh head"
    )
    assert project.served() == "one" and head.read_text() == "{not json\n"  # evidence kept
    verify = project.run("audit", "verify")
    no_traceback(verify)
    assert verify.returncode == 1 and f"mv {head} {head}.damaged" in verify.stderr
    head.rename(head.with_name("audit.head.damaged"))
    project.deploy("v1", "two")
    assert project.served() == "two"
    assert project.run("audit", "verify").returncode == 0
