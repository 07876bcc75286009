"""Docker-engine images: builds, saves and loads, and SDK errors that never leak."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from castiron.errors import CastironError, ImageError
from castiron.images.dockerbuild import (
    DockerEngine,
    build_dockerfile,
    docker_tag,
    load_archive,
    save_image,
)
from castiron.images.unpack import unpack_layers

BUSYBOX = Path("/bin/busybox")


@pytest.fixture
def busybox_context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(BUSYBOX, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sh"]\n'
    )
    return context


@pytest.fixture
def unique_tag(docker_engine: Any) -> Iterator[str]:
    """A tag no other test uses; the image is removed afterwards."""
    tag = f"castiron-test/build-{uuid.uuid4().hex[:12]}:latest"
    yield tag
    with contextlib.suppress(Exception):  # already gone, or never built
        docker_engine.images.remove(tag, force=True)


def read_archive(path: Path) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """``manifest.json`` of a docker-archive, and the bytes of every file in it."""
    with tarfile.open(path) as tar:
        files = {}
        for info in tar:
            member = tar.extractfile(info) if info.isfile() else None
            if member is not None:
                files[info.name] = member.read()
    return json.loads(files["manifest.json"]), files


# --- with a real engine -----------------------------------------------------------------------


@pytest.mark.docker
def test_build_dockerfile_saves_a_docker_archive(
    docker_engine: Any, busybox_context: Path, unique_tag: str, tmp_path: Path
) -> None:
    dest = tmp_path / "out" / "image.tar"
    saved = build_dockerfile(
        busybox_context, busybox_context / "Dockerfile", dest, tag_hint=unique_tag
    )

    assert saved.path == dest
    assert saved.size == dest.stat().st_size
    assert saved.image_id == docker_engine.images.get(unique_tag).id
    assert unique_tag in saved.tags
    assert sorted(p.name for p in dest.parent.iterdir()) == ["image.tar"]
    manifest, files = read_archive(dest)
    assert manifest[0]["RepoTags"] == [unique_tag]
    config = json.loads(files[manifest[0]["Config"]])
    assert config["config"]["Cmd"] == ["/bin/busybox", "sh"]
    root = tmp_path / "rootfs"
    unpack_layers([io.BytesIO(files[name]) for name in manifest[0]["Layers"]], root)
    assert (root / "bin" / "busybox").read_bytes() == BUSYBOX.read_bytes()


@pytest.mark.docker
def test_dockerfile_outside_the_context_is_used(
    busybox_context: Path, unique_tag: str, tmp_path: Path
) -> None:
    dockerfile = tmp_path / "elsewhere.Dockerfile"
    (busybox_context / "Dockerfile").rename(dockerfile)
    saved = build_dockerfile(busybox_context, dockerfile, tmp_path / "i.tar", tag_hint=unique_tag)
    assert saved.image_id.startswith("sha256:")


@pytest.mark.docker
def test_failed_build_is_an_image_error_with_the_reason(
    docker_engine: Any, busybox_context: Path, unique_tag: str, tmp_path: Path
) -> None:
    (busybox_context / "Dockerfile").write_text("FROM scratch\nCOPY missing-file /x\n")
    with pytest.raises(ImageError, match=r"docker build failed: .*missing-file"):
        build_dockerfile(
            busybox_context, busybox_context / "Dockerfile", tmp_path / "i.tar", tag_hint=unique_tag
        )
    assert not (tmp_path / "i.tar").exists()


@pytest.mark.docker
def test_bad_dockerfile_syntax_is_an_image_error(
    docker_engine: Any, busybox_context: Path, unique_tag: str, tmp_path: Path
) -> None:
    (busybox_context / "Dockerfile").write_text("FROM scratch\nNOT-AN-INSTRUCTION x\n")
    with pytest.raises(ImageError, match="docker build failed"):
        build_dockerfile(
            busybox_context, busybox_context / "Dockerfile", tmp_path / "i.tar", tag_hint=unique_tag
        )


@pytest.mark.docker
def test_save_and_load_round_trip(docker_engine: Any, busybox_image: str, tmp_path: Path) -> None:
    dest = tmp_path / "busybox.tar"
    saved = save_image(busybox_image, dest)
    expected = docker_engine.images.get(busybox_image).id
    assert saved.image_id == expected
    manifest, _ = read_archive(dest)
    assert manifest[0]["RepoTags"] == [busybox_image]

    by_id = save_image(expected, tmp_path / "by-id.tar")
    assert by_id.ref == expected

    assert load_archive(dest) == expected
    assert load_archive(tmp_path / "by-id.tar") == expected


@pytest.mark.docker
def test_save_of_a_missing_image_is_an_image_error(docker_engine: Any, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="docker:castiron-test/no-such-image:nope: no such image"):
        save_image("castiron-test/no-such-image:nope", tmp_path / "x.tar")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.docker
def test_load_of_a_non_archive_is_an_image_error(docker_engine: Any, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"not an archive" * 100)
    with pytest.raises(ImageError, match="did not load the archive"):
        load_archive(bogus)


# --- without an engine: nothing from the SDK leaks ----------------------------------------------


def _serve(sock: socket.socket, reply: bytes, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(65536)
                conn.sendall(reply)
            except OSError:
                pass


@pytest.fixture(params=["missing-socket", "refusing-socket", "garbage-server", "http-500"])
def dead_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DockerEngine]:
    """An engine address where no Docker engine answers properly."""
    path = tmp_path / "docker.sock"
    if request.param == "missing-socket":
        yield DockerEngine(base_url=f"unix://{path}", timeout=5)
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if request.param == "refusing-socket":
        try:
            yield DockerEngine(base_url=f"unix://{path}", timeout=5)
        finally:
            sock.close()
        return
    sock.listen(8)
    reply = (
        b"this is not HTTP\r\n\r\n"
        if request.param == "garbage-server"
        else b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(sock, reply, stop), daemon=True)
    thread.start()
    try:
        yield DockerEngine(base_url=f"unix://{path}", timeout=5)
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def _operations(tmp_path: Path, engine: DockerEngine) -> dict[str, Callable[[], object]]:
    context = tmp_path / "ctx"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text("FROM scratch\n")
    archive = tmp_path / "in.tar"
    archive.write_bytes(b"\0" * 1024)
    return {
        "build": lambda: build_dockerfile(
            context, context / "Dockerfile", tmp_path / "b.tar", tag_hint="x", engine=engine
        ),
        "save": lambda: save_image("busybox:latest", tmp_path / "s.tar", engine=engine),
        "load": lambda: load_archive(archive, engine=engine),
    }


@pytest.mark.parametrize("operation", ["build", "save", "load"])
def test_sdk_errors_never_leak(dead_engine: DockerEngine, tmp_path: Path, operation: str) -> None:
    run = _operations(tmp_path, dead_engine)[operation]
    with pytest.raises(CastironError) as caught:
        run()
    assert type(caught.value) is ImageError
    assert str(caught.value).startswith(f"no Docker engine at {dead_engine.base_url}: ")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "b.tar").exists()
    assert not (tmp_path / "s.tar").exists()


def test_missing_inputs_are_image_errors(tmp_path: Path) -> None:
    engine = DockerEngine(base_url=f"unix://{tmp_path}/none.sock")
    with pytest.raises(ImageError, match="not a directory"):
        build_dockerfile(tmp_path / "nope", tmp_path / "Dockerfile", tmp_path / "o", tag_hint="x")
    with pytest.raises(ImageError, match="no such Dockerfile"):
        build_dockerfile(tmp_path, tmp_path / "Dockerfile", tmp_path / "o", tag_hint="x")
    with pytest.raises(ImageError, match="cannot read the archive"):
        load_archive(tmp_path / "missing.tar", engine=engine)


@pytest.mark.parametrize(
    ("hint", "tag"),
    [
        ("hello", "hello:latest"),
        ("hello:1.2", "hello:1.2"),
        ("Hello World", "hello-world:latest"),
        ("castiron-build/app:abc123", "castiron-build/app:abc123"),
        ("team/App_1:v1+meta", "team/app_1:v1-meta"),
    ],
)
def test_docker_tag(hint: str, tag: str) -> None:
    assert docker_tag(hint) == tag


def test_docker_tag_refuses_nothing_usable() -> None:
    with pytest.raises(ImageError, match="cannot make a Docker image name"):
        docker_tag("...")
