"""The driver conformance suite: every driver (fake, local, docker, ...) passes the same tests.

A new driver joins by adding a case to ``DRIVER_CASES``: a context manager that yields the driver
and an image it can run (an HTTP server answering on ``$PORT``), and cleans up after the test.
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from castiron.drivers.base import MUTATING_VERBS, Driver
from castiron.drivers.fake import FakeDriver
from castiron.errors import RuntimeDriverError
from castiron.model import Digest, ImageRef, InstanceSpec, ReleaseId

from .localkit import LocalImage, make_driver, running_agent
from .test_docker import HTTPD, bake_busybox, docker_exporter


@dataclass
class DriverCase:
    driver: Driver
    image: ImageRef
    command: tuple[str, ...]


@contextlib.contextmanager
def _fake_case(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DriverCase]:
    image = ImageRef(Digest("sha256:" + "a" * 64), Digest("sha256:" + "b" * 64), tmp_path)
    yield DriverCase(FakeDriver(), image, ("server",))


@contextlib.contextmanager
def _local_case(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DriverCase]:
    image: LocalImage = request.getfixturevalue("local_image")
    with running_agent(tmp_path / "home") as (settings, agent):
        yield DriverCase(make_driver(settings, agent), image.ref, image.command)


@contextlib.contextmanager
def _docker_case(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DriverCase]:
    from castiron.drivers.docker import DockerDriver

    engine = request.getfixturevalue("docker_engine")
    image = bake_busybox(tmp_path / "docker")
    try:
        yield DriverCase(DockerDriver(export=docker_exporter(tmp_path)), image, HTTPD)
    finally:
        with contextlib.suppress(Exception):  # still in use by a leftover: the next case reuses it
            engine.images.remove(image.config_digest)


@contextlib.contextmanager
def _kubernetes_case(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DriverCase]:
    from castiron.drivers.kubernetes.manifests import KubernetesOptions

    cluster = request.getfixturevalue("kube_testbed")
    namespace = request.getfixturevalue("kube_namespace")
    image = bake_busybox(tmp_path / "k8s")
    options = KubernetesOptions(namespace=namespace)
    driver = cluster.driver(tmp_path, {"test": options})
    try:
        yield DriverCase(driver, image, HTTPD)
    finally:
        driver.client(options).close()


@contextlib.contextmanager
def _kubernetes_fake_case(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DriverCase]:
    from castiron.drivers.kubernetes.driver import KubernetesDriver
    from castiron.drivers.kubernetes.fake import FakeCluster
    from castiron.drivers.kubernetes.manifests import KubernetesOptions

    cluster = FakeCluster()
    image = ImageRef(Digest("sha256:" + "a" * 64), Digest("sha256:" + "b" * 64), tmp_path)
    options = {"test": KubernetesOptions(namespace="conf")}
    yield DriverCase(KubernetesDriver(client=lambda _o: cluster, options=options), image, ("srv",))


DRIVER_CASES: dict[
    str, Callable[[Path, pytest.FixtureRequest], AbstractContextManager[DriverCase]]
] = {
    "fake": _fake_case,
    "local": _local_case,
    "docker": _docker_case,
    "kubernetes": _kubernetes_case,
    "kubernetes-fake": _kubernetes_fake_case,
}

CASE_MARKS: dict[str, tuple[pytest.MarkDecorator, ...]] = {
    "docker": (pytest.mark.docker,),
    "kubernetes": (pytest.mark.kubernetes,),
}
"""Markers of a case (a guarded marker makes its skip a failure in CI)."""


@pytest.fixture(params=[pytest.param(n, marks=CASE_MARKS.get(n, ())) for n in sorted(DRIVER_CASES)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DriverCase]:
    with DRIVER_CASES[request.param](tmp_path, request) as made:
        yield made
        for observed in made.driver.observe("conf", "test"):
            made.driver.destroy(observed.instance, grace=1.0)


def _spec(case: DriverCase, instance_id: str, port: int = 0, **env: str) -> InstanceSpec:
    return InstanceSpec(
        id=instance_id,
        app="conf",
        environment="test",
        release=ReleaseId("r-1"),
        image=case.image,
        command=case.command,
        env={"GREETING": "hi", **env},
        workdir="/app",
        port=port,
    )


def test_protocol_has_no_mutating_verbs(case: DriverCase) -> None:
    names = {n for n, _ in pyinspect.getmembers(case.driver) if not n.startswith("_")}
    offending = {n for n in names if any(n.startswith(v) for v in MUTATING_VERBS)}
    assert offending == set()
    protocol_names = {n for n in vars(Driver) if not n.startswith("_")} | set(
        Driver.__annotations__
    )
    assert protocol_names == {"name", "ensure_image", "create", "destroy", "observe", "inspect"}


def test_ensure_image_is_idempotent(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    case.driver.ensure_image(case.image)


def test_create_observe_destroy(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    instance = case.driver.create(_spec(case, "i-1"))
    assert instance.id == "i-1"
    assert instance.release == "r-1"
    assert instance.image == case.image.digest
    host, _, port = instance.address.rpartition(":")
    assert host and int(port) > 0
    observed = case.driver.observe("conf", "test")
    assert [o.instance.id for o in observed] == ["i-1"]
    assert observed[0].state in {"starting", "running"}
    assert observed[0].image == case.image.digest
    assert not observed[0].stray
    case.driver.destroy(instance, grace=2.0)
    assert case.driver.observe("conf", "test") == []
    assert case.driver.inspect(instance).state == "missing"


def test_destroy_twice_is_not_an_error(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    instance = case.driver.create(_spec(case, "i-2"))
    case.driver.destroy(instance, grace=1.0)
    case.driver.destroy(instance, grace=1.0)


def test_instance_ids_are_never_reused(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    case.driver.create(_spec(case, "i-3"))
    with pytest.raises(RuntimeDriverError, match="i-3"):
        case.driver.create(_spec(case, "i-3"))


def test_observe_is_scoped_to_app_and_environment(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    case.driver.create(_spec(case, "i-4"))
    assert case.driver.observe("conf", "other") == []
    assert case.driver.observe("other", "test") == []


def test_inspect_reports_config(case: DriverCase) -> None:
    case.driver.ensure_image(case.image)
    instance = case.driver.create(_spec(case, "i-5", EXTRA="1"))
    observed = case.driver.inspect(instance)
    env = observed.config.get("env")
    assert isinstance(env, dict)
    assert env.get("EXTRA") == "1"
