"""The Docker driver: argument builders (pure), and the real thing against the local dockerd.

The test image is baked with castiron's own image library from ``/bin/busybox``
(busybox-static) into a temporary store and streamed into the engine as a docker-archive, as
the engine does. Every container runs on the host network (the test engine has no bridge) and
carries ``castiron.app=dkr`` or the ``castiron-test`` label; a fixture removes them all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from castiron.drivers.base import LogSource
from castiron.drivers.docker import (
    ContainerOptions,
    DockerDriver,
    DockerEndpoint,
    container_args,
    container_name,
    network_args,
    parse_memory,
)
from castiron.errors import (
    CastironError,
    DigestMismatchError,
    NotFoundError,
    RuntimeDriverError,
)
from castiron.images.archive import export_archive
from castiron.images.build import BakeOptions, bake
from castiron.images.store import ImageStore
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, ReleaseId
from castiron.spec.schema import ImageSection
from testkit import wait_for

BUSYBOX = "/bin/busybox"
HTTPD: tuple[str, ...] = (
    BUSYBOX,
    "sh",
    "-c",
    f"exec {BUSYBOX} httpd -f -p $HOST:$PORT -h /www",
)
"""Serves the image's /www on $HOST:$PORT (busybox httpd)."""

APP = "dkr"
TEST_LABEL = "castiron-test"
DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


# --- kit (also used by the conformance suite's docker case) ----------------------------------


def docker_problem() -> str | None:
    """Why the local Docker engine cannot be used (None when it can)."""
    if not Path(BUSYBOX).is_file():
        return f"{BUSYBOX} is missing: install busybox-static"
    if DOCKER_HOST.startswith("unix://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(DOCKER_HOST.removeprefix("unix://"))
            except OSError as exc:
                return f"no Docker engine at {DOCKER_HOST}: {exc}"
    return None


def bake_busybox(root: Path) -> ImageRef:
    """Bake the busybox image (``/bin/busybox``, ``/www/index.html``) into a store in ``root``."""
    context = root / "busybox-context"
    (context / "bin").mkdir(parents=True)
    (context / "www").mkdir()
    shutil.copy(BUSYBOX, context / "bin" / "busybox")
    (context / "bin" / "busybox").chmod(0o755)
    (context / "www" / "index.html").write_text("castiron busybox\n")
    section = ImageSection.model_validate(
        {"base": "scratch", "workdir": "/", "entrypoint": list(HTTPD)}
    )
    store = ImageStore(root / "images")
    result = bake(
        section,
        store,
        BakeOptions(context=context, base_dir=root, source_date_epoch=1_700_000_000),
    )
    return ImageRef(result.digest, result.config_digest, store.root)


def docker_exporter(root: Path, calls: list[Digest] | None = None) -> Callable[[ImageRef], Path]:
    """The exporter the engine hands the driver: a docker-archive written from the store."""

    def export(image: ImageRef) -> Path:
        if calls is not None:
            calls.append(image.digest)
        dest = root / "archives" / f"{image.digest.removeprefix('sha256:')}.tar"
        return export_archive(ImageStore(image.store), image.digest, "docker-archive", dest).path

    return export


def make_driver(root: Path, **options: Any) -> DockerDriver:
    """A Docker driver on the local engine exporting from stores under ``root``."""
    return DockerDriver(
        export=docker_exporter(root), endpoint=DockerEndpoint(DOCKER_HOST), **options
    )


def get(address: str, path: str = "/", timeout: float = 5.0) -> str:
    """GET ``path`` from ``address``; the body as text."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
        return str(response.read().decode())


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox(tmp_path_factory: pytest.TempPathFactory) -> ImageRef:
    return bake_busybox(tmp_path_factory.mktemp("docker-image"))


@pytest.fixture(scope="module")
def engine(docker_engine: Any, busybox: ImageRef) -> Iterator[Any]:
    """The SDK client; on teardown removes what these tests created, images included."""
    yield docker_engine
    _remove_test_containers(docker_engine)
    with contextlib.suppress(Exception):
        docker_engine.images.remove(busybox.config_digest, force=True)


@pytest.fixture
def clean(engine: Any) -> Iterator[Any]:
    yield engine
    _remove_test_containers(engine)


@pytest.fixture
def driver(tmp_path: Path, clean: Any) -> DockerDriver:
    return make_driver(tmp_path)


@pytest.fixture
def loaded(driver: DockerDriver, busybox: ImageRef) -> ImageRef:
    driver.ensure_image(busybox)
    return busybox


def _remove_test_containers(client: Any) -> None:
    for label in (f"castiron.app={APP}", TEST_LABEL):
        for container in client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)


def spec_for(
    image: ImageRef,
    instance_id: str,
    environment: str = "test",
    command: tuple[str, ...] = HTTPD,
    **fields: Any,
) -> InstanceSpec:
    values: dict[str, Any] = {
        "id": instance_id,
        "app": APP,
        "environment": environment,
        "release": ReleaseId("r-1"),
        "image": image,
        "command": command,
        "env": {"GREETING": "hi"},
        "workdir": "/",
        "port": 0,
    }
    values.update(fields)
    return InstanceSpec(**values)


# --- pure builders ---------------------------------------------------------------------------

IMAGE = ImageRef(Digest("sha256:" + "a" * 64), Digest("sha256:" + "b" * 64), Path("/store"))


def test_container_args_on_the_host_network() -> None:
    spec = spec_for(
        IMAGE,
        "i-1",
        command=("/app/server", "--fast"),
        env={"GREETING": "hi", "DB_PASSWORD": "s3cret", "PORT": "1"},
        user="1000:1000",
        secret_names=frozenset({"DB_PASSWORD"}),
        writable=("/data/",),
        memory="256m",
        cpus=0.5,
        labels={"team": "web", "castiron.app": "ignored"},
    )
    args = container_args(spec, ContainerOptions(), "sha256:" + "b" * 64, 41000)
    assert args == {
        "image": "sha256:" + "b" * 64,
        "name": "dkr.test.i-1",
        "environment": [
            "CASTIRON_APP=dkr",
            "CASTIRON_ENVIRONMENT=test",
            "DB_PASSWORD=s3cret",
            "GREETING=hi",
            "HOST=127.0.0.1",
            "PORT=41000",
        ],
        "labels": {
            "team": "web",
            "castiron.app": "dkr",
            "castiron.env": "test",
            "castiron.environment": "test",
            "castiron.release": "r-1",
            "castiron.instance": "i-1",
            "castiron.image": IMAGE.digest,
            "castiron.config": IMAGE.config_digest,
            "castiron.port": "41000",
            "castiron.host": "127.0.0.1",
            "castiron.secrets": "DB_PASSWORD",
        },
        "working_dir": "/",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=64m", "/data": "rw,nosuid,nodev"},
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "restart_policy": {"Name": "no"},
        "stop_signal": "SIGTERM",
        "init": True,
        "detach": True,
        "entrypoint": ["/app/server", "--fast"],
        "user": "1000:1000",
        "mem_limit": 256 << 20,
        "memswap_limit": 256 << 20,
        "nano_cpus": 500_000_000,
        "network_mode": "host",
    }


def test_container_args_on_a_bridge_network_publish_on_loopback_only() -> None:
    options = ContainerOptions(cap_add=("NET_BIND_SERVICE",), init=False)
    spec = spec_for(IMAGE, "i-2", command=(), network="castiron-web")
    args = container_args(spec, options, "sha256:x", 8000)
    assert args["network"] == "castiron-web"
    assert "network_mode" not in args
    assert args["ports"] == {"8000/tcp": ("127.0.0.1",)}
    assert "HOST=0.0.0.0" in args["environment"]
    assert "PORT=8000" in args["environment"]
    assert args["labels"]["castiron.host"] == "127.0.0.1"
    assert args["cap_drop"] == ["ALL"]
    assert args["cap_add"] == ["NET_BIND_SERVICE"]
    assert args["init"] is False
    assert "entrypoint" not in args  # no command: the image's own entrypoint and cmd run


def test_network_args_label_the_network() -> None:
    assert network_args("castiron-web") == {
        "name": "castiron-web",
        "driver": "bridge",
        "labels": {"com.castiron": "true"},
    }


@pytest.mark.parametrize(
    ("fields", "options", "message"),
    [
        ({"memory": "lots"}, ContainerOptions(), "test/i-9: memory: not a memory size: 'lots'"),
        ({"cpus": 0.0}, ContainerOptions(), "test/i-9: cpus must be more than 0"),
        ({"writable": ("data",)}, ContainerOptions(), "test/i-9: writable path 'data'"),
        ({"network": "none"}, ContainerOptions(), "test/i-9: network 'none' cannot serve"),
    ],
)
def test_container_args_refuse_bad_values(
    fields: dict[str, Any], options: ContainerOptions, message: str
) -> None:
    with pytest.raises(RuntimeDriverError) as caught:
        container_args(spec_for(IMAGE, "i-9", **fields), options, "sha256:x", 1)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("256m", 256 << 20), ("1g", 1 << 30), ("512Mi", 512 << 20), ("1GiB", 1 << 30),
     ("100000", 100000), ("0.5g", 512 << 20), ("64 MB", 64 << 20)],
)  # fmt: skip
def test_parse_memory(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "m", "-1m", "0", "12q", "1.2.3g"])
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory(text)


def test_container_names_keep_app_environment_and_id_apart() -> None:
    assert container_name("a-b", "c", "1") != container_name("a", "b-c", "1")
    assert container_name("web", "prod", "i/1 x") == "web.prod.i-1-x"


# --- against the real engine -----------------------------------------------------------------


@pytest.mark.docker
def test_ensure_image_loads_once_by_id_and_never_by_tag(
    tmp_path: Path, clean: Any, busybox: ImageRef
) -> None:
    with contextlib.suppress(Exception):
        clean.images.remove(busybox.config_digest, force=True)
    calls: list[Digest] = []
    driver = DockerDriver(export=docker_exporter(tmp_path, calls), endpoint=DockerEndpoint())
    driver.ensure_image(busybox)
    assert clean.images.get(busybox.config_digest).id == busybox.config_digest
    driver.ensure_image(busybox)
    assert calls == [busybox.digest]


@pytest.mark.docker
def test_ensure_image_streams_an_open_archive(
    tmp_path: Path, clean: Any, busybox: ImageRef
) -> None:
    with contextlib.suppress(Exception):
        clean.images.remove(busybox.config_digest, force=True)
    path = docker_exporter(tmp_path)(busybox)
    opened: list[BinaryIO] = []

    def stream(image: ImageRef) -> BinaryIO:
        opened.append(path.open("rb"))
        return opened[-1]

    DockerDriver(export=stream).ensure_image(busybox)
    assert clean.images.get(busybox.config_digest).id == busybox.config_digest
    assert [f.closed for f in opened] == [True]


@pytest.mark.docker
def test_ensure_image_refuses_an_archive_of_another_image(
    tmp_path: Path, clean: Any, busybox: ImageRef
) -> None:
    wrong = ImageRef(busybox.digest, Digest("sha256:" + "0" * 64), busybox.store)
    driver = make_driver(tmp_path)
    with pytest.raises(DigestMismatchError) as caught:
        driver.ensure_image(wrong)
    assert "sha256:" + "0" * 64 in str(caught.value)
    assert f"image {busybox.digest}" in str(caught.value)


@pytest.mark.docker
def test_ensure_image_refuses_a_damaged_archive(tmp_path: Path, clean: Any) -> None:
    bogus = ImageRef(Digest("sha256:" + "1" * 64), Digest("sha256:" + "2" * 64), tmp_path)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(b"not a tar archive at all" * 100)
    driver = DockerDriver(export=lambda image: archive)
    with pytest.raises(RuntimeDriverError, match=f"image {bogus.digest}: the Docker engine"):
        driver.ensure_image(bogus)


PROBE = (
    BUSYBOX,
    "sh",
    "-c",
    f"B={BUSYBOX}; $B mkdir -p /tmp/www; "
    "($B touch /rootfile 2>/dev/null && echo writable || echo read-only) > /tmp/www/root; "
    "($B touch /data/x && echo writable || echo read-only) > /tmp/www/data; "
    "$B id -u > /tmp/www/uid; "
    "$B grep -E '^(CapEff|NoNewPrivs)' /proc/self/status > /tmp/www/status; "
    'echo "$GREETING $DB_PASSWORD" > /tmp/www/env; '
    "exec $B httpd -f -p $HOST:$PORT -h /tmp/www",
)


@pytest.mark.docker
def test_containers_run_hardened_and_report_their_config(
    driver: DockerDriver, loaded: ImageRef
) -> None:
    spec = spec_for(
        loaded,
        "i-hard",
        command=PROBE,
        env={"GREETING": "hi", "DB_PASSWORD": "s3cret"},
        secret_names=frozenset({"DB_PASSWORD"}),
        user="65534:65534",
        writable=("/data",),
        memory="64m",
        cpus=0.5,
    )
    instance = driver.create(spec)
    assert instance.runtime == "docker"
    assert instance.address.startswith("127.0.0.1:")
    wait_for(lambda: get(instance.address, "/env"))
    assert get(instance.address, "/root").strip() == "read-only"
    assert get(instance.address, "/data").strip() == "writable"
    assert get(instance.address, "/uid").strip() == "65534"
    status = get(instance.address, "/status")
    assert "CapEff:\t0000000000000000" in status
    assert "NoNewPrivs:\t1" in status
    assert get(instance.address, "/env").strip() == "hi s3cret"

    observed = driver.inspect(instance)
    assert observed.state == "running"
    assert observed.image == loaded.digest
    assert not observed.stray
    config = observed.config
    env = config["env"]
    assert isinstance(env, dict)
    assert env["GREETING"] == "hi"
    assert env["PORT"] == instance.address.rpartition(":")[2]
    assert "DB_PASSWORD" not in env
    assert config["secrets"] == ["DB_PASSWORD"]
    assert "s3cret" not in repr(observed)
    assert config["command"] == list(PROBE)
    assert config["user"] == "65534:65534"
    assert config["read_only"] is True
    assert config["cap_drop"] == ["ALL"]
    assert config["security_opt"] == ["no-new-privileges"]
    assert config["restart_policy"] == "no"
    assert config["memory"] == 64 << 20
    assert config["nano_cpus"] == 500_000_000
    assert config["network"] == "host"
    assert config["image_id"] == loaded.config_digest
    tmpfs = config["tmpfs"]
    assert isinstance(tmpfs, dict)
    assert set(tmpfs) == {"/tmp", "/data"}
    labels = config["labels"]
    assert isinstance(labels, dict)
    assert labels["castiron.instance"] == "i-hard"
    assert labels["castiron.env"] == "test"


@pytest.mark.docker
def test_create_refuses_an_image_that_is_not_loaded(driver: DockerDriver) -> None:
    missing = ImageRef(Digest("sha256:" + "3" * 64), Digest("sha256:" + "4" * 64), Path("/x"))
    with pytest.raises(RuntimeDriverError, match=r"^test/i-none: image sha256:3+ is not loaded"):
        driver.create(spec_for(missing, "i-none"))


@pytest.mark.docker
def test_create_refuses_a_taken_port(driver: DockerDriver, loaded: ImageRef) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeDriverError, match=rf"^test/i-port: port 127.0.0.1:{port} is"):
            driver.create(spec_for(loaded, "i-port", port=port))
    assert driver.observe(APP, "test") == []


@pytest.mark.docker
def test_create_reports_a_container_that_exits_at_start(
    tmp_path: Path, clean: Any, loaded: ImageRef
) -> None:
    driver = make_driver(tmp_path, start_window=10.0)
    crash = (BUSYBOX, "sh", "-c", "echo cannot open config >&2; exit 3")
    with pytest.raises(RuntimeDriverError) as caught:
        driver.create(spec_for(loaded, "i-crash", command=crash))
    message = str(caught.value)
    assert message.startswith("test/i-crash: the container exited at start with status 3")
    assert "cannot open config" in message
    assert driver.observe(APP, "test") == []


@pytest.mark.docker
def test_create_reports_an_out_of_memory_kill(tmp_path: Path, clean: Any, loaded: ImageRef) -> None:
    driver = make_driver(tmp_path, start_window=30.0)
    hog = (
        BUSYBOX,
        "sh",
        "-c",
        f"x=$({BUSYBOX} head -c 268435456 /dev/zero | {BUSYBOX} tr '\\0' a)",
    )
    with pytest.raises(RuntimeDriverError) as caught:
        driver.create(spec_for(loaded, "i-oom", command=hog, memory="8m"))
    assert str(caught.value).startswith("test/i-oom: the container exited at start")
    assert "killed: out of memory, limit 8m" in str(caught.value)


@pytest.mark.docker
def test_observe_reports_strays_and_hand_started_containers(
    driver: DockerDriver, loaded: ImageRef, clean: Any
) -> None:
    known = driver.create(spec_for(loaded, "i-known"))
    unknown = driver.create(spec_for(loaded, "i-unknown"))
    sleep = [BUSYBOX, "sleep", "60"]
    partial = clean.containers.run(
        loaded.config_digest,
        sleep,
        labels={"castiron.app": APP, "castiron.env": "test", TEST_LABEL: "1"},
        network_mode="host",
        detach=True,
    )
    by_hand = clean.containers.run(
        loaded.config_digest, sleep, labels={TEST_LABEL: "1"}, network_mode="host", detach=True
    )
    other_env = driver.create(spec_for(loaded, "i-other", environment="other"))

    observed = {o.instance.handle: o for o in driver.observe(APP, "test")}
    assert set(observed) == {known.handle, unknown.handle, partial.id}
    assert not observed[known.handle].stray
    assert observed[partial.id].stray

    strays = driver.strays(APP, "test", known_ids={"i-known"}, release_images=[loaded])
    assert {o.instance.handle for o in strays} == {unknown.handle, partial.id, by_hand.id}
    assert all(o.stray for o in strays)
    hand = next(o for o in strays if o.instance.handle == by_hand.id)
    assert hand.instance.app == APP
    assert hand.instance.environment == "test"
    assert hand.image == loaded.digest
    assert other_env.handle not in {o.instance.handle for o in strays}


@pytest.mark.docker
def test_destroy_stops_with_sigterm_and_removes(
    driver: DockerDriver, loaded: ImageRef, clean: Any
) -> None:
    instance = driver.create(spec_for(loaded, "i-term"))
    wait_for(lambda: get(instance.address))
    driver.destroy(instance, grace=30.0)  # httpd ends on SIGTERM, long before the grace
    assert driver.inspect(instance).state == "missing"
    with pytest.raises(Exception, match="404"):
        clean.containers.get(instance.handle)


@pytest.mark.docker
def test_down_removes_one_environment(driver: DockerDriver, loaded: ImageRef) -> None:
    driver.create(spec_for(loaded, "i-a1", environment="down"))
    driver.create(spec_for(loaded, "i-a2", environment="down"))
    kept = driver.create(spec_for(loaded, "i-b1", environment="kept"))
    assert driver.down(APP, "down", grace=5.0) == ["dkr.down.i-a1", "dkr.down.i-a2"]
    assert driver.observe(APP, "down") == []
    assert [o.instance.id for o in driver.observe(APP, "kept")] == [kept.id]
    assert driver.down(APP, "down") == []


@pytest.mark.docker
def test_exited_instances_are_observed_with_their_exit_code(
    tmp_path: Path, loaded: ImageRef, clean: Any
) -> None:
    driver = make_driver(tmp_path, start_window=0.0)
    instance = driver.create(
        spec_for(loaded, "i-exit", command=(BUSYBOX, "sh", "-c", "sleep 0.3; exit 4"))
    )
    wait_for(lambda: driver.inspect(instance).state == "exited")
    observed = driver.inspect(instance)
    assert observed.exit_code == 4
    assert observed.config["status"] == "exited"
    assert observed.config["oom_killed"] is False
    assert [o.exit_code for o in driver.observe(APP, "test")] == [4]
    driver.destroy(instance, grace=1.0)


@pytest.mark.docker
def test_logs_read_and_follow_a_containers_output(
    tmp_path: Path, loaded: ImageRef, clean: Any
) -> None:
    driver = make_driver(tmp_path, start_window=0.0)
    talk = (
        BUSYBOX,
        "sh",
        "-c",
        "echo out 1; echo out 2; echo out 3; sleep 0.3; echo oops >&2; sleep 1",
    )
    instance = driver.create(spec_for(loaded, "i-talk", command=talk))
    assert isinstance(driver, LogSource)
    wait_for(lambda: "oops" in driver.logs(instance, 100))
    assert driver.logs(instance, 100).splitlines() == ["out 1", "out 2", "out 3", "oops"]
    assert driver.logs(instance, 2).splitlines() == ["out 3", "oops"]
    assert driver.logs(instance, 0) == ""
    followed = b"".join(driver.follow_logs(instance, 1))  # ends when the container stops
    assert followed.decode().splitlines() == ["oops"]
    driver.destroy(instance, grace=1.0)
    with pytest.raises(NotFoundError, match="test/i-talk: the container is gone"):
        driver.logs(instance, 10)
    with pytest.raises(NotFoundError, match="test/i-talk: the container is gone"):
        list(driver.follow_logs(instance, 10))


# --- no SDK exception ever escapes -----------------------------------------------------------


def _every_method(driver: DockerDriver, image: ImageRef) -> dict[str, Callable[[], object]]:
    instance = Instance(
        id="i-x",
        app=APP,
        environment="test",
        release=ReleaseId("r-1"),
        runtime="docker",
        address="127.0.0.1:1",
        handle="0123456789ab",
        image=image.digest,
    )
    return {
        "ensure_image": lambda: driver.ensure_image(image),
        "create": lambda: driver.create(spec_for(image, "i-x")),
        "destroy": lambda: driver.destroy(instance, grace=1.0),
        "observe": lambda: driver.observe(APP, "test"),
        "strays": lambda: driver.strays(APP, "test", set(), [image]),
        "inspect": lambda: driver.inspect(instance),
        "down": lambda: driver.down(APP, "test"),
        "logs": lambda: driver.logs(instance, 10),
        "follow_logs": lambda: list(driver.follow_logs(instance, 10)),
    }


METHODS = (
    "ensure_image",
    "create",
    "destroy",
    "observe",
    "strays",
    "inspect",
    "down",
    "logs",
    "follow_logs",
)


@pytest.fixture
def dead_socket(tmp_path: Path) -> Iterator[str]:
    """A Unix socket path that exists but where nobody listens (a stopped dockerd)."""
    path = tmp_path / "docker.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    yield f"unix://{path}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["dead-unix-socket", "missing-unix-socket", "refused-tcp"])
def test_no_sdk_error_escapes_a_dead_engine(
    method: str, where: str, dead_socket: str, tmp_path: Path
) -> None:
    url = {
        "dead-unix-socket": dead_socket,
        "missing-unix-socket": f"unix://{tmp_path}/nothing.sock",
        "refused-tcp": "tcp://127.0.0.1:1",
    }[where]
    driver = DockerDriver(export=docker_exporter(tmp_path), endpoint=DockerEndpoint(url, 5.0))
    with pytest.raises(CastironError) as caught:
        _every_method(driver, IMAGE)[method]()
    assert isinstance(caught.value, RuntimeDriverError)
    assert f"no Docker engine at {url}: " in str(caught.value)
    reason = str(caught.value).rpartition(": ")[2]
    assert reason in {"Connection refused", "No such file or directory"}


@pytest.mark.docker
@pytest.mark.parametrize("method", METHODS)
def test_no_sdk_error_escapes_a_container_that_exits_at_start(
    method: str, tmp_path: Path, clean: Any, loaded: ImageRef
) -> None:
    driver = make_driver(tmp_path, start_window=0.0)
    crash = (BUSYBOX, "sh", "-c", "sleep 0.2; exit 1")
    instance = driver.create(spec_for(loaded, "i-x", command=crash))
    wait_for(lambda: driver.inspect(instance).state == "exited")
    calls = _every_method(driver, loaded)
    calls["destroy"] = lambda: driver.destroy(instance, grace=1.0)
    calls["inspect"] = lambda: driver.inspect(instance)
    with contextlib.suppress(CastironError):  # the only kind allowed out (create: id taken)
        calls[method]()
