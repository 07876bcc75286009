"""Instance limits with cgroups: the host's layout read from /proc (v1, v2, none), the groups
and limit files written for each version, and a real instance that allocates past its memory
limit and is contained (or, where this host cannot enforce limits, says so plainly)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from castiron.agent import cgroups
from castiron.agent.cgroups import CgroupHost, Limits, create_groups, find_host, remove_groups
from castiron.agent.client import AgentEvent, SpawnRequest
from castiron.agent.supervisor import Supervisor

MiB = 1 << 20

V1_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / {root}/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw
"""
V1_CGROUP = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n"
V2_MOUNTINFO = "30 23 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_CGROUP = "0::/user.slice/app.service\n"


def fake_proc(tmp_path: Path, mountinfo: str, cgroup: str) -> Path:
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "mountinfo").write_text(mountinfo.format(root=tmp_path / "cg"))
    (proc / "cgroup").write_text(cgroup)
    return proc


def test_v1_host_puts_groups_below_the_own_group_of_each_controller(tmp_path: Path) -> None:
    (tmp_path / "cg" / "memory" / "process_api" / "abc").mkdir(parents=True)
    (tmp_path / "cg" / "cpu").mkdir(parents=True)
    host = find_host(fake_proc(tmp_path, V1_MOUNTINFO, V1_CGROUP))
    assert host == CgroupHost(
        "v1", tmp_path / "cg" / "memory" / "process_api" / "abc", tmp_path / "cg" / "cpu"
    )
    groups = create_groups(host, "web-1", Limits(memory_bytes=64 * MiB, cpus=0.5))
    memory, cpu = (Path(g) for g in groups)
    assert memory.name == cpu.name == "castiron.web-1"
    assert (memory / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "50000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"


def test_v2_host_writes_memory_max_and_cpu_max(tmp_path: Path) -> None:
    base = tmp_path / "cg" / "user.slice" / "app.service"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("cpu memory\n")
    host = find_host(fake_proc(tmp_path, V2_MOUNTINFO, V2_CGROUP))
    assert host == CgroupHost("v2", base, base)
    (group,) = create_groups(host, "web-1", Limits(memory_bytes=128 * MiB, cpus=1.5))
    assert Path(group) == base / "castiron.web-1"
    assert (Path(group) / "memory.max").read_text() == str(128 * MiB)
    assert (Path(group) / "cpu.max").read_text() == "150000 100000"


def test_v2_without_memory_controller_falls_back_to_v1_or_says_why(tmp_path: Path) -> None:
    (tmp_path / "cg" / "unified").mkdir(parents=True)
    (tmp_path / "cg" / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    host = find_host(
        fake_proc(tmp_path, V2_MOUNTINFO.replace("{root}", "{root}/unified"), "0::/\n")
    )
    assert host.version is None
    assert host.problem == (
        "no cgroup hierarchy with the memory or cpu controller is mounted (/sys/fs/cgroup)"
    )
    assert host.cannot(Limits(memory_bytes=1)) == host.problem
    assert host.cannot(Limits()) == host.problem


def test_a_group_that_cannot_delegate_is_reported(tmp_path: Path) -> None:
    base = tmp_path / "cg" / "user.slice" / "app.service"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu memory\n")
    (base / "cgroup.subtree_control").write_text("")
    (base / "cgroup.procs").write_text("1\n2\n")
    host = find_host(fake_proc(tmp_path, V2_MOUNTINFO, V2_CGROUP))
    assert host.problem is None  # the group is ours: it may delegate once it holds no process
    # A plain file takes the write but never shows the controllers enabled, as the kernel
    # does for a group that holds processes (EBUSY).
    prepared = cgroups.prepare(host, pid=2)
    assert prepared == CgroupHost(
        "v2",
        problem=f"{base} holds other processes than the agent, so it cannot hand the memory "
        "and cpu controllers to instance groups (run the agent as a systemd service with "
        "Delegate=yes)",
    )
    (base / "cgroup.procs").write_text("2\n")  # alone: the agent moves itself into a leaf
    moved = cgroups.prepare(host, pid=2)
    assert (base / "castiron-agent" / "cgroup.procs").read_text() == "2"
    assert moved.problem == (
        f"cannot enable the memory and cpu controllers in {base}/cgroup.subtree_control: "
        "they stay disabled"
    )


def test_limits_describe_themselves() -> None:
    assert Limits(memory_bytes=64 * MiB, cpus=0.5).describe() == "memory 64 MiB, cpus 0.5"
    assert not Limits()
    assert remove_groups(()) is None


# --- a real instance --------------------------------------------------------------------------

HOG = """
import sys
chunks = []
for i in range(60):
    chunks.append(bytearray(10 * 1024 * 1024))
    print(f"allocated {10 * (i + 1)} MiB", flush=True)
print("never contained", flush=True)
"""


def test_an_instance_allocating_past_its_limit_is_contained(tmp_path: Path) -> None:
    events: list[AgentEvent] = []
    host = cgroups.probe(find_host())

    async def scenario() -> tuple[object, str]:
        sup = Supervisor(tmp_path / "instances.json", tmp_path / "logs", on_event=events.append)
        await sup.open()
        record = sup.spawn(
            SpawnRequest(
                id="hog-1",
                environment="staging",
                release="r1",
                argv=(sys.executable, "-c", HOG),
                env={"PATH": "/usr/bin:/bin"},
                memory_bytes=64 * MiB,
            )
        )
        async with asyncio.timeout(60):
            while sup.get("hog-1").state == "running":
                await asyncio.sleep(0.05)
        await sup.close()
        return sup.get("hog-1"), record.limits

    final, limits = asyncio.run(scenario())
    output = (tmp_path / "logs" / "hog-1.log").read_text()
    records = json.loads((tmp_path / "instances.json").read_text())["instances"]
    if host.problem is not None:  # this host cannot: the record says so, nothing pretends
        assert limits == f"not enforced: {host.problem}"
        assert "never contained" in output
        return
    assert limits == f"memory 64 MiB (cgroup {host.version})"
    assert final.exit_code == -9
    assert "never contained" not in output
    allocated = [int(line.split()[1]) for line in output.splitlines() if line.startswith("alloc")]
    assert max(allocated, default=0) < 64
    (exited,) = [e for e in events if e.kind == "instance-exited"]
    assert exited.detail == (
        "killed by SIGKILL; out of memory: killed at its limit (memory 64 MiB (cgroup "
        f"{host.version}))"
    )
    assert records[0]["cgroups"] and not any(Path(g).exists() for g in records[0]["cgroups"])


def test_where_limits_cannot_be_enforced_the_record_says_so(tmp_path: Path) -> None:
    def nowhere() -> CgroupHost:
        return CgroupHost(None, problem="no cgroup hierarchy here")

    async def scenario() -> str:
        sup = Supervisor(
            tmp_path / "instances.json",
            tmp_path / "logs",
            on_event=lambda e: None,
            cgroup_host=nowhere,
        )
        await sup.open()
        record = sup.spawn(
            SpawnRequest(
                id="small-1",
                environment="staging",
                release="r1",
                argv=(sys.executable, "-c", "print('ran')"),
                env={"PATH": "/usr/bin:/bin"},
                memory_bytes=64 * MiB,
                cpus=0.5,
            )
        )
        async with asyncio.timeout(30):
            while sup.get("small-1").state == "running":
                await asyncio.sleep(0.02)
        await sup.close()
        assert record.cgroups == ()
        return record.limits

    assert asyncio.run(scenario()) == "not enforced: no cgroup hierarchy here"
    assert (tmp_path / "logs" / "small-1.log").read_text() == "ran\n"
