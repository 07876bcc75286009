"""Environment locks: leases, heartbeats, expiry, and real processes contending through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from castiron.errors import LockedError, NotFoundError
from castiron.settings import load_settings
from castiron.state.base import ManualClock, StateStore
from castiron.state.locks import LockManager, pid_alive
from castiron.state.store import open_state

# -- rules, on a manual clock -------------------------------------------------------------------


def _manager(store: StateStore, clock: ManualClock, host: str, pid: int) -> LockManager:
    return LockManager(store, host=host, pid=pid, clock=clock)


def test_a_second_mutator_fails_at_once_naming_the_holder(
    store: StateStore, clock: ManualClock
) -> None:
    first = _manager(store, clock, "elsewhere", 123)
    with (
        first.acquire("staging", "deploy v2", heartbeat=False),
        pytest.raises(LockedError) as caught,
    ):
        _manager(store, clock, "here", 456).acquire("staging", "deploy v3")
    assert str(caught.value) == (
        "environment 'staging' is locked by tester@testhost (pid 123) for \"deploy v2\" "
        "since 2026-11-30T10:00:00Z; retry with --lock-wait SECONDS"
    )
    assert caught.value.exit_code == 4
    assert store.get_lease("staging") is None  # released on exit
    actions = [e.action for e in store.audit_entries()]
    assert actions == ["lock.acquire", "lock.release"]


def test_a_dead_holders_lease_expires_at_its_ttl(store: StateStore, clock: ManualClock) -> None:
    _manager(store, clock, "elsewhere", 123).acquire("staging", "deploy", ttl=15, heartbeat=False)
    second = _manager(store, clock, "here", 456)
    clock.advance(14)
    with pytest.raises(LockedError):
        second.acquire("staging", "next", heartbeat=False)
    clock.advance(1)
    held = second.acquire("staging", "next", heartbeat=False)
    assert held.lease.holder == "tester@testhost" and held.lease.pid == 456
    replaced = store.audit_entries()[-1].details["replaced"]
    assert replaced["pid"] == 123 and replaced["why"].startswith("expired at")


def test_a_waiter_polls_until_the_lease_expires(store: StateStore, clock: ManualClock) -> None:
    _manager(store, clock, "elsewhere", 123).acquire("staging", "deploy", ttl=15, heartbeat=False)
    start = clock.now()
    held = _manager(store, clock, "here", 456).acquire("staging", "next", wait=60, heartbeat=False)
    waited = (clock.now() - start).total_seconds()
    assert 15 <= waited < 17
    assert held.lease.purpose == "next"


def test_a_waiter_gives_up_after_its_wait(store: StateStore, clock: ManualClock) -> None:
    _manager(store, clock, "elsewhere", 123).acquire("staging", "deploy", heartbeat=False)
    with pytest.raises(LockedError, match=r"still held after waiting 5s"):
        _manager(store, clock, "here", 456).acquire("staging", "next", wait=5)


def test_a_gone_process_on_this_host_releases_at_once(
    store: StateStore, clock: ManualClock
) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _manager(store, clock, "here", gone.pid).acquire("staging", "deploy", heartbeat=False)
    held = _manager(store, clock, "here", os.getpid()).acquire("staging", "next", heartbeat=False)
    assert "is gone" in store.audit_entries()[-1].details["replaced"]["why"]
    held.release()


def test_manual_locks_do_not_die_with_their_process(store: StateStore, clock: ManualClock) -> None:
    manager = _manager(store, clock, "here", 999_999_999)
    lease = manager.acquire_manual("staging", "db maintenance")
    assert lease.pid is None and lease.expires == lease.acquired + timedelta(hours=1)
    with pytest.raises(LockedError, match=r"manual lock until 2026-11-30T11:00:00Z"):
        _manager(store, clock, "here", 1).acquire("staging", "deploy")


def test_release_and_break(store: StateStore, clock: ManualClock) -> None:
    mine = _manager(store, clock, "here", 1)
    mine.acquire_manual("staging", "maintenance")
    assert mine.release_manual("staging").purpose == "maintenance"
    with pytest.raises(NotFoundError):
        mine.release_manual("staging")
    with pytest.raises(NotFoundError):
        mine.break_lock("staging")
    _manager(store, clock, "elsewhere", 2).acquire("staging", "deploy", heartbeat=False)
    with pytest.raises(LockedError, match="only its holder releases it"):
        mine.release_manual("staging")
    broken = mine.break_lock("staging", "stuck")
    assert broken.purpose == "deploy" and store.get_lease("staging") is None
    entry = store.audit_entries()[-1]
    assert (entry.action, entry.from_, entry.details["reason"]) == (
        "lock.break",
        "tester@testhost",
        "stuck",
    )


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)


# -- the heartbeat, in real time ----------------------------------------------------------------


def test_the_heartbeat_keeps_a_lease_alive_past_its_ttl(open_store) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    ttl = 0.6
    holder = LockManager(store, host="elsewhere")
    with holder.acquire("staging", "long deploy", ttl=ttl) as held:
        first_expiry = held.lease.expires
        deadline = time.monotonic() + 10
        # Wait (by polling, not a fixed sleep) until two renewals have carried it past its ttl.
        while store.clock.now() < first_expiry + timedelta(seconds=ttl):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lease = store.get_lease("staging")
        assert lease is not None and lease.expires > store.clock.now()
        with pytest.raises(LockedError):
            LockManager(store, host="here").acquire("staging", "sneak in", heartbeat=False)
        held.check()
    assert store.get_lease("staging") is None


def test_a_broken_lease_is_noticed_by_its_holder(open_store) -> None:  # type: ignore[no-untyped-def]
    store = open_store()
    held = LockManager(store, host="elsewhere").acquire("staging", "deploy", ttl=0.3)
    LockManager(store).break_lock("staging")
    deadline = time.monotonic() + 10
    while not held.lost:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(LockedError, match="was lost"):
        held.check()
    assert held.release() is False


# -- real processes ------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import os, sys
    from castiron.settings import load_settings
    from castiron.state.locks import LockManager
    from castiron.state.store import open_state

    env, ttl = sys.argv[2], float(sys.argv[3])
    with open_state(load_settings(os.environ), actor="holder@box") as store:
        with LockManager(store).acquire(env, "deploy v2", ttl=ttl):
            print("held", flush=True)
            sys.stdin.readline()
    print("released", flush=True)
    """
)


@pytest.fixture
def shared(
    home: Path, backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The test's home, its state on the backend under test (processes find it through the
    environment: CASTIRON_HOME, and CASTIRON_STATE for PostgreSQL)."""
    if backend == "postgres":
        monkeypatch.setenv("CASTIRON_STATE", str(request.getfixturevalue("postgres_url")))
    return home


@pytest.fixture
def holder(shared: Path) -> Iterator[object]:
    """Start a real process holding a heartbeat lease on 'staging'; yields a starter."""
    procs: list[subprocess.Popen[str]] = []

    def start(ttl: float = 15.0) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(shared), "staging", str(ttl)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "held\n"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "castiron.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_second_process_gets_exit_4_naming_the_holder(holder) -> None:  # type: ignore[no-untyped-def]
    proc = holder()
    result = _cli("lock", "acquire", "staging", "-m", "maintenance")
    assert result.returncode == 4
    assert result.stderr.startswith(
        f"error: environment 'staging' is locked by holder@box (pid {proc.pid}) "
        'for "deploy v2" since '
    )
    assert "retry with --lock-wait SECONDS" in result.stderr
    status = json.loads(_cli("lock", "status", "staging", "--json").stdout)
    assert [(s["holder"], s["pid"], s["live"]) for s in status["locks"]] == [
        ("holder@box", proc.pid, True)
    ]


def test_a_waiting_process_gets_the_lock_after_release(holder) -> None:  # type: ignore[no-untyped-def]
    proc = holder()
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "castiron.cli.main",
            "lock",
            "acquire",
            "staging",
            "-m",
            "after you",
            "--lock-wait",
            "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stderr is not None
        assert "is locked by holder@box" in waiter.stderr.readline()  # it is waiting now
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "released\n"
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 0, err
    assert "locked environment 'staging'" in out
    assert _cli("lock", "release", "staging").returncode == 0
    actions = [e["action"] for e in json.loads(_cli("audit", "--json").stdout)["entries"]]
    assert actions == ["lock.acquire", "lock.release", "lock.acquire", "lock.release"]


def test_a_sigkilled_holders_lease_is_free_at_once(holder) -> None:  # type: ignore[no-untyped-def]
    proc = holder(ttl=600)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = json.loads(_cli("lock", "status", "--json").stdout)["locks"]
    assert status[0]["live"] is False and "is gone" in status[0]["reason"]
    result = _cli("lock", "acquire", "staging", "-m", "cleanup")
    assert result.returncode == 0, result.stderr


def test_the_heartbeat_outlives_the_ttl_across_processes(holder) -> None:  # type: ignore[no-untyped-def]
    proc = holder(ttl=0.6)
    with open_state(load_settings(os.environ), actor="observer@box") as store:
        first = store.get_lease("staging")
        assert first is not None
        deadline = time.monotonic() + 10
        while store.clock.now() < first.expires + timedelta(seconds=0.6):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    result = _cli("lock", "acquire", "staging", "-m", "too early")
    assert result.returncode == 4, result.stderr
    assert f"(pid {proc.pid})" in result.stderr


def test_cli_lock_commands(run_cli, shared: Path) -> None:  # type: ignore[no-untyped-def]
    assert run_cli("lock", "status").stdout == "no environment is locked\n"
    took = run_cli("lock", "acquire", "staging", "-m", "db migration", "--ttl", "30m")
    assert took.exit_code == 0
    shown = run_cli("lock", "status", "staging")
    assert "locked by tester@testhost (manual lock until" in shown.stdout
    assert 'for "db migration"' in shown.stdout
    assert run_cli("lock", "acquire", "staging", "-m", "again").exit_code == 4
    assert run_cli("lock", "break", "staging", "--reason", "testing", "--yes").exit_code == 0
    assert run_cli("lock", "release", "staging").exit_code == 2
    assert run_cli("lock", "acquire", "Bad_Name", "-m", "x").exit_code == 2
    assert run_cli("lock", "acquire", "staging", "-m", "x", "--ttl", "soon").exit_code == 2
    assert run_cli("audit", "verify").stdout == "ok: 2 entries\n"
