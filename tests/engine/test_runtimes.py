"""Runtimes beyond the protocol: ports per runtime, the Docker driver's wiring (built, not run),
the docker-archive exporter and its cache, strays in ``status``, and ``down`` sweeping what the
runtime shows."""

from __future__ import annotations

import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from castiron.engine.deploy import image_runtime
from castiron.engine.runtimes import (
    ReleaseKubernetes,
    archive_exporter,
    docker_cache,
    environment_strays,
    instance_port,
    runtime_driver,
)
from castiron.engine.status import status
from castiron.engine.strategies import release_instance_spec
from castiron.errors import UsageError
from castiron.model import Digest, ImageRef, Instance, ReleaseId
from castiron.settings import Settings

from .conftest import World


@pytest.mark.parametrize(
    ("runtime", "network", "port"),
    [
        ("local", "host", 0),
        ("docker", "host", 0),  # replicas share the host's network: the driver picks
        ("docker", "backend", 8000),  # own network namespace: the service port
        ("kubernetes", "host", 8000),
    ],
)
def test_instance_port(world: World, runtime: str, network: str, port: int) -> None:
    config = world.engine().resolve(world.spec(), "staging", "v1").release.config
    assert instance_port(replace(config, runtime=runtime, network=network)) == port


def test_the_docker_driver_is_wired_from_settings(world: World, tmp_path: Path) -> None:
    from castiron.drivers.docker import DockerDriver

    settings = Settings(home=tmp_path / "home", environ={"DOCKER_HOST": "tcp://127.0.0.1:1"})
    driver = runtime_driver("docker", settings, world.store)
    assert isinstance(driver, DockerDriver)
    assert driver.endpoint.base_url == "tcp://127.0.0.1:1"
    assert driver.options == {}  # the network comes with each instance spec
    assert docker_cache(settings) == tmp_path / "home" / "cache" / "docker"
    with pytest.raises(UsageError, match=r"runtime 'nomad' is not available yet"):
        runtime_driver("nomad", settings, world.store)


def test_the_kubernetes_driver_is_wired_from_settings(world: World, tmp_path: Path) -> None:
    from castiron.drivers.kubernetes.driver import KubernetesDriver
    from castiron.drivers.kubernetes.manifests import KubernetesOptions

    environ = {
        "KUBECONFIG": f"{tmp_path / 'a'}:{tmp_path / 'b'}",
        "CASTIRON_KUBERNETES_DOCKER_HOST": "unix:///nonexistent.sock",
    }
    settings = Settings(home=tmp_path / "home", environ=environ)
    driver = runtime_driver("kubernetes", settings, world.store)
    assert isinstance(driver, KubernetesDriver)
    assert isinstance(driver.options, ReleaseKubernetes)
    assert driver.load is not None  # images go into the node's Docker engine
    # Every file of KUBECONFIG is read (merged like kubectl), with the environment's context.
    assert (
        driver.client(driver.options_for("staging")).where == f"{tmp_path / 'a'}:{tmp_path / 'b'}"
    )
    other = driver.client(KubernetesOptions(context="other"))
    assert other.context == "other" and other is driver.client(KubernetesOptions(context="other"))
    bare = runtime_driver("kubernetes", Settings(home=tmp_path / "h2", environ={}), world.store)
    assert isinstance(bare, KubernetesDriver) and bare.load is None  # nodes pull by digest


@pytest.mark.parametrize("network", ["host", "castiron-web"])
def test_the_instance_spec_carries_the_release_network(world: World, network: str) -> None:
    target = world.engine().resolve(world.spec(), "staging", "v1")
    release = replace(target.release, config=replace(target.release.config, network=network))
    digest = Digest(world.digests["v1"])
    image = ImageRef(digest, world.images.image(digest).config_digest, world.images.root)
    runtime = image_runtime(world.images, digest)
    spec = release_instance_spec(release, image, runtime, {}, "i-1", "d-1")
    assert spec.network == network


def test_the_exporter_writes_a_docker_archive_once(world: World, tmp_path: Path) -> None:
    digest = Digest(world.digests["v1"])
    image = ImageRef(digest, world.images.image(digest).config_digest, world.images.root)
    export = archive_exporter(tmp_path / "cache")
    path = export(image)
    assert path.parent == tmp_path / "cache" and path.is_file()
    with tarfile.open(path) as tar:
        assert "manifest.json" in tar.getnames()
    stamp = path.stat().st_mtime_ns
    assert export(image) == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten


def stray(world: World, instance_id: str) -> Instance:
    return Instance(
        id=instance_id,
        app="hello",
        environment="staging",
        release=ReleaseId(""),
        runtime="local",
        address="127.0.0.1:29999",
        handle=f"hand-{instance_id}",
        image=Digest(world.digests["v1"]),
    )


def test_status_reports_strays(world: World) -> None:
    world.deploy("staging", "v1")
    engine = world.engine()
    env = status(engine, "staging")["environments"][0]
    assert env["strays"] == []
    world.driver.add_stray(stray(world, "by-hand"))
    env = status(engine, "staging")["environments"][0]
    assert [(s["id"], s["handle"], s["state"]) for s in env["strays"]] == [
        ("by-hand", "hand-by-hand", "running")
    ]
    # Without the agent, the local runtime is not asked (a read command never starts it).
    assert status(engine, "staging", router=False)["environments"][0]["strays"] is None
    known = {r.id for r in world.store.list_instances("staging")}
    assert environment_strays(engine, "nowhere", known, agent_running=True) is None


def test_down_sweeps_what_the_runtime_shows(world: World) -> None:
    world.deploy("staging", "v1")
    world.driver.add_stray(stray(world, "by-hand"))
    destroyed = world.engine().down("staging")
    assert "by-hand" in destroyed and len(destroyed) == 3
    assert world.driver.observe("hello", "staging") == []
