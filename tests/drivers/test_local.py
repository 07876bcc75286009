"""The local runtime beyond the conformance suite: release rootfs, isolation, env, secrets,
replacement of a crashed instance, and ``castiron logs``."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from castiron.agent.client import AgentClient, AgentEvent, to_json
from castiron.agent.replacement import ReplaceBackoff
from castiron.drivers.local import LocalDriver, SandboxPolicy
from castiron.errors import DigestMismatchError, RuntimeDriverError
from castiron.images.rootfs import unpack_release
from castiron.images.store import ImageStore
from castiron.model import HealthCheck, ImageRef, Instance, InstanceSpec, Isolation, ReleaseId
from castiron.ports import free_port
from castiron.settings import Settings
from castiron.traffic.base import Backend, BackendSet, RouteConfig
from testkit import wait_for

from .localkit import (
    LocalImage,
    bwrap_problem,
    get_json,
    make_driver,
    running_agent,
    serving,
    unpack,
)

SECRET = "s3cr3t-value-that-must-never-be-written"


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Settings, AgentClient]]:
    """A running agent on a fresh home (reaped afterwards)."""
    with running_agent(tmp_path / "home") as pair:
        yield pair


@pytest.fixture
def sandbox_ok() -> None:
    """Skips (a failure in CI) where bubblewrap cannot sandbox."""
    problem = bwrap_problem()
    if problem is not None:
        pytest.skip(f"no working bubblewrap: {problem}")


def spec(
    image: LocalImage,
    instance_id: str,
    *,
    isolation: Isolation = "auto",
    env: dict[str, str] | None = None,
    secrets: frozenset[str] = frozenset(),
    writable: tuple[str, ...] = (),
    environment: str = "web",
) -> InstanceSpec:
    return InstanceSpec(
        id=instance_id,
        app="demo",
        environment=environment,
        release=ReleaseId("rel-1"),
        image=image.ref,
        command=image.command,
        env={"GREETING": "hello", **(env or {})},
        workdir="/app",
        port=0,
        secret_names=secrets,
        isolation=isolation,
        writable=writable,
    )


# --- release rootfs ---------------------------------------------------------------------------


def test_rootfs_is_unpacked_once_and_read_only(
    local: tuple[Settings, AgentClient], local_image: LocalImage
) -> None:
    settings, agent = local
    calls: list[Path] = []

    def counting_unpack(image: ImageRef, rootfs: Path) -> None:
        calls.append(rootfs)
        unpack(image, rootfs)

    driver = LocalDriver(agent, settings.releases_path, counting_unpack)
    threads = [
        threading.Thread(target=driver.ensure_image, args=(local_image.ref,)) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    driver.ensure_image(local_image.ref)
    rootfs = driver.rootfs(local_image.ref.digest)
    assert calls == [rootfs]
    assert (rootfs / "app" / "server.py").is_file()
    for path in [rootfs, *rootfs.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        assert mode in ({0o555} if path.is_dir() else {0o444, 0o555}), (path, oct(mode))
    # Nothing half-done beside it.
    assert sorted(p.name for p in rootfs.parent.iterdir()) == [".lock", "rootfs"]


def test_damaged_layer_is_refused(local_image: LocalImage, tmp_path: Path) -> None:
    store = tmp_path / "images"
    shutil.copytree(local_image.ref.store, store)
    layer = ImageStore(store).image(local_image.ref.digest).layers[-1]
    blob = ImageStore(store).blob_path(layer.digest)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # the gzip trailer
    blob.write_bytes(bytes(data))
    rootfs = tmp_path / "releases" / "rootfs"
    with pytest.raises(DigestMismatchError, match=f"layer {layer.digest} .* is damaged"):
        unpack_release(store, local_image.ref.digest, rootfs)
    # A well-formed layer with other content unpacks fine, and is refused all the same.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("app/server.py")
        payload = b"print('not the baked server')\n"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    blob.write_bytes(buffer.getvalue())
    with pytest.raises(DigestMismatchError, match=f"layer {layer.digest} .* is damaged"):
        unpack_release(store, local_image.ref.digest, rootfs)
    assert not rootfs.exists()
    assert list(rootfs.parent.iterdir()) == []


# --- environment, secrets, isolation -----------------------------------------------------------


def test_env_port_and_secrets(local: tuple[Settings, AgentClient], local_image: LocalImage) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    instance = driver.create(
        spec(local_image, "env-1", env={"DB_PASSWORD": SECRET}, secrets=frozenset({"DB_PASSWORD"}))
    )
    wait_for(lambda: serving(instance.address), what="the instance to serve")
    env = get_json(instance.address, "/env")
    port = instance.address.rpartition(":")[2]
    assert env["PORT"] == port
    assert env["HOST"] == "127.0.0.1"
    assert env["GREETING"] == "hello"
    assert env["DB_PASSWORD"] == SECRET  # the instance gets it ...
    observed = driver.inspect(instance)
    assert observed.state == "running"
    assert observed.image == local_image.ref.digest
    assert observed.config["secrets"] == ["DB_PASSWORD"]
    assert "DB_PASSWORD" not in observed.config["env"]  # type: ignore[operator]
    assert observed.config["command"] == list(local_image.command)
    assert observed.config["port"] == int(port)
    # ... and nothing castiron writes holds it: records, requests, events, the API's answers.
    agent_files = [p for p in settings.agent_path.rglob("*") if p.is_file()]
    assert agent_files
    for path in agent_files:
        if path.suffix in (".sock",) or path.name.endswith(".log"):
            continue
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in json.dumps([to_json(r) for r in agent.instances()])
    assert SECRET not in json.dumps([to_json(e) for e in agent.events()])


@pytest.mark.sandbox
def test_sandbox_rootfs_read_only_and_private_tmp(
    local: tuple[Settings, AgentClient], local_image: LocalImage, sandbox_ok: None
) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    first = driver.create(spec(local_image, "sb-1", isolation="sandbox"))
    second = driver.create(spec(local_image, "sb-2", isolation="sandbox"))
    for instance in (first, second):
        wait_for(lambda i=instance: serving(i.address), what=f"{instance.id} to serve")
    fs_first = get_json(first.address, "/fs")
    fs_second = get_json(second.address, "/fs")
    assert fs_first["cwd"] == "/app"
    assert fs_first["tmpdir"] == "/tmp"
    assert fs_first["write_app"] != "ok"  # a read-only mount: even root cannot write
    assert fs_first["write_server"] != "ok"
    assert fs_first["write_tmp"] == "ok"
    # Each instance has its own /tmp: neither sees the other's file, nor the host's /tmp.
    assert fs_first["tmp"] == [f"marker-{first.address.rpartition(':')[2]}"]
    assert fs_second["tmp"] == [f"marker-{second.address.rpartition(':')[2]}"]
    assert driver.inspect(first).config["isolation"] == "sandbox"
    # The processes run in their own pid namespace.
    assert fs_first["pid"] != agent.instance(first.id).pid


@pytest.mark.sandbox
def test_sandbox_writable_paths(
    local: tuple[Settings, AgentClient], local_image: LocalImage, sandbox_ok: None
) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    instance = driver.create(spec(local_image, "wr-1", isolation="sandbox", writable=("/data",)))
    wait_for(lambda: serving(instance.address), what="the instance to serve")
    record = agent.instance(instance.id)
    data_dir = Path(record.instance_dir) / "w0"
    assert data_dir.is_dir()
    driver.destroy(instance, grace=5.0)
    assert not Path(record.instance_dir).exists()  # private directories go with the instance


def test_isolation_none_has_private_tmpdir(
    local: tuple[Settings, AgentClient], local_image: LocalImage
) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    instance = driver.create(spec(local_image, "none-1", isolation="none"))
    wait_for(lambda: serving(instance.address), what="the instance to serve")
    fs = get_json(instance.address, "/fs")
    rootfs = driver.rootfs(local_image.ref.digest)
    assert fs["cwd"] == str(rootfs / "app")
    assert Path(str(fs["tmpdir"])).parent.name == "none-1"
    assert fs["write_tmp"] == "ok"
    if os.geteuid() != 0:  # root ignores file modes; the sandbox's read-only mount does not
        assert fs["write_app"] != "ok"
    assert driver.inspect(instance).config["isolation"] == "none"


def test_sandbox_without_bubblewrap_names_the_fix(
    local: tuple[Settings, AgentClient], local_image: LocalImage
) -> None:
    settings, agent = local
    driver = LocalDriver(agent, settings.releases_path, unpack, sandbox=SandboxPolicy(None))
    driver.ensure_image(local_image.ref)
    with pytest.raises(RuntimeDriverError, match=r"web/nb-1: .*install bubblewrap"):
        driver.create(spec(local_image, "nb-1", isolation="sandbox"))
    auto = driver.create(spec(local_image, "nb-2", isolation="auto"))  # falls back to none
    assert driver.inspect(auto).config["isolation"] == "none"


def test_stray_when_labels_are_incomplete(
    local: tuple[Settings, AgentClient], local_image: LocalImage
) -> None:
    from castiron.agent.client import SpawnRequest

    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    known = driver.create(spec(local_image, "known-1"))
    agent.spawn(
        SpawnRequest(
            id="unknown-1",
            environment="web",
            release="rel-x",
            argv=("sleep", "60"),
            env={"PATH": "/usr/bin:/bin"},
        )
    )
    observed = {o.instance.id: o for o in driver.observe("demo", "web")}
    assert set(observed) == {known.id, "unknown-1"}
    assert not observed[known.id].stray
    assert observed["unknown-1"].stray


# --- replacement ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_a_minute() -> None:
    backoff = ReplaceBackoff()
    assert [backoff.delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(10_000) == 60


def _route(settings: Settings, listen: str, instance: Instance) -> RouteConfig:
    return RouteConfig(
        environment="web",
        listen=listen,
        stable=BackendSet("rel-1", (Backend(instance.id, instance.address),)),
        drain_timeout=1.0,
    )


def test_killed_instance_is_replaced_and_routed(
    local: tuple[Settings, AgentClient], local_image: LocalImage
) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    check = HealthCheck(kind="http", target="/", interval=0.2, timeout=2.0)
    old = driver.create(
        replace(
            spec(local_image, "rep-1", env={"TOKEN": SECRET}, secrets=frozenset({"TOKEN"})),
            health=check,
        )
    )
    wait_for(lambda: serving(old.address), what="the first instance to serve")
    listen = f"127.0.0.1:{free_port()}"
    agent.put_route("web", _route(settings, listen, old))
    wait_for(lambda: serving(listen), what="the route to serve")
    before = agent.events()[-1].seq

    os.kill(agent.instance(old.id).pid, signal.SIGKILL)

    def replaced() -> AgentEvent | None:
        return next((e for e in agent.events(before) if e.kind == "instance-replaced"), None)

    wait_for(replaced, timeout=60.0, what="instance-replaced")
    event = replaced()
    assert event is not None
    assert event.instance == old.id
    new_id = event.replaced_by
    assert new_id and new_id != old.id
    assert event.exit_code == -signal.SIGKILL
    new = agent.instance(new_id)
    assert new.state == "running"
    assert new.replaces == old.id
    assert new.address != old.address
    assert new.release == "rel-1"
    env = get_json(new.address, "/env")
    assert env["PORT"] == new.address.rpartition(":")[2]
    assert env["TOKEN"] == SECRET  # same request, secrets included (kept in memory)
    route = agent.route("web")
    assert [b["id"] for b in route["stable"]["backends"]] == [new_id]
    assert [b["address"] for b in route["stable"]["backends"]] == [new.address]
    assert get_json(listen)["greeting"] == "hello"
    assert agent.instance(old.id).state == "exited"
    observed = {o.instance.id: o for o in driver.observe("demo", "web")}
    assert observed[new_id].state == "running" and not observed[new_id].stray
    assert observed[old.id].state == "exited"
    # Destroying it on request never triggers a replacement.
    driver.destroy(observed[new_id].instance, grace=5.0)
    driver.destroy(old, grace=1.0)
    assert driver.observe("demo", "web") == []
    kinds = [e.kind for e in agent.events(before)]
    assert kinds.count("instance-replaced") == 1


def test_logs_command(
    local: tuple[Settings, AgentClient], local_image: LocalImage, run_cli: object
) -> None:
    settings, agent = local
    driver = make_driver(settings, agent)
    driver.ensure_image(local_image.ref)
    first = driver.create(spec(local_image, "log-1"))
    second = driver.create(spec(local_image, "log-2"))
    for instance in (first, second):
        wait_for(lambda i=instance: serving(i.address), what=f"{instance.id} to serve")
        get_json(instance.address, "/hello-from-test")
    wait_for(
        lambda: "hello-from-test" in agent.instance_logs(second.id), what="the request log line"
    )
    run: Any = run_cli
    result = run("--home", str(settings.home), "logs", "web")
    assert result.exit_code == 0, result.stderr
    assert "log-1 | listening on" in result.stdout
    assert "log-2 | request" in result.stdout and "hello-from-test" in result.stdout
    result = run(
        "--home", str(settings.home), "logs", "web", "--instance", "log-2", "--json", "-n", "1"
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["environment"] == "web"
    assert [i["id"] for i in data["instances"]] == ["log-2"]
    assert len(data["instances"][0]["lines"]) == 1
    result = run("--home", str(settings.home), "logs", "web", "--instance", "nope")
    assert result.exit_code == 2
    assert "no instance 'nope'" in result.stderr
    # --follow prints what there is and ends once the instance has exited.
    os.kill(agent.instance(first.id).pid, signal.SIGTERM)
    wait_for(lambda: agent.instance(first.id).state == "exited", what="log-1 to exit")
    result = run("--home", str(settings.home), "logs", "web", "--instance", "log-1", "-f")
    assert result.exit_code == 0, result.stderr
    assert "listening on" in result.stdout
