"""The Docker runtime: instances are containers on a Docker engine, driven through the docker SDK.

Owns how an :class:`~castiron.model.InstanceSpec` becomes a container and how containers are
read back for status, strays and drift:

* images come only from castiron's store: :meth:`DockerDriver.ensure_image` streams a
  docker-archive (written by the injected :data:`Exporter`) into the engine and then checks
  that the engine holds an image whose ID is the release's config digest. Nothing is ever
  pulled and no tag is ever trusted: containers are created from the image ID;
* containers are hardened by default (:func:`container_args`, a pure function that returns the
  create arguments as data): read-only root filesystem, a private tmpfs ``/tmp``,
  ``no-new-privileges``, every capability dropped, restart policy ``no``, memory (without swap)
  and CPU limits, an init process that forwards signals, and castiron's labels;
* networking as the instance spec says (``InstanceSpec.network``, set by the engine from the
  release): ``host`` (castiron assigns ``$PORT``, the address is ``HOST:PORT``) or a user
  bridge network, created when missing with the ``com.castiron`` label, with the port
  published on ``127.0.0.1`` only (an ephemeral host port; the address is
  ``127.0.0.1:<published>``). Existing containers are read back from the engine itself
  (their network mode and published ports), so destroying or observing one needs no network.

This is the only castiron module that imports the docker SDK (an import-linter contract
enforces it). Every SDK, HTTP and socket error is wrapped in a
:class:`~castiron.errors.RuntimeDriverError` (or :class:`~castiron.errors.DigestMismatchError`)
that names the environment and the instance; none escapes. It must not know the spec, the
images library, the state store, traffic or the engine, and decides no policy: it neither
retries nor replaces nor judges health.
"""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.models.containers import Container

from castiron.errors import (
    CastironError,
    DigestMismatchError,
    NotFoundError,
    RuntimeDriverError,
)
from castiron.model import (
    Digest,
    ImageRef,
    Instance,
    InstanceSpec,
    InstanceState,
    Observed,
    ReleaseId,
    parse_memory,
)
from castiron.ports import free_port

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
"""The engine address used when none is configured."""

DEFAULT_NETWORK = "host"
"""The network of an instance whose spec names none."""

DEFAULT_CONTAINER_PORT = 8000
"""The port an app listens on inside its container on a bridge network when the spec sets none."""

LABEL_APP = "castiron.app"
LABEL_ENV = "castiron.env"
LABEL_ENVIRONMENT = "castiron.environment"
"""Same value as ``castiron.env``; the name the other runtimes use, for cross-runtime tooling."""
LABEL_RELEASE = "castiron.release"
LABEL_INSTANCE = "castiron.instance"
LABEL_IMAGE = "castiron.image"
"""The image's manifest digest (its castiron identity)."""
LABEL_CONFIG = "castiron.config"
"""The image's config digest (the Docker image ID the container was created from)."""
LABEL_PORT = "castiron.port"
LABEL_HOST = "castiron.host"
LABEL_SECRETS = "castiron.secrets"
"""Comma-separated names (never values) of the environment variables that hold secrets."""

LABELS = (LABEL_APP, LABEL_ENV, LABEL_RELEASE, LABEL_INSTANCE, LABEL_IMAGE)
"""Labels every container castiron created carries; one missing marks a stray."""

NETWORK_LABEL = "com.castiron"
"""Label on the bridge networks castiron created."""

Exporter = Callable[[ImageRef], "BinaryIO | Path"]
"""Writes (or streams) a docker-archive of an image from castiron's store.

Provided by the engine (drivers never import the images library). A returned :class:`Path` is
read and left in place; a returned stream is read to its end and closed.
"""

_SDK_ERRORS: tuple[type[BaseException], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
)
_UNREACHABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    ConnectionError,
    FileNotFoundError,
)
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")
_LOADED_RE = re.compile(r"Loaded image(?: ID)?: (\S+)")
_LOG_LINES = 5
_POLL = 0.05


@dataclass(frozen=True)
class DockerEndpoint:
    """Where the Docker engine listens and how long to wait for one answer."""

    base_url: str = DEFAULT_DOCKER_HOST
    """The engine's API address (``unix:///…`` or ``tcp://HOST:PORT``)."""
    timeout: float = 60.0
    """Seconds to wait for one response (an image load counts as one)."""
    version: str = "auto"
    """The engine API version to speak; ``auto`` asks the engine."""


@dataclass(frozen=True)
class ContainerOptions:
    """How the containers of one environment run, beyond what the instance spec says: the
    documented extension points of the hardened defaults (the network is the spec's)."""

    cap_add: tuple[str, ...] = ()
    """Capabilities given back after ``cap_drop=ALL`` (e.g. ``NET_BIND_SERVICE``)."""
    tmp_size: str = "64m"
    """Size of the private tmpfs on ``/tmp``."""
    init: bool = True
    """Run Docker's init as PID 1 so SIGTERM reaches the app and zombies are reaped."""


# --- pure argument builders ------------------------------------------------------------------


def container_name(app: str, environment: str, instance_id: str) -> str:
    """The container's name: ``APP.ENV.ID`` (app and environment names never hold dots).

    Docker refuses a second container of the same name, so an instance id is never reused.
    """
    return _NAME_BAD.sub("-", f"{app}.{environment}.{instance_id}").lstrip("_.-") or "castiron"


def network_of(spec: InstanceSpec) -> str:
    """The network ``spec``'s container joins: its own, else :data:`DEFAULT_NETWORK`."""
    return spec.network or DEFAULT_NETWORK


def network_args(name: str) -> dict[str, Any]:
    """Arguments of ``client.networks.create`` for castiron's bridge network ``name``."""
    return {"name": name, "driver": "bridge", "labels": {NETWORK_LABEL: "true"}}


def container_args(
    spec: InstanceSpec,
    options: ContainerOptions,
    image_id: str,
    port: int,
) -> dict[str, Any]:
    """Arguments of ``client.containers.create`` for ``spec`` (pure: returns data, runs nothing).

    ``port`` is the port the app listens on: on the host network the port castiron assigned,
    on a bridge network (``spec.network``) the container port, published on ``127.0.0.1`` at
    an ephemeral port.
    ``spec.command``, when given, replaces the image's entrypoint and command entirely.

    Raises:
        RuntimeDriverError: for a bad memory size, CPU count or writable path (naming the
            environment and instance).
    """
    where = f"{spec.environment}/{spec.id}"
    network = network_of(spec)
    host_mode = network == "host"
    if network == "none":
        raise RuntimeDriverError(
            f"{where}: network 'none' cannot serve traffic; use host or a name"
        )
    listen = spec.host if host_mode else "0.0.0.0"
    env = {**spec.env}
    env.update(
        PORT=str(port),
        HOST=listen,
        CASTIRON_APP=spec.app,
        CASTIRON_ENVIRONMENT=spec.environment,
    )
    labels = {
        **spec.labels,
        LABEL_APP: spec.app,
        LABEL_ENV: spec.environment,
        LABEL_ENVIRONMENT: spec.environment,
        LABEL_RELEASE: spec.release,
        LABEL_INSTANCE: spec.id,
        LABEL_IMAGE: spec.image.digest,
        LABEL_CONFIG: spec.image.config_digest,
        LABEL_PORT: str(port),
        LABEL_HOST: spec.host if host_mode else "127.0.0.1",
        LABEL_SECRETS: ",".join(sorted(spec.secret_names)),
    }
    tmpfs = {"/tmp": f"rw,nosuid,nodev,size={options.tmp_size}"}
    for path in spec.writable:
        if not path.startswith("/") or path == "/":
            raise RuntimeDriverError(
                f"{where}: writable path {path!r} must be an absolute path below '/'"
            )
        tmpfs.setdefault(path.rstrip("/"), "rw,nosuid,nodev")
    args: dict[str, Any] = {
        "image": image_id,
        "name": container_name(spec.app, spec.environment, spec.id),
        "environment": [f"{k}={v}" for k, v in sorted(env.items())],
        "labels": labels,
        "working_dir": spec.workdir,
        "read_only": True,
        "tmpfs": tmpfs,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
        "restart_policy": {"Name": "no"},
        "stop_signal": "SIGTERM",
        "init": options.init,
        "detach": True,
    }
    if options.cap_add:
        args["cap_add"] = list(options.cap_add)
    if spec.command:
        args["entrypoint"] = list(spec.command)
    if spec.user:
        args["user"] = spec.user
    if spec.memory is not None:
        try:
            memory = parse_memory(spec.memory)
        except ValueError as exc:
            raise RuntimeDriverError(f"{where}: memory: {exc}") from None
        args["mem_limit"] = memory
        args["memswap_limit"] = memory
    if spec.cpus is not None:
        if not math.isfinite(spec.cpus) or spec.cpus <= 0:
            raise RuntimeDriverError(f"{where}: cpus must be more than 0, not {spec.cpus}")
        args["nano_cpus"] = round(spec.cpus * 1e9)
    if host_mode:
        args["network_mode"] = "host"
    else:
        args["network"] = network
        args["ports"] = {f"{port}/tcp": ("127.0.0.1",)}
    return args


# --- the driver ------------------------------------------------------------------------------


@dataclass
class DockerDriver:
    """Instances as containers on one Docker engine."""

    export: Exporter
    """Writes a docker-archive of an image from castiron's store (see :data:`Exporter`)."""
    endpoint: DockerEndpoint = field(default_factory=DockerEndpoint)
    options: Mapping[str, ContainerOptions] = field(default_factory=dict)
    """Per-environment options; environments not named use ``default_options``."""
    default_options: ContainerOptions = field(default_factory=ContainerOptions)
    start_window: float = 0.2
    """Seconds ``create`` watches a new container: one that exits in that time is reported
    (exit status, out-of-memory kill, last output) and removed."""
    name: str = "docker"

    def options_for(self, environment: str) -> ContainerOptions:
        """The container options of ``environment``."""
        return self.options.get(environment, self.default_options)

    # -- images

    def ensure_image(self, image: ImageRef) -> None:
        """Load ``image`` into the engine from castiron's store, unless it holds it already.

        Raises:
            RuntimeDriverError: when the engine is unreachable, the archive cannot be read or
                the engine refuses it.
            DigestMismatchError: when what the engine loaded is not ``image``.
            ImageError: as the exporter raises it.
        """
        where = f"image {image.digest}"
        with self._client(where) as client:
            if _image_id(client, image) is not None:
                return
            source = self.export(image)
            loaded = self._load(client, source, where)
            if _image_id(client, image) is None:
                raise DigestMismatchError(
                    f"{where}: the Docker engine loaded {', '.join(loaded) or 'no image'}, "
                    f"not the config digest {image.config_digest}"
                )

    def name_image(self, image: ImageRef, repository: str) -> str:
        """Bind ``REPOSITORY:<config digest hex>`` to ``image`` in the engine (loading it
        first) and return that name: a name derived from the image's ID, for consumers that
        cannot refer to a loaded image by ID (the kubelet's dockershim resolves a digest
        reference only through a registry's repository digest).

        Raises:
            RuntimeDriverError, DigestMismatchError: as :meth:`ensure_image`.
        """
        self.ensure_image(image)
        tag = image.config_digest.removeprefix("sha256:")
        where = f"image {image.digest}"
        with self._client(where) as client:
            found = _image_id(client, image)
            if found is None:
                raise DigestMismatchError(f"{where}: not in the engine after loading it")
            client.api.tag(found, repository, tag)
        return f"{repository}:{tag}"

    def _load(self, client: docker.DockerClient, source: BinaryIO | Path, where: str) -> list[str]:
        if isinstance(source, Path):
            try:
                stream: BinaryIO = source.open("rb")
            except OSError as exc:
                raise RuntimeDriverError(
                    f"{where}: cannot read the archive {source}: {exc.strerror or exc}"
                ) from exc
        else:
            stream = source
        loaded: list[str] = []
        error: str | None = None
        api: Any = client.api  # the SDK's low-level calls are untyped
        with stream:
            for chunk in api.load_image(stream):
                if not isinstance(chunk, dict):
                    continue
                detail = chunk.get("errorDetail") or {}
                if chunk.get("error") or detail:
                    error = _one_line(detail.get("message") or chunk.get("error"))
                text = chunk.get("stream")
                if isinstance(text, str):
                    loaded += _LOADED_RE.findall(text)
        if error is not None:
            raise RuntimeDriverError(f"{where}: the Docker engine refused the archive: {error}")
        return loaded

    # -- instances

    def create(self, spec: InstanceSpec) -> Instance:
        """Create and start a NEW container for ``spec``; returns it with its address.

        Raises:
            RuntimeDriverError: when the image is not loaded, the instance id is taken, the
                port is taken, an option is invalid, the engine refuses or is unreachable, or
                the container exits within :attr:`start_window` (with its status and output).
        """
        where = f"{spec.environment}/{spec.id}"
        options = self.options_for(spec.environment)
        network = network_of(spec)
        host_mode = network == "host"
        with self._client(where) as client:
            image_id = _image_id(client, spec.image)
            if image_id is None:
                raise RuntimeDriverError(
                    f"{where}: image {spec.image.digest} is not loaded in the Docker engine "
                    "(ensure_image first)"
                )
            if host_mode:
                port = spec.port or _free_port(spec.host, where)
                if spec.port and _port_taken(spec.host, spec.port):
                    raise RuntimeDriverError(
                        f"{where}: port {_address(spec.host, spec.port)} is already taken"
                    )
            else:
                port = spec.port or DEFAULT_CONTAINER_PORT
            args = container_args(spec, options, image_id, port)
            if not host_mode:
                self._ensure_network(client, network, where)
            try:
                container = client.containers.create(**args)
            except docker.errors.APIError as exc:
                if exc.status_code == 409:
                    raise RuntimeDriverError(
                        f"{where}: instance already exists (container {args['name']})"
                    ) from exc
                raise
            try:
                container.start()
                self._watch_start(container, where, spec.memory)
                address = (
                    _address(spec.host, port) if host_mode else _published(container, port, where)
                )
            except BaseException:
                with contextlib.suppress(*_SDK_ERRORS):
                    container.remove(v=True, force=True)
                raise
        return Instance(
            id=spec.id,
            app=spec.app,
            environment=spec.environment,
            release=spec.release,
            runtime=self.name,
            address=address,
            handle=str(container.id),
            image=spec.image.digest,
        )

    def destroy(self, instance: Instance, grace: float) -> None:
        """Stop ``instance`` (SIGTERM, SIGKILL after ``grace`` s) and remove it and its tmpfs.

        A container that is already gone is not an error.

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"{instance.environment}/{instance.id}"
        with self._client(where) as client:
            ref = instance.handle or container_name(instance.app, instance.environment, instance.id)
            try:
                container = client.containers.get(ref)
            except docker.errors.NotFound:
                return
            _remove(container, grace)

    def down(self, app: str, environment: str, grace: float = 10.0) -> list[str]:
        """Stop and remove every container labelled for ``app``/``environment``; returns their
        names. Hand-started containers (see :meth:`strays`) are left alone.

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"environment {environment} of {app}"
        removed: list[str] = []
        with self._client(where) as client:
            for container in _labelled(client, app, environment):
                _remove(container, grace)
                removed.append(str(container.name))
        return sorted(removed)

    def observe(self, app: str, environment: str) -> list[Observed]:
        """Every container labelled for ``app``/``environment`` (exited ones too); one without
        castiron's full label set is a stray.

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        with self._client(f"environment {environment} of {app}") as client:
            found = [self._observed(c.attrs) for c in _labelled(client, app, environment)]
        return sorted(found, key=lambda o: (o.instance.id, o.instance.handle))

    def strays(
        self,
        app: str,
        environment: str,
        known_ids: Collection[str],
        release_images: Collection[ImageRef],
    ) -> list[Observed]:
        """Containers of ``app``/``environment`` that castiron's records do not know.

        That is: containers labelled for it whose instance id is not in ``known_ids`` or whose
        labels are incomplete, and containers started by hand from one of ``release_images``
        (same image ID) without castiron's full label set. A container with a full label set
        of another app or environment belongs there and is not reported here.

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        known = set(known_ids)
        by_id: dict[str, ImageRef] = {}
        for ref in release_images:
            by_id[ref.config_digest] = ref
            by_id[ref.digest] = ref
        found: dict[str, Observed] = {}
        for observed in self.observe(app, environment):
            if observed.stray or observed.instance.id not in known:
                found[observed.instance.handle] = replace(observed, stray=True)
        with self._client(f"environment {environment} of {app}") as client:
            summaries = client.api.containers(all=True)
            for summary in summaries:
                cid = str(summary.get("Id", ""))
                match = by_id.get(str(summary.get("ImageID", "")))
                labels = summary.get("Labels") or {}
                if match is None or cid in found or all(labels.get(n) for n in LABELS):
                    continue
                try:
                    attrs = client.api.inspect_container(cid)
                except docker.errors.NotFound:
                    continue
                observed = self._observed(attrs)
                instance = replace(
                    observed.instance,
                    app=labels.get(LABEL_APP) or app,
                    environment=labels.get(LABEL_ENV) or environment,
                    image=match.digest,
                )
                found[cid] = replace(observed, instance=instance, image=match.digest, stray=True)
        return sorted(found.values(), key=lambda o: (o.instance.id, o.instance.handle))

    def inspect(self, instance: Instance) -> Observed:
        """What runs for ``instance``: state, image, config (``missing`` when it is gone).

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"{instance.environment}/{instance.id}"
        ref = instance.handle or container_name(instance.app, instance.environment, instance.id)
        with self._client(where) as client:
            try:
                attrs = client.api.inspect_container(ref)
            except docker.errors.NotFound:
                return Observed(instance=instance, state="missing", image=None)
        return self._observed(attrs)

    def changes(self, instance: Instance) -> list[tuple[str, str]]:
        """What differs in ``instance``'s container filesystem from its image (``docker
        diff``, read only): ``(path, kind)`` with kind ``added``, ``changed`` or ``removed``,
        sorted by path; empty when the container is gone.

        Raises:
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"{instance.environment}/{instance.id}"
        ref = instance.handle or container_name(instance.app, instance.environment, instance.id)
        kinds = {0: "changed", 1: "added", 2: "removed"}
        with self._client(where) as client:
            api: Any = client.api  # the SDK's low-level calls are untyped
            try:
                items = api.diff(ref) or []
            except docker.errors.NotFound:
                return []
        out = [
            (str(item.get("Path", "")), kinds.get(int(item.get("Kind", 0)), "changed"))
            for item in items
            if isinstance(item, dict) and item.get("Path")
        ]
        return sorted(out)

    def logs(self, instance: Instance, lines: int) -> str:
        """The last ``lines`` lines of the container's stdout and stderr (``docker logs``).

        Raises:
            NotFoundError: when the container is gone.
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"{instance.environment}/{instance.id}"
        ref = instance.handle or container_name(instance.app, instance.environment, instance.id)
        if lines <= 0:
            return ""
        with self._client(where) as client:
            api: Any = client.api
            try:
                raw = api.logs(ref, stdout=True, stderr=True, tail=lines)
            except docker.errors.NotFound:
                raise NotFoundError(f"{where}: the container is gone") from None
        return bytes(raw).decode("utf-8", "replace")

    def follow_logs(self, instance: Instance, lines: int) -> Iterator[bytes]:
        """The last ``lines`` lines, then new output until the container stops
        (``docker logs --follow``).

        Raises:
            NotFoundError: when the container is gone.
            RuntimeDriverError: when the engine is unreachable or refuses.
        """
        where = f"{instance.environment}/{instance.id}"
        ref = instance.handle or container_name(instance.app, instance.environment, instance.id)
        with self._client(where) as client:
            api: Any = client.api
            try:
                stream = api.logs(
                    ref, stdout=True, stderr=True, stream=True, follow=True, tail=max(lines, 0)
                )
            except docker.errors.NotFound:
                raise NotFoundError(f"{where}: the container is gone") from None
            for chunk in stream:
                yield bytes(chunk)

    # -- internals

    @contextlib.contextmanager
    def _client(self, where: str) -> Iterator[docker.DockerClient]:
        """A client for one operation; every SDK error inside becomes a castiron error."""
        url = self.endpoint.base_url
        _probe(url, self.endpoint.timeout, where)
        try:
            client = docker.DockerClient(
                base_url=url, version=self.endpoint.version, timeout=int(self.endpoint.timeout)
            )
        except _SDK_ERRORS as exc:
            raise RuntimeDriverError(f"{where}: no Docker engine at {url}: {_cause(exc)}") from exc
        try:
            yield client
        except CastironError:
            raise
        except _SDK_ERRORS as exc:
            if isinstance(exc, _UNREACHABLE):
                raise RuntimeDriverError(
                    f"{where}: no Docker engine at {url}: {_cause(exc)}"
                ) from exc
            raise RuntimeDriverError(f"{where}: the Docker engine failed: {_reason(exc)}") from exc
        finally:
            client.close()

    def _ensure_network(self, client: docker.DockerClient, name: str, where: str) -> None:
        if any(n.name == name for n in client.networks.list(names=[name])):
            return
        try:
            client.networks.create(**network_args(name))
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # created meanwhile by a concurrent deployment
                raise RuntimeDriverError(
                    f"{where}: cannot create the Docker network {name!r}: {_reason(exc)}"
                ) from exc

    def _watch_start(self, container: Container, where: str, memory: str | None) -> None:
        deadline = time.monotonic() + self.start_window
        while True:
            container.reload()
            state = container.attrs.get("State") or {}
            if state.get("Status") in ("exited", "dead"):
                raise RuntimeDriverError(f"{where}: {_exit_reason(container, state, memory)}")
            if time.monotonic() >= deadline:
                return
            time.sleep(_POLL)

    def _observed(self, attrs: Mapping[str, Any]) -> Observed:
        config_section: Mapping[str, Any] = attrs.get("Config") or {}
        host_config: Mapping[str, Any] = attrs.get("HostConfig") or {}
        state_section: Mapping[str, Any] = attrs.get("State") or {}
        labels: dict[str, str] = dict(config_section.get("Labels") or {})
        name = str(attrs.get("Name", "")).lstrip("/")
        status = str(state_section.get("Status", ""))
        state: InstanceState
        if status in ("created", "restarting"):
            state = "starting"
        elif status in ("running", "paused"):
            state = "running"
        else:
            state = "exited"
        port_text = labels.get(LABEL_PORT, "")
        port = int(port_text) if port_text.isdigit() else None
        network = str(host_config.get("NetworkMode", ""))
        published = _published_ports(attrs)
        if network == "host":
            address = _address(labels.get(LABEL_HOST) or "127.0.0.1", port or 0)
        else:
            address = published.get(f"{port}/tcp", "")
        image_id = str(attrs.get("Image", ""))
        manifest = labels.get(LABEL_IMAGE, "")
        same = image_id and image_id in (labels.get(LABEL_CONFIG), manifest)
        image = Digest(manifest) if same and manifest else Digest(image_id) if image_id else None
        secrets = sorted(s for s in labels.get(LABEL_SECRETS, "").split(",") if s)
        env: dict[str, str] = {}
        for item in config_section.get("Env") or []:
            key, _, value = str(item).partition("=")
            if key not in secrets:
                env[key] = value
        command = [*(config_section.get("Entrypoint") or []), *(config_section.get("Cmd") or [])]
        exit_code = state_section.get("ExitCode") if state == "exited" else None
        config: dict[str, object] = {
            "env": env,
            "secrets": secrets,
            "command": command,
            "user": config_section.get("User") or None,
            "workdir": config_section.get("WorkingDir") or None,
            "port": port,
            "network": network,
            "ports": published,
            "labels": labels,
            "read_only": bool(host_config.get("ReadonlyRootfs")),
            "memory": host_config.get("Memory") or None,
            "nano_cpus": host_config.get("NanoCpus") or None,
            "cap_drop": list(host_config.get("CapDrop") or []),
            "cap_add": list(host_config.get("CapAdd") or []),
            "security_opt": list(host_config.get("SecurityOpt") or []),
            "tmpfs": dict(host_config.get("Tmpfs") or {}),
            "mounts": [
                {
                    "type": m.get("Type"),
                    "destination": m.get("Destination"),
                    "rw": bool(m.get("RW")),
                }
                for m in attrs.get("Mounts") or []
            ],
            "restart_policy": (host_config.get("RestartPolicy") or {}).get("Name") or "no",
            "status": status,
            "oom_killed": bool(state_section.get("OOMKilled")),
            "image_id": image_id,
            "container": name,
        }
        instance = Instance(
            id=labels.get(LABEL_INSTANCE) or name,
            app=labels.get(LABEL_APP, ""),
            environment=labels.get(LABEL_ENV, ""),
            release=ReleaseId(labels.get(LABEL_RELEASE, "")),
            runtime=self.name,
            address=address,
            handle=str(attrs.get("Id", "")),
            image=Digest(manifest or image_id),
        )
        return Observed(
            instance=instance,
            state=state,
            image=image,
            config=config,
            stray=any(not labels.get(n) for n in LABELS),
            exit_code=int(exit_code) if isinstance(exit_code, int) else None,
        )


# --- helpers ---------------------------------------------------------------------------------


def _image_id(client: docker.DockerClient, image: ImageRef) -> str | None:
    """The engine's ID of ``image``: its config digest (or, on a containerd image store, its
    manifest digest); None when the engine does not hold it. Never looks up a tag."""
    api: Any = client.api  # the SDK's low-level calls are untyped
    for candidate in (image.config_digest, image.digest):
        try:
            found = str(api.inspect_image(candidate).get("Id", ""))
        except docker.errors.ImageNotFound:
            continue
        if found in (image.config_digest, image.digest):
            return found
    return None


def _labelled(client: docker.DockerClient, app: str, environment: str) -> list[Container]:
    filters: dict[str, str | list[str] | bool] = {
        "label": [f"{LABEL_APP}={app}", f"{LABEL_ENV}={environment}"]
    }
    return list(client.containers.list(all=True, filters=filters, ignore_removed=True))


def _remove(container: Container, grace: float) -> None:
    try:
        if container.status in ("running", "paused", "restarting"):
            container.stop(timeout=max(0, math.ceil(grace)))
        container.remove(v=True, force=True)
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code == 409 and "in progress" in _reason(exc):
            return  # another caller is already removing it
        raise


def _published_ports(attrs: Mapping[str, Any]) -> dict[str, str]:
    ports = ((attrs.get("NetworkSettings") or {}).get("Ports")) or {}
    out: dict[str, str] = {}
    for key, bindings in sorted(ports.items()):
        for binding in bindings or []:
            host_ip, host_port = binding.get("HostIp") or "", binding.get("HostPort") or ""
            if host_port and host_ip in ("127.0.0.1", "::1"):
                out[key] = _address(host_ip, int(host_port))
                break
    return out


def _published(container: Container, port: int, where: str) -> str:
    address = _published_ports(container.attrs).get(f"{port}/tcp")
    if not address:
        raise RuntimeDriverError(f"{where}: the Docker engine did not publish port {port}")
    return address


def _exit_reason(container: Container, state: Mapping[str, Any], memory: str | None) -> str:
    code = state.get("ExitCode")
    text = f"the container exited at start with status {code}"
    if state.get("OOMKilled"):
        text += f" (killed: out of memory, limit {memory or 'none'})"
    if state.get("Error"):
        text += f" ({_one_line(state['Error'])})"
    with contextlib.suppress(*_SDK_ERRORS):
        raw = container.logs(tail=_LOG_LINES)
        lines = [line for line in raw.decode(errors="replace").splitlines() if line.strip()]
        if lines:
            text += "; last output: " + " | ".join(_one_line(line) for line in lines)
    return text


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str, where: str) -> int:
    try:
        return free_port(host)
    except OSError as exc:
        raise RuntimeDriverError(f"{where}: no free port on {host}: {exc.strerror}") from exc


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _probe(url: str, timeout: float, where: str) -> None:
    """Fail fast, and without leaking the SDK's half-open socket, when nothing listens."""
    if not url.startswith("unix://"):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(min(timeout, 10.0))
        try:
            sock.connect(url.removeprefix("unix://"))
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise RuntimeDriverError(f"{where}: no Docker engine at {url}: {reason}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return _one_line(exc.explanation)
    return _one_line(exc) or type(exc).__name__


def _cause(exc: BaseException) -> str:
    """The operating system's reason at the root of a connection failure (else the message)."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = _reason(exc)
    match = re.search(r"\[Errno \d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


__all__ = [
    "DEFAULT_CONTAINER_PORT",
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_NETWORK",
    "LABELS",
    "NETWORK_LABEL",
    "ContainerOptions",
    "DockerDriver",
    "DockerEndpoint",
    "Exporter",
    "container_args",
    "container_name",
    "network_args",
    "network_of",
    "parse_memory",
]
