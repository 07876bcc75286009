"""The supervisor with real processes: spawn, exit codes, stop, adoption, loss, log rotation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from castiron.agent.client import AgentEvent, InstanceRecord, SpawnRequest
from castiron.agent.supervisor import LogPolicy, Supervisor, process_start_time, rotate_file
from castiron.errors import AgentError, NotFoundError, UsageError


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "agent"
    path.mkdir()
    return path


@pytest.fixture
def reap(state: Path) -> Callable[[], None]:
    """Kill whatever instances the records list (finalizer and explicit use)."""

    def _reap() -> None:
        try:
            records = json.loads((state / "instances.json").read_text())["instances"]
        except (OSError, ValueError):
            return
        for record in records:
            with contextlib.suppress(KeyError, TypeError, ProcessLookupError):
                if process_start_time(record["pid"]) == record["start_time"]:
                    os.killpg(record["pid"], signal.SIGKILL)

    return _reap


@pytest.fixture(autouse=True)
def _cleanup(reap: Callable[[], None]) -> Any:
    yield
    reap()


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make(state: Path, events: list[AgentEvent], **kwargs: Any) -> Supervisor:
    return Supervisor(state / "instances.json", state / "logs", on_event=events.append, **kwargs)


def request(instance_id: str, code: str, **kwargs: Any) -> SpawnRequest:
    return SpawnRequest(
        id=instance_id,
        environment="staging",
        release="r1",
        argv=(sys.executable, "-c", code),
        env={"PATH": "/usr/bin:/bin", "API_TOKEN": "s3cr3t-value"},
        **kwargs,
    )


async def wait_exit(sup: Supervisor, instance_id: str, timeout: float = 10.0) -> InstanceRecord:
    async with asyncio.timeout(timeout):
        while sup.get(instance_id).state == "running":
            await asyncio.sleep(0.01)
    return sup.get(instance_id)


def test_spawn_records_the_process_and_sees_its_exit_code(state: Path) -> None:
    events: list[AgentEvent] = []
    exits: list[InstanceRecord] = []

    async def scenario() -> tuple[InstanceRecord, InstanceRecord]:
        sup = make(state, events, on_exit=exits.append)
        await sup.open()
        started = sup.spawn(request("a", "print('hello'); import sys; sys.exit(3)"))
        final = await wait_exit(sup, "a")
        await sup.close()
        return started, final

    started, final = run(scenario())
    assert started.pid > 0 and started.state == "running"
    assert started.start_time > 0
    assert started.env_names == ("API_TOKEN", "PATH")
    assert final.state == "exited" and final.exit_code == 3
    assert exits == [final]
    assert [e.kind for e in events] == ["instance-started", "instance-exited"]
    assert events[1].exit_code == 3
    assert Path(final.log_path).read_text() == "hello\n"
    assert "s3cr3t-value" not in (state / "instances.json").read_text()


def test_instances_run_in_their_own_session(state: Path) -> None:
    async def scenario() -> InstanceRecord:
        sup = make(state, [])
        await sup.open()
        record = sup.spawn(request("a", "import time; time.sleep(30)"))
        await sup.close()
        return record

    record = run(scenario())
    assert os.getsid(record.pid) == record.pid
    assert os.getsid(record.pid) != os.getsid(0)


def test_stop_sends_sigterm_then_sigkill_after_grace(state: Path) -> None:
    events: list[AgentEvent] = []
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )

    async def scenario() -> tuple[InstanceRecord, InstanceRecord]:
        sup = make(state, events)
        await sup.open()
        polite = sup.spawn(request("polite", "import time; time.sleep(60)"))
        sup.spawn(request("stubborn", stubborn))
        async with asyncio.timeout(10):
            while "up" not in Path(sup.get("stubborn").log_path).read_text():
                await asyncio.sleep(0.01)
        first = await sup.stop(polite.id, grace=5)
        second = await sup.stop("stubborn", grace=0.2)
        assert sup.records() == []
        with pytest.raises(NotFoundError):
            sup.get("polite")
        await sup.close()
        return first, second

    first, second = run(scenario())
    assert first.exit_code == -signal.SIGTERM
    assert second.exit_code == -signal.SIGKILL
    assert json.loads((state / "instances.json").read_text())["instances"] == []


def test_a_new_supervisor_adopts_running_instances_and_sees_them_exit(state: Path) -> None:
    events: list[AgentEvent] = []

    async def first_agent() -> InstanceRecord:
        sup = make(state, events)
        await sup.open()
        record = sup.spawn(request("a", "import time; time.sleep(60)"))
        await sup.close()
        return record

    async def second_agent(pid: int) -> tuple[InstanceRecord, InstanceRecord]:
        sup = make(state, events)
        await sup.open()
        adopted = sup.get("a")
        os.kill(pid, signal.SIGKILL)
        final = await wait_exit(sup, "a")
        await sup.close()
        return adopted, final

    record = run(first_agent())
    adopted, final = run(second_agent(record.pid))
    assert adopted.adopted and adopted.pid == record.pid and adopted.state == "running"
    assert final.state == "exited" and final.exit_code is None  # not our child: no status
    kinds = [e.kind for e in events]
    assert kinds == ["instance-started", "instance-adopted", "instance-exited"]


def test_a_record_whose_process_is_gone_or_reused_is_marked_lost(state: Path) -> None:
    events: list[AgentEvent] = []

    async def first_agent() -> InstanceRecord:
        sup = make(state, events)
        await sup.open()
        record = sup.spawn(request("a", "import time; time.sleep(60)"))
        await sup.close()
        return record

    record = run(first_agent())
    # Same pid, other start time: a reused pid must never be adopted.
    data = json.loads((state / "instances.json").read_text())
    data["instances"][0]["start_time"] = record.start_time + 1
    (state / "instances.json").write_text(json.dumps(data))

    async def second_agent() -> InstanceRecord:
        sup = make(state, events)
        await sup.open()
        await sup.close()
        return sup.get("a")

    lost = run(second_agent())
    os.killpg(record.pid, signal.SIGKILL)
    assert lost.state == "exited" and not lost.adopted
    assert events[-1].kind == "instance-lost"


def test_a_damaged_records_file_is_refused_and_left_alone(state: Path) -> None:
    (state / "instances.json").write_text('{"version": 1, "instances": [{"id": 1}]}')

    async def scenario() -> None:
        await make(state, []).open()

    with pytest.raises(AgentError, match=r"instances\.json: not a valid instance record file"):
        run(scenario())
    assert "instances" in (state / "instances.json").read_text()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "../x"}, "body.id: '../x' is not a valid instance id"),
        ({"environment": "Prod"}, "body.environment: 'Prod' is not a valid name"),
        ({"argv": ()}, "body.argv: must not be empty"),
        ({"cwd": "relative"}, "body.cwd: 'relative' must be an absolute path"),
        ({"argv": ("/nonexistent/binary",)}, "instance a: cannot start '/nonexistent/binary'"),
    ],
)
def test_spawn_refuses_bad_requests(state: Path, changes: dict[str, Any], message: str) -> None:
    async def scenario() -> None:
        sup = make(state, [])
        await sup.open()
        fields = {"id": "a", "environment": "staging", "release": "r", "argv": ("true",)}
        with pytest.raises(UsageError) as info:
            sup.spawn(SpawnRequest(**{**fields, **changes}))
        assert str(info.value).startswith(message)

    run(scenario())


def test_duplicate_ids_are_refused(state: Path) -> None:
    async def scenario() -> None:
        sup = make(state, [])
        await sup.open()
        sup.spawn(request("a", "import time; time.sleep(60)"))
        with pytest.raises(UsageError, match="already exists"):
            sup.spawn(request("a", "pass"))
        await sup.close()

    run(scenario())


def test_logs_are_rotated_by_copy_truncate_while_the_instance_writes(state: Path) -> None:
    writer = (
        "import sys, time\n"
        "for i in range(400):\n"
        "    sys.stdout.write(f'line {i:04d} ' + 'x' * 90 + '\\n'); sys.stdout.flush()\n"
        "    time.sleep(0.001)\n"
    )

    async def scenario() -> InstanceRecord:
        sup = make(state, [], log_policy=LogPolicy(max_bytes=4096, backups=2))
        await sup.open()
        record = sup.spawn(request("a", writer))
        async with asyncio.timeout(20):
            while sup.get("a").state == "running":
                sup.rotate_logs()
                await asyncio.sleep(0.005)
        await sup.close()
        return record

    record = run(scenario())
    log = Path(record.log_path)
    rotated = [log.with_name(log.name + f".{n}") for n in (1, 2)]
    assert all(p.exists() for p in rotated)
    assert not log.with_name(log.name + ".3").exists()
    for path in rotated:
        assert path.stat().st_size >= 4096
        assert path.read_text().startswith("line ")
    # The instance keeps writing between two rotation checks (a busy machine stretches the
    # gap), so the live file may pass the limit a little; unrotated it would hold ~40 KB.
    assert log.stat().st_size < 2 * 4096
    # The writer's O_APPEND descriptor goes on at the start of the truncated file (no holes).
    assert "\0" not in log.read_text()


def test_rotate_file_keeps_n_backups(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    for n in range(4):
        path.write_text(f"gen {n}\n")
        rotate_file(path, 2)
    assert path.read_text() == ""
    assert (tmp_path / "x.log.1").read_text() == "gen 3\n"
    assert (tmp_path / "x.log.2").read_text() == "gen 2\n"
    assert not (tmp_path / "x.log.3").exists()
