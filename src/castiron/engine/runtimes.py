"""Runtimes other than the embedded one, and what the engine must know about each runtime.

Owns:

* building the driver of a runtime that is not ``local`` (:func:`runtime_driver`): ``docker``
  is a :class:`~castiron.drivers.docker.DockerDriver` on the engine at ``DOCKER_HOST`` (from
  the captured settings), fed by :func:`archive_exporter`, which writes a docker-archive of an
  image from castiron's store into a cache file under ``CASTIRON_HOME`` (``cache/docker/``);
  the network a container joins comes with its instance spec (``InstanceSpec.network``, from
  the release), never from a look-up in the state store;
* the port an instance is given (:func:`instance_port`): 0 — "the driver picks a free one" —
  wherever replicas share the host's network, so each replica gets its own;
* what a driver offers beyond the protocol: finding strays (:func:`find_strays`,
  :func:`environment_strays`) and removing everything of an environment (:func:`sweep`).

The Docker SDK is only imported by the driver module, and that only when a Docker runtime is
used. It knows nothing of click or rendering, and never reads the process environment.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from castiron.drivers.base import Driver, ReadinessSource
from castiron.engine.release import ReleaseConfig
from castiron.errors import CastironError, UsageError
from castiron.health import ProbeResult, probe
from castiron.model import RUNTIMES, Digest, HealthCheck, ImageRef, Observed, ReleaseId, RuntimeName
from castiron.settings import Settings
from castiron.state.base import StateStore
from castiron.traffic.base import BackendSet, Limits, ReleaseCounters, Stickiness
from castiron.traffic.controller import (
    FlipOutcome,
    RequestCounting,
    RouteDiffer,
    RouteDifference,
    Routing,
    TrafficController,
)

if TYPE_CHECKING:  # the docker SDK is only imported when a Docker runtime is used
    from castiron.drivers.docker import DockerDriver
    from castiron.drivers.kubernetes.manifests import KubernetesOptions
    from castiron.engine.context import EngineContext

AVAILABLE_RUNTIMES: tuple[RuntimeName, ...] = RUNTIMES
"""Runtimes this castiron can deploy to."""


def instance_port(config: ReleaseConfig) -> int:
    """The port to ask the driver for, for one instance of a release with ``config``.

    0 (the driver assigns a free port) wherever instances share the host's network: every
    local process, and Docker containers on ``network: host``; otherwise the service port
    (inside the container's own network namespace, where replicas cannot collide).
    """
    if config.runtime == "local":
        return 0
    if config.runtime == "docker" and config.network == "host":
        return 0
    return config.port


def docker_cache(settings: Settings) -> Path:
    """Where docker-archives exported for the Docker engine are kept (under CASTIRON_HOME)."""
    return settings.home / "cache" / "docker"


def archive_exporter(cache: Path) -> Callable[[ImageRef], Path]:
    """An exporter for :class:`~castiron.drivers.docker.DockerDriver`: the docker-archive of
    an image, written once from castiron's store into ``cache`` (named by the manifest
    digest) and reused while it is there.

    The archive's ``RepoTags`` name the image's tags in the store, so the engine may keep a
    ``APP:TAG`` tag after loading it; castiron itself always refers to the image by its ID.
    """

    def export(image: ImageRef) -> Path:
        # Imported on use: only a Docker deployment that lacks the image needs the images lib.
        from castiron.images.archive import export_archive
        from castiron.images.store import ImageStore

        dest = cache / f"{image.digest.removeprefix('sha256:')}.docker.tar"
        if dest.is_file():
            return dest
        return export_archive(ImageStore(image.store), image.digest, "docker-archive", dest).path

    return export


def docker_driver(settings: Settings) -> Driver:
    """The Docker runtime: the engine at ``DOCKER_HOST`` (default: the local socket).

    Raises:
        UsageError: when the Docker SDK is not installed.
    """
    try:
        from castiron.drivers.docker import DEFAULT_DOCKER_HOST, DockerDriver, DockerEndpoint
    except ImportError as exc:
        raise UsageError(
            f"runtime 'docker' needs the Docker SDK for Python ({exc}): "
            "pip install 'castiron[docker]'"
        ) from None
    return DockerDriver(
        export=archive_exporter(docker_cache(settings)),
        endpoint=DockerEndpoint(
            base_url=settings.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        ),
    )


def moving_release_config(store: StateStore, environment: str) -> Mapping[str, Any] | None:
    """The config of the release ``environment`` is moving to (a running deployment), else
    of the one it serves; None when there is neither."""
    release: ReleaseId | None = None
    for deployment in store.list_deployments(environment, limit=5):
        if deployment.outcome == "running":
            release = ReleaseId(deployment.to_release)
            break
    if release is None:
        row = store.get_environment(environment)
        release = row.current_release if row is not None else None
    if release is None:
        return None
    found = store.get_release(release)
    return None if found is None else found.config


class ReleaseKubernetes(Mapping[str, "KubernetesOptions"]):
    """Kubernetes options by environment, from the release being deployed there (else the one
    it serves), read from the state store on each look-up."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    def __getitem__(self, environment: str) -> KubernetesOptions:
        from castiron.drivers.kubernetes.manifests import KubernetesOptions

        config = moving_release_config(self._store, environment)
        if config is None or not config.get("kubernetes"):
            raise KeyError(environment)
        try:
            return KubernetesOptions.from_json(config["kubernetes"])
        except (KeyError, TypeError, ValueError):
            raise KeyError(environment) from None

    def __iter__(self) -> Iterator[str]:
        return iter([e.name for e in self._store.list_environments() if e.runtime == "kubernetes"])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def kubernetes_driver(settings: Settings, store: StateStore) -> Driver:
    """The Kubernetes runtime: the cluster of ``KUBECONFIG`` (like kubectl), one client per
    context. With ``CASTIRON_KUBERNETES_DOCKER_HOST`` set (a single-node cluster whose node
    runs that Docker engine, e.g. the test bed), images are loaded into that engine from
    castiron's store and pods run them by image ID; otherwise nodes pull by digest from the
    environment's ``image_repository``.

    Raises:
        UsageError: when the Kubernetes client library is not installed.
    """
    try:
        from castiron.drivers.kubernetes.client import KubeClient
    except ImportError as exc:
        raise UsageError(
            f"runtime 'kubernetes' needs the Kubernetes client library ({exc}): "
            "pip install 'castiron[kubernetes]'"
        ) from None
    from castiron.drivers.kubernetes.driver import KubernetesDriver

    kubeconfig = [Path(p) for p in settings.environ.get("KUBECONFIG", "").split(":") if p]
    in_cluster = {
        k: settings.environ[k]
        for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
        if settings.environ.get(k)
    }
    clients: dict[str | None, KubeClient] = {}

    def client(options: KubernetesOptions) -> KubeClient:
        if options.context not in clients:
            clients[options.context] = KubeClient(
                kubeconfig=kubeconfig or None, context=options.context, in_cluster=in_cluster
            )
        return clients[options.context]

    load: Callable[[ImageRef], None] | None = None
    node_docker = settings.environ.get("CASTIRON_KUBERNETES_DOCKER_HOST")
    if node_docker:
        loaders: list[DockerDriver] = []

        def load(image: ImageRef) -> None:
            # Built on first use: a rollback or a status never loads an image, and the Docker
            # SDK costs a quarter of a second to import.
            from castiron.drivers.docker import DockerDriver, DockerEndpoint
            from castiron.drivers.kubernetes.manifests import LOADED_REPOSITORY

            if not loaders:
                loaders.append(
                    DockerDriver(
                        export=archive_exporter(docker_cache(settings)),
                        endpoint=DockerEndpoint(base_url=str(node_docker)),
                    )
                )
            loaders[0].name_image(image, LOADED_REPOSITORY)

    return KubernetesDriver(client=client, options=ReleaseKubernetes(store), load=load)


def runtime_driver(runtime: str, settings: Settings, store: StateStore) -> Driver:
    """The driver of ``runtime`` (any but ``local``, which needs the host agent).

    Raises:
        UsageError: when the runtime is not available (or its SDK is missing).
    """
    if runtime == "docker":
        return docker_driver(settings)
    if runtime == "kubernetes":
        return kubernetes_driver(settings, store)
    raise UsageError(
        f"runtime {runtime!r} is not available yet (available: {', '.join(AVAILABLE_RUNTIMES)})"
    )


# --- traffic and readiness by runtime --------------------------------------------------------


class RuntimeTraffic:
    """The traffic controller of each environment's runtime: a Kubernetes environment's
    traffic is its Service's selector; every other environment's is the host agent's router.
    The runtime is the one of the release being deployed there (else the one it serves)."""

    def __init__(
        self,
        store: StateStore,
        agent: Callable[[], TrafficController],
        driver_for: Callable[[str], Driver],
    ) -> None:
        self._store = store
        self._agent_factory = agent
        self._driver_for = driver_for
        self._agent: TrafficController | None = None
        self._kubernetes: TrafficController | None = None

    def _runtime(self, environment: str) -> str:
        config = moving_release_config(self._store, environment)
        if config is not None:
            return str(config.get("runtime", "local"))
        row = self._store.get_environment(environment)
        return row.runtime if row is not None else "local"

    def _for(self, environment: str) -> TrafficController:
        if self._runtime(environment) == "kubernetes":
            if self._kubernetes is None:
                from castiron.drivers.kubernetes.driver import KubernetesDriver
                from castiron.drivers.kubernetes.traffic import KubernetesTraffic

                driver = self._driver_for("kubernetes")
                if not isinstance(driver, KubernetesDriver):
                    raise UsageError("runtime 'kubernetes' has no Kubernetes driver")

                def app_of(environment: str) -> str:
                    config = moving_release_config(self._store, environment) or {}
                    return str(config.get("app", ""))

                def port_of(environment: str) -> int:
                    config = moving_release_config(self._store, environment) or {}
                    return int(config.get("port", 0))

                self._kubernetes = KubernetesTraffic(driver, app_of, port_of)
            return self._kubernetes
        if self._agent is None:
            self._agent = self._agent_factory()
        return self._agent

    def switch(
        self,
        environment: str,
        listen: str,
        stable: BackendSet,
        *,
        canary: BackendSet | None = None,
        canary_weight: int = 0,
        drain_timeout: float = 30.0,
        sticky: Stickiness | None = None,
        limits: Limits | None = None,
        access_log: bool = False,
    ) -> None:
        self._for(environment).switch(
            environment,
            listen,
            stable,
            canary=canary,
            canary_weight=canary_weight,
            drain_timeout=drain_timeout,
            sticky=sticky,
            limits=limits,
            access_log=access_log,
        )

    def flip(
        self,
        environment: str,
        listen: str,
        stable: BackendSet,
        *,
        expect: str | None,
        check: HealthCheck,
        env: Mapping[str, str],
        drain_timeout: float = 30.0,
        limits: Limits | None = None,
        access_log: bool = False,
    ) -> FlipOutcome:
        return self._for(environment).flip(
            environment,
            listen,
            stable,
            expect=expect,
            check=check,
            env=env,
            drain_timeout=drain_timeout,
            limits=limits,
            access_log=access_log,
        )

    def remove(self, environment: str) -> bool:
        return self._for(environment).remove(environment)

    def current(self, environment: str) -> Routing | None:
        return self._for(environment).current(environment)

    def counters(self, environment: str) -> list[ReleaseCounters]:
        return self._for(environment).counters(environment)

    def counts_requests(self, environment: str) -> bool:
        """Whether the environment's route counts requests per release (the host agent's
        routers do; a Kubernetes Service does not)."""
        controller = self._for(environment)
        if isinstance(controller, RequestCounting):
            return controller.counts_requests(environment)
        return True

    def route_diff(self, environment: str, release: str) -> list[RouteDifference]:
        """How the environment's route object differs from castiron's (a Kubernetes
        Service); empty for a route with no object to edit (the host agent's router)."""
        controller = self._for(environment)
        if isinstance(controller, RouteDiffer):
            return controller.route_diff(environment, release)
        return []


def runtime_prober(
    driver_for: Callable[[str], Driver],
) -> Callable[[HealthCheck, str, Mapping[str, str]], ProbeResult]:
    """The engine's health prober: a real probe of the address, except for instances whose
    runtime judges readiness itself (their driver is asked)."""

    def prober(check: HealthCheck, address: str, env: Mapping[str, str]) -> ProbeResult:
        if address.startswith(KUBERNETES_ADDRESS_PREFIX):
            driver = driver_for("kubernetes")
            if isinstance(driver, ReadinessSource):
                try:
                    ready, detail = driver.readiness(address)
                except CastironError as exc:
                    return ProbeResult(False, str(exc))
                return ProbeResult(ready, detail)
        return probe(check, address, env)

    return prober


KUBERNETES_ADDRESS_PREFIX = "k8s://"
"""How the Kubernetes driver's pod addresses start (see its ``address_of``)."""


# --- beyond the protocol ---------------------------------------------------------------------


@runtime_checkable
class StrayFinder(Protocol):
    """A driver that can also find instances started by hand from a release image."""

    def strays(
        self,
        app: str,
        environment: str,
        known_ids: Collection[str],
        release_images: Collection[ImageRef],
    ) -> list[Observed]: ...


@runtime_checkable
class Sweeper(Protocol):
    """A driver that can remove everything it labelled for an environment in one call."""

    def down(self, app: str, environment: str, grace: float = 10.0) -> list[str]: ...


def find_strays(
    driver: Driver,
    app: str,
    environment: str,
    known_ids: Collection[str],
    release_images: Collection[ImageRef] = (),
) -> list[Observed]:
    """What ``driver`` shows of ``app``/``environment`` that castiron's records do not know:
    instances whose id is not in ``known_ids`` or without castiron's labels, and — where the
    driver can tell — instances started by hand from one of ``release_images``.

    Raises:
        RuntimeDriverError: when the runtime cannot be observed.
    """
    if isinstance(driver, StrayFinder):
        return driver.strays(app, environment, known_ids, release_images)
    known = set(known_ids)
    return [o for o in driver.observe(app, environment) if o.stray or o.instance.id not in known]


def sweep(driver: Driver, app: str, environment: str, known_ids: Sequence[str]) -> list[str]:
    """Destroy every instance ``driver`` shows for ``app``/``environment`` (with the driver's
    own ``down`` where it has one); returns the ids that were not in ``known_ids``.

    Raises:
        RuntimeDriverError: when the runtime cannot be observed or refuses.
    """
    observed = driver.observe(app, environment)
    extra: list[str] = []
    for o in observed:
        if o.instance.id not in known_ids and o.instance.id not in extra:
            extra.append(o.instance.id)
    if isinstance(driver, Sweeper):
        driver.down(app, environment, grace=5.0)
    else:
        for o in observed:
            driver.destroy(o.instance, grace=5.0)
    return extra


def stray_json(observed: Observed) -> dict[str, Any]:
    """One stray as shown by ``castiron status --json``."""
    instance = observed.instance
    container = observed.config.get("container")
    return {
        "id": instance.id,
        "handle": instance.handle,
        "name": str(container) if container else None,
        "state": observed.state,
        "release": instance.release or None,
        "address": instance.address or None,
        "image": observed.image,
    }


def environment_strays(
    engine: EngineContext,
    environment: str,
    known_ids: Collection[str],
    *,
    agent_running: bool,
) -> list[dict[str, Any]] | None:
    """The strays of ``environment`` as JSON-ready objects; None when they cannot be told
    (the runtime cannot be reached, or it is the local runtime and the agent is not running:
    a read command never starts it)."""
    row = engine.store.get_environment(environment)
    if row is None:
        return None
    if row.runtime == "local" and not agent_running:
        return None
    app = str(row.config.get("app", ""))
    images: dict[str, ImageRef] = {}
    for release in engine.store.list_releases(environment):
        if release.digest in images:
            continue
        try:
            config_digest = engine.images.image(release.digest).config_digest
        except CastironError:
            continue
        images[release.digest] = ImageRef(Digest(release.digest), config_digest, engine.images.root)
    try:
        driver = engine.driver(row.runtime)
        found = find_strays(driver, app, environment, known_ids, list(images.values()))
    except CastironError:
        return None
    return [stray_json(o) for o in found]


__all__ = [
    "AVAILABLE_RUNTIMES",
    "KUBERNETES_ADDRESS_PREFIX",
    "ReleaseKubernetes",
    "RuntimeTraffic",
    "StrayFinder",
    "Sweeper",
    "archive_exporter",
    "docker_cache",
    "docker_driver",
    "environment_strays",
    "find_strays",
    "instance_port",
    "kubernetes_driver",
    "moving_release_config",
    "runtime_driver",
    "runtime_prober",
    "stray_json",
    "sweep",
]
