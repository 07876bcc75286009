"""Images that come from a Docker engine: ``dockerfile:`` builds, ``docker:REF`` bases, loads.

This module owns every use of the Docker SDK in :mod:`castiron.images` (an import-linter
contract forbids it anywhere else here). It turns engine images into docker-archive files (the
format of ``docker save``) that the image store imports like any other archive, so every later
step is the same whatever the image's origin. Every SDK, HTTP and socket error is wrapped in an
:class:`~castiron.errors.ImageError` with a message that names the engine and the input.

Builds never pull and use host networking: the engine may have no default bridge.

It knows nothing of the OCI store, the spec or any runtime, and reads no environment variable:
the engine address is passed in (:class:`DockerEngine`).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.models.images import Image

from castiron.errors import ImageError

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
"""The engine address used when none is configured."""

_CHUNK = 1024 * 1024
_SDK_ERRORS = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_UNREACHABLE = (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError)
_NAME_RE = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class DockerEngine:
    """Where the Docker engine listens and how long to wait for one answer."""

    base_url: str = DEFAULT_DOCKER_HOST
    """The engine's API address (``unix:///…`` or ``tcp://HOST:PORT``)."""
    timeout: int = 600
    """Seconds to wait for one response (a long build step counts as one)."""


@dataclass(frozen=True)
class SavedImage:
    """A docker-archive file written from an engine image."""

    path: Path
    """The archive (``docker save`` format: ``manifest.json``, config, layer tars)."""
    image_id: str
    """The engine's image id (``sha256:`` of the image config)."""
    ref: str
    """What was saved: the tag given or built, or the image id."""
    size: int
    """Bytes written."""
    tags: tuple[str, ...] = field(default=())
    """The image's tags in the engine."""


def docker_tag(hint: str) -> str:
    """A valid Docker ``NAME:TAG`` made from ``hint`` (lower-cased, odd characters dashed).

    Raises:
        ImageError: when nothing usable is left of ``hint``.
    """
    text = hint.strip()
    name, tag = text.rsplit(":", 1) if ":" in text.rsplit("/", 1)[-1] else (text, "")
    name = re.sub(r"[^a-z0-9._/-]+", "-", name.lower())
    name = "/".join(p.strip("._-") for p in name.split("/") if p.strip("._-"))
    name = re.sub(r"[._-]{2,}", "-", name)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", tag).lstrip(".-") or "latest"
    if not _NAME_RE.match(name) or not _TAG_RE.match(tag[:128]):
        raise ImageError(f"cannot make a Docker image name from {hint!r}")
    return f"{name}:{tag[:128]}"


def build_dockerfile(
    context: Path,
    dockerfile: Path,
    dest: Path,
    *,
    tag_hint: str,
    engine: DockerEngine | None = None,
    build_args: Mapping[str, str] | None = None,
) -> SavedImage:
    """Build ``dockerfile`` with the Docker engine and save the image to ``dest``.

    The image is tagged ``docker_tag(tag_hint)`` in the engine (so it is not left dangling and
    later builds reuse its cache), built with ``network_mode="host"`` and ``pull=False``, and
    written to ``dest`` atomically as a docker-archive.

    Raises:
        ImageError: the context or Dockerfile is missing, the engine is unreachable, the build
            fails (the message carries the engine's reason), or ``dest`` cannot be written.
    """
    engine = engine or DockerEngine()
    if not context.is_dir():
        raise ImageError(f"{context}: the Docker build context is not a directory")
    if not dockerfile.is_file():
        raise ImageError(f"{dockerfile}: no such Dockerfile")
    tag = docker_tag(tag_hint)
    with _connect(engine) as client:
        try:
            image, _ = client.images.build(
                path=str(context),
                dockerfile=str(dockerfile.resolve()),
                tag=tag,
                network_mode="host",
                pull=False,
                rm=True,
                forcerm=True,
                buildargs=dict(build_args or {}),
            )
        except docker.errors.BuildError as exc:
            raise ImageError(
                f"{dockerfile}: docker build failed: {_one_line(exc.msg)}{_log_tail(exc.build_log)}"
            ) from exc
        except _SDK_ERRORS as exc:
            raise _wrap(engine, f"{dockerfile}: docker build failed", exc) from exc
        return _save(engine, image, tag, dest)


def save_image(ref: str, dest: Path, *, engine: DockerEngine | None = None) -> SavedImage:
    """Save the engine's image ``ref`` (a name, ``NAME:TAG``, or id) to ``dest``.

    Nothing is pulled: the image must already be in the engine.

    Raises:
        ImageError: the engine is unreachable, has no image ``ref``, or ``dest`` cannot be
            written.
    """
    engine = engine or DockerEngine()
    with _connect(engine) as client:
        try:
            image = client.images.get(ref)
        except docker.errors.ImageNotFound as exc:
            raise ImageError(
                f"docker:{ref}: no such image in the Docker engine at {engine.base_url} "
                "(castiron does not pull; pull or build it first)"
            ) from exc
        except _SDK_ERRORS as exc:
            raise _wrap(engine, f"docker:{ref}: cannot inspect the image", exc) from exc
        return _save(engine, image, ref, dest)


def load_archive(path: Path, *, engine: DockerEngine | None = None) -> str:
    """Load a docker-archive (or an OCI archive the engine understands) and return its id.

    The archive is streamed to the engine, never read into memory.

    Raises:
        ImageError: the file cannot be read, the engine is unreachable or refuses the archive.
    """
    engine = engine or DockerEngine()
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ImageError(f"{path}: cannot read the archive: {exc.strerror or exc}") from exc
    with handle, _connect(engine) as client:
        try:
            images = client.images.load(handle)
        except _SDK_ERRORS as exc:
            raise _wrap(engine, f"{path}: the Docker engine did not load the archive", exc) from exc
    if not images:
        raise ImageError(f"{path}: the Docker engine loaded no image from the archive")
    return str(images[0].id)


# --- helpers ---------------------------------------------------------------------------------


@contextmanager
def _connect(engine: DockerEngine) -> Iterator[docker.DockerClient]:
    _probe(engine)
    try:
        client = docker.DockerClient(
            base_url=engine.base_url, version="auto", timeout=engine.timeout
        )
    except _SDK_ERRORS as exc:
        raise ImageError(f"no Docker engine at {engine.base_url}: {_reason(exc)}") from exc
    try:
        yield client
    finally:
        client.close()


def _probe(engine: DockerEngine) -> None:
    """Fail fast, and without leaking the SDK's half-open socket, when nothing listens."""
    if not engine.base_url.startswith("unix://"):
        return
    path = engine.base_url.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(min(engine.timeout, 10))
        try:
            sock.connect(path)
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ImageError(f"no Docker engine at {engine.base_url}: {reason}") from None


def _save(engine: DockerEngine, image: Image, ref: str, dest: Path) -> SavedImage:
    tags = tuple(str(t) for t in image.tags)
    image_id = str(image.id)
    named: str | bool = ref if ref in tags else False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise ImageError(f"{dest}: cannot write the image archive: {exc.strerror or exc}") from exc
    tmp = Path(tmp_name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in image.save(chunk_size=_CHUNK, named=named):
                    out.write(chunk)
                    size += len(chunk)
            except _SDK_ERRORS as exc:
                if isinstance(exc, OSError) and not isinstance(exc, _UNREACHABLE):
                    raise ImageError(
                        f"{dest}: cannot write the image archive: {exc.strerror or exc}"
                    ) from exc
                raise _wrap(engine, f"docker:{ref}: cannot save the image", exc) from exc
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return SavedImage(path=dest, image_id=image_id, ref=ref, size=size, tags=tags)


def _wrap(engine: DockerEngine, what: str, exc: BaseException) -> ImageError:
    if isinstance(exc, _UNREACHABLE):
        return ImageError(f"no Docker engine at {engine.base_url}: {_reason(exc)}")
    return ImageError(f"{what}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return _one_line(str(exc.explanation))
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _log_tail(log: Iterable[Any], lines: int = 5) -> str:
    """The last build output lines, as `` (last output: …)``; empty when there are none."""
    tail: list[str] = []
    try:
        for item in log:
            text = item.get("stream") if isinstance(item, dict) else None
            if isinstance(text, str) and text.strip():
                tail = [*tail[-(lines - 1) :], _one_line(text)]
    except _SDK_ERRORS:
        pass
    return f" (last output: {' | '.join(tail)})" if tail else ""


__all__ = [
    "DEFAULT_DOCKER_HOST",
    "DockerEngine",
    "SavedImage",
    "build_dockerfile",
    "docker_tag",
    "load_archive",
    "save_image",
]
