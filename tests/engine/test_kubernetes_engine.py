"""The engine on the in-memory Kubernetes cluster: the real driver and traffic controller, the
engine's strategies, and what a cluster shows after each step (no real control plane)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from castiron.drivers.base import Driver
from castiron.drivers.kubernetes.driver import KubernetesDriver
from castiron.drivers.kubernetes.fake import FakeCluster
from castiron.drivers.kubernetes.manifests import KubernetesOptions, route_weights
from castiron.engine.deploy import Engine
from castiron.engine.drift import detect_drift, fix_drift
from castiron.engine.runtimes import ReleaseKubernetes, RuntimeTraffic, runtime_prober
from castiron.errors import CanaryAbortedError, UsageError
from castiron.state.base import ManualClock
from castiron.traffic.base import Backend, BackendSet
from castiron.traffic.controller import TrafficController

from .conftest import FakePrometheus, Recorder, World, baked_world, vector

SPEC = textwrap.dedent(
    """
    app: hello
    image:
      context: ./app
      entrypoint: ["python3", "server.py"]
    service:
      port: 8000
      replicas: 3
      health: {http: /healthz, interval: 100ms, start_period: 1s}
      env: {APP_VERSION: "${APP_VERSION:-1}"}
      secrets: {TOKEN: {env: HELLO_TOKEN}}
    environments:
      blue:
        runtime: kubernetes
        listen: 127.0.0.1:18090
        keep_warm: 10m
        drain_timeout: 1s
        kubernetes: {namespace: web, context: prod}
      roll:
        runtime: kubernetes
        listen: 127.0.0.1:18091
        drain_timeout: 1s
        strategy: {type: rolling, batch: 1}
        kubernetes: {namespace: web, context: prod}
      gw:
        runtime: kubernetes
        listen: 127.0.0.1:18092
        keep_warm: 10m
        drain_timeout: 1s
        strategy: {type: canary, steps: [{weight: 10, pause: 1s}, {weight: 50, pause: 1s}]}
        kubernetes:
          namespace: web
          context: prod
          gateway: {name: edge, namespace: infra, hostnames: [hello.example.com]}
      can:
        runtime: kubernetes
        listen: 127.0.0.1:18093
        keep_warm: 10m
        drain_timeout: 1s
        strategy: {type: canary, steps: [{weight: 10, pause: 3s}, {weight: 50, pause: 3s}]}
        kubernetes: {namespace: web, context: prod}
    """
)
NS = "web"


@dataclass
class WatchedCluster(FakeCluster):
    """A fake cluster that records, after each change, how many Ready pods each Service
    selects."""

    served: dict[str, list[int]] = field(default_factory=dict)

    def _reconcile(self) -> None:
        super()._reconcile()
        for (kind, ns, name), svc in list(self.objects.items()):
            if kind != "Service":
                continue
            selector = svc["spec"]["selector"]
            ready = 0
            for (k, n, _), pod in self.objects.items():
                labels = pod.get("metadata", {}).get("labels", {})
                if k == "Pod" and n == ns and all(labels.get(a) == b for a, b in selector.items()):
                    conditions = pod.get("status", {}).get("conditions", [])
                    ready += any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            self.served.setdefault(name, []).append(ready)


@dataclass
class KubeWorld:
    world: World
    cluster: WatchedCluster
    driver: KubernetesDriver

    def engine(self) -> Engine:
        world = self.world

        def driver_for(runtime: str) -> Driver:
            if runtime != "kubernetes":
                raise UsageError(f"runtime {runtime!r} is not available here")
            return self.driver

        def no_agent() -> TrafficController:
            raise UsageError("no host agent here")

        return Engine(
            store=world.store,
            images=world.images,
            driver_for=driver_for,
            traffic=lambda: RuntimeTraffic(world.store, no_agent, driver_for),
            environ=world.environ,
            observer=Recorder(),
            prober=runtime_prober(driver_for),
            monotonic=world.time.monotonic,
            sleep=world.time.sleep,
        )

    def deploy(self, environment: str, tag: str, **env: str) -> Any:
        self.world.environ.update(env)
        engine = self.engine()
        return engine.deploy(engine.resolve(self.world.spec(), environment, tag))

    def deployments(self) -> dict[str, dict[str, Any]]:
        return {d["metadata"]["name"]: d for d in self.cluster.find("Deployment", NS, {})}

    def selector(self, environment: str) -> dict[str, str]:
        svc = self.cluster.get("Service", NS, f"hello-{environment}")
        assert svc is not None
        return dict(svc["spec"]["selector"])


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeWorld]:
    # The fake runtime and router of the world are not used: the engine gets the cluster's.
    world = baked_world(tmp_path / "project", SPEC, ManualClock())
    store = world.store
    cluster = WatchedCluster(context="prod")

    def client(options: KubernetesOptions) -> FakeCluster:
        assert options.context == "prod", f"a call without the environment's context: {options}"
        return cluster

    driver = KubernetesDriver(client=client, options=ReleaseKubernetes(store))
    try:
        yield KubeWorld(world, cluster, driver)
    finally:
        store.close()


def test_blue_green_is_one_deployment_per_release_kept_warm(kube: KubeWorld) -> None:
    first = kube.deploy("blue", "v1")
    made = kube.deployments()
    assert list(made) == [f"hello-blue-{first.release}"]
    assert made[f"hello-blue-{first.release}"]["spec"]["replicas"] == 3
    assert kube.selector("blue")["castiron.dev/release"] == first.release
    second = kube.deploy("blue", "v2")
    assert sorted(kube.deployments()) == sorted(
        [f"hello-blue-{first.release}", f"hello-blue-{second.release}"]
    )
    assert kube.selector("blue")["castiron.dev/release"] == second.release
    assert min(kube.cluster.served["hello-blue"]) >= 3  # never fewer ready pods than wanted
    secrets = [s["metadata"]["name"] for s in kube.cluster.find("Secret", NS, {})]
    assert secrets == sorted(
        [f"hello-blue-{first.release}-secrets", f"hello-blue-{second.release}-secrets"]
    )


def test_rolling_scales_new_up_and_old_down_behind_one_service(kube: KubeWorld) -> None:
    first = kube.deploy("roll", "v1")
    old_name = f"hello-roll-{first.release}"
    kube.cluster.served.clear()
    replicas: list[tuple[int, int]] = []
    original = kube.cluster.apply

    def watching(obj: Any, **kwargs: Any) -> dict[str, Any]:
        done = original(obj, **kwargs)
        made = kube.deployments()
        replicas.append(
            tuple(  # type: ignore[arg-type]
                made[n]["spec"]["replicas"] if n in made else 0
                for n in (old_name, next((m for m in made if m != old_name), ""))
            )
        )
        return done

    kube.cluster.apply = watching  # type: ignore[method-assign]
    second = kube.deploy("roll", "v2")
    kube.cluster.apply = original  # type: ignore[method-assign]
    assert list(kube.deployments()) == [f"hello-roll-{second.release}"]
    assert kube.selector("roll")["castiron.dev/release"] == second.release
    # Ready pods behind the Service never fell below the release's 3.
    assert min(kube.cluster.served["hello-roll"]) >= 3
    # The new release went up one by one while the old one went down one by one.
    scales = [r for i, r in enumerate(replicas) if i == 0 or r != replicas[i - 1]]
    assert (3, 1) in scales and (2, 2) in scales and (1, 3) in scales
    rows = kube.world.store.list_instances("roll")
    assert {r.release for r in rows} == {second.release}


def _drift(kube: KubeWorld, tmp_path: Path) -> list[tuple[str, str, str]]:
    report = detect_drift(kube.engine().context, "blue", baselines=tmp_path / "drift")
    return [(f.kind, f.instance, f.path) for f in report.findings]


def _fix(kube: KubeWorld, tmp_path: Path) -> None:
    fix_drift(kube.engine().context, "blue", baselines=tmp_path / "drift")
    assert _drift(kube, tmp_path) == []


def test_no_drift_right_after_a_deploy(kube: KubeWorld, tmp_path: Path) -> None:
    kube.deploy("blue", "v1")
    assert _drift(kube, tmp_path) == []  # server-defaulted fields are not drift


def test_kubectl_scale_is_drift_and_fixed(kube: KubeWorld, tmp_path: Path) -> None:
    first = kube.deploy("blue", "v1")
    name = f"hello-blue-{first.release}"
    kube.cluster.kubectl_scale(NS, name, 5)
    found = _drift(kube, tmp_path)
    assert {p for _, _, p in found} == {"replicas"}
    _fix(kube, tmp_path)
    assert kube.deployments()[name]["spec"]["replicas"] == 3


def test_kubectl_set_image_is_drift_and_fixed(kube: KubeWorld, tmp_path: Path) -> None:
    first = kube.deploy("blue", "v1")
    name = f"hello-blue-{first.release}"
    kube.cluster.kubectl_set_image(NS, name, "evil/image:latest")
    assert {(k, p) for k, _, p in _drift(kube, tmp_path)} == {("image", "image")}
    _fix(kube, tmp_path)
    container = kube.deployments()[name]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] != "evil/image:latest"


@pytest.mark.parametrize(
    ("path", "value", "finding"),
    [
        (
            ("metadata", "labels", "castiron.dev/release"),
            "other",
            "metadata.labels.castiron.dev/release",
        ),
        (
            ("spec", "template", "spec", "containers"),
            None,  # the container's securityContext loosened by hand
            "spec.template.spec.containers[app].securityContext.readOnlyRootFilesystem",
        ),
        (
            ("spec", "template", "spec", "automountServiceAccountToken"),
            True,
            "spec.template.spec.automountServiceAccountToken",
        ),
    ],
)
def test_edits_of_castiron_fields_are_found_by_a_dry_run_diff(
    kube: KubeWorld, tmp_path: Path, path: tuple[str, ...], value: object, finding: str
) -> None:
    first = kube.deploy("blue", "v1")
    name = f"hello-blue-{first.release}"
    if value is None:
        containers = kube.deployments()[name]["spec"]["template"]["spec"]["containers"]
        containers[0]["securityContext"]["readOnlyRootFilesystem"] = False
        value = containers
    kube.cluster.kubectl_patch("Deployment", NS, name, path, value)
    found = _drift(kube, tmp_path)
    assert {(k, p) for k, _, p in found} >= {("config", f"Deployment {NS}/{name}: {finding}")}
    _fix(kube, tmp_path)


def test_a_label_added_by_hand_is_not_castiron_s_field(kube: KubeWorld, tmp_path: Path) -> None:
    first = kube.deploy("blue", "v1")
    kube.cluster.kubectl_label("Deployment", NS, f"hello-blue-{first.release}", "team", "web")
    assert _drift(kube, tmp_path) == []


def test_selector_elsewhere_and_objects_deleted_by_hand(kube: KubeWorld, tmp_path: Path) -> None:
    first = kube.deploy("blue", "v1")
    name = f"hello-blue-{first.release}"
    kube.cluster.kubectl_patch(
        "Service", NS, "hello-blue", ("spec", "selector", "castiron.dev/release"), "elsewhere"
    )
    assert {p for _, _, p in _drift(kube, tmp_path)} == {"route"}
    _fix(kube, tmp_path)
    assert kube.selector("blue")["castiron.dev/release"] == first.release
    kube.cluster.kubectl_delete("Secret", NS, f"{name}-secrets")
    assert any(p == f"Secret {NS}/{name}-secrets" for _, _, p in _drift(kube, tmp_path))
    _fix(kube, tmp_path)
    assert kube.cluster.get("Secret", NS, f"{name}-secrets") is not None
    kube.cluster.kubectl_delete("Deployment", NS, name)
    assert {p for _, _, p in _drift(kube, tmp_path)} >= {"state"}
    _fix(kube, tmp_path)
    assert kube.deployments()[name]["spec"]["replicas"] == 3
    kube.cluster.kubectl_delete("Service", NS, "hello-blue")
    assert _drift(kube, tmp_path) != []
    _fix(kube, tmp_path)
    assert kube.selector("blue")["castiron.dev/release"] == first.release


def test_canary_through_an_http_route_has_exact_weights(kube: KubeWorld) -> None:
    first = kube.deploy("gw", "v1")
    stable = f"hello-gw-{first.release}"
    route = kube.cluster.get("HTTPRoute", NS, "hello-gw")
    assert route is not None
    assert route["spec"]["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "edge",
            "namespace": "infra",
        }
    ]
    assert route["spec"]["hostnames"] == ["hello.example.com"]
    assert route_weights(route) == [(stable, 100)]
    seen: list[list[tuple[str, int]]] = []
    original = kube.cluster.apply

    def watching(obj: Any, **kwargs: Any) -> dict[str, Any]:
        done = original(obj, **kwargs)
        if obj["kind"] == "HTTPRoute":
            seen.append(route_weights(done))
        return done

    kube.cluster.apply = watching  # type: ignore[method-assign]
    second = kube.deploy("gw", "v2", APP_VERSION="2")
    kube.cluster.apply = original  # type: ignore[method-assign]
    canary = f"hello-gw-{second.release}"
    assert seen == [
        [(stable, 90), (canary, 10)],
        [(stable, 50), (canary, 50)],
        [(canary, 100)],
    ]
    # One Service per release behind the route; the stable Service on one release at a time.
    services = {s["metadata"]["name"] for s in kube.cluster.find("Service", NS, {})}
    assert services == {"hello-gw", stable, canary}
    assert kube.selector("gw")["castiron.dev/release"] == second.release


def test_http_route_weights_read_back_and_deleted_with_the_release(kube: KubeWorld) -> None:
    first = kube.deploy("gw", "v1")
    engine = kube.engine()
    rows = kube.world.store.list_instances("gw")
    observed = kube.driver.observe("hello", "gw")
    traffic = engine.traffic
    old = BackendSet(first.release, tuple(Backend(r.id, r.address) for r in rows))
    new_release = "f" * 16
    traffic.switch("gw", "", old, canary=BackendSet(new_release, ()), canary_weight=25)
    route = kube.cluster.get("HTTPRoute", NS, "hello-gw")
    assert route is not None
    assert route_weights(route) == [
        (f"hello-gw-{first.release}", 75),
        (f"hello-gw-{new_release}", 25),
    ]
    assert kube.selector("gw")["castiron.dev/release"] == first.release
    assert len(observed) == 3
    kube.driver.down("hello", "gw")
    assert kube.cluster.find("HTTPRoute", NS, {}) == []
    assert kube.cluster.find("Service", NS, {"castiron.dev/environment": "gw"}) == []


def _during_canary(kube: KubeWorld, stable: str, act: Any) -> list[float]:
    """Run ``act(canary_labels)`` once, two seconds into the canary's first step (when the
    Service selects both releases); returns the fake times at which the pods were touched."""
    done: list[float] = []
    time = kube.world.time
    started: list[float] = []
    tick = type(time).sleep

    def sleep(seconds: float) -> None:
        tick(time, seconds)
        svc = kube.cluster.get("Service", NS, "hello-can")
        if done or svc is None or "castiron.dev/release" in svc["spec"]["selector"]:
            return
        if not started:
            started.append(time.now)
        if time.now - started[0] >= 2.0:
            canary = {
                d["metadata"]["labels"]["castiron.dev/release"]
                for d in kube.cluster.find("Deployment", NS, {"castiron.dev/environment": "can"})
            } - {stable}
            act({"castiron.dev/environment": "can", "castiron.dev/release": canary.pop()})
            done.append(time.now)

    time.sleep = sleep  # type: ignore[method-assign]
    return done


def test_canary_with_healthy_pods_reaches_every_request(kube: KubeWorld) -> None:
    first = kube.deploy("can", "v1")
    second = kube.deploy("can", "v2", APP_VERSION="2")
    assert second.outcome == "succeeded"
    assert kube.selector("can")["castiron.dev/release"] == second.release
    steps = [s for s in kube.world.store.steps(second.deployment) if s.step == "analysis"]
    assert [s.data["verdict"] for s in steps] == ["passed", "passed"]
    assert f"hello-can-{first.release}" in kube.deployments()  # kept warm


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (
            "restart",
            r"pod hello-can-\w+-\w+-\w+ restarted 1 time\(s\) during the canary "
            r"\(exited with status 137\)",
        ),
        ("unready", r"pod hello-can-\w+-\w+-\w+ is not Ready"),
    ],
)
def test_canary_pod_restarted_or_unready_during_a_step_aborts(
    kube: KubeWorld, fault: str, reason: str
) -> None:
    first = kube.deploy("can", "v1")

    def act(labels: dict[str, str]) -> None:
        if fault == "restart":
            kube.cluster.restart_containers(NS, labels)
        else:
            kube.cluster.set_pods("starting", NS, labels)

    touched = _during_canary(kube, first.release, act)
    with pytest.raises(CanaryAbortedError, match=reason) as caught:
        kube.deploy("can", "v2", APP_VERSION="2")
    assert touched, "the canary never reached its first step"
    assert "aborted at step 1/2 (weight 10%)" in str(caught.value)
    # Back on the stable release alone; the canary's Deployment is gone.
    assert kube.selector("can")["castiron.dev/release"] == first.release
    assert list(kube.deployments()) == [f"hello-can-{first.release}"]
    env = kube.world.store.get_environment("can")
    assert env is not None and env.current_release == first.release


@pytest.mark.parametrize(
    ("path", "value", "finding"),
    [
        (("spec", "type"), "NodePort", "spec.type"),
        (
            ("spec", "ports"),
            [{"name": "http", "port": 8080, "targetPort": 8000, "protocol": "TCP"}],
            "spec.ports[http].port",
        ),
        (
            ("spec", "ports"),
            [
                {"name": "http", "port": 80, "targetPort": 8000, "protocol": "TCP"},
                {"name": "debug", "port": 9000, "targetPort": 9000, "protocol": "TCP"},
            ],
            "spec.ports[debug]",
        ),
        (("spec", "selector", "tier"), "canary", "spec.selector.tier"),
        (
            ("spec", "selector", "app.kubernetes.io/name"),
            "other",
            "spec.selector.app.kubernetes.io/name",
        ),
    ],
)
def test_service_edited_by_hand_is_drift_fixed_by_applying_it_again(
    kube: KubeWorld, tmp_path: Path, path: tuple[str, ...], value: object, finding: str
) -> None:
    first = kube.deploy("blue", "v1")
    before = kube.cluster.get("Service", NS, "hello-blue")
    assert before is not None
    kube.cluster.kubectl_patch("Service", NS, "hello-blue", path, value)
    found = _drift(kube, tmp_path)
    assert ("config", "-", f"Service {NS}/hello-blue: {finding}") in found
    _fix(kube, tmp_path)
    after = kube.cluster.get("Service", NS, "hello-blue")
    assert after is not None
    for key in ("type", "ports", "selector"):
        assert after["spec"][key] == before["spec"][key]
    assert after["spec"]["selector"]["castiron.dev/release"] == first.release
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # applied, not re-created
    assert kube.deployments()  # no instance was replaced for it
    assert {r.id for r in kube.world.store.list_instances("blue")} == {
        o.instance.id for o in kube.driver.observe("hello", "blue")
    }


@pytest.mark.parametrize(("value", "outcome"), [(0.001, "succeeded"), (0.2, "aborted")])
def test_canary_judged_by_prometheus_without_counted_requests(
    kube: KubeWorld, prometheus: FakePrometheus, value: float, outcome: str
) -> None:
    query = 'errors{release="$RELEASE",env="$ENVIRONMENT"}'
    spec = kube.world.root / "castiron.yaml"
    spec.write_text(
        spec.read_text().replace(
            "strategy: {type: canary, steps: [{weight: 10, pause: 3s}, {weight: 50, pause: 3s}]}",
            "strategy: {type: canary, steps: [{weight: 10, pause: 3s}, {weight: 50, pause: 3s}], "
            f"analysis: {{prometheus: {{url: '{prometheus.url}', query: '{query}', max: 0.01}}}}}}",
        )
    )
    first = kube.deploy("can", "v1")
    kube.world.environ["APP_VERSION"] = "2"
    engine = kube.engine()
    target = engine.resolve(kube.world.spec(), "can", "v2")
    asked = f'errors{{release="{target.release.id}",env="can"}}'
    prometheus.answers[asked] = vector(value)
    if outcome == "aborted":
        with pytest.raises(CanaryAbortedError, match=r"= 0\.2 > max 0\.01"):
            engine.deploy(target)
        assert kube.selector("can")["castiron.dev/release"] == first.release
        assert prometheus.queries == [asked]  # at the end of the first step
    else:
        assert engine.deploy(target).outcome == "succeeded"
        assert kube.selector("can")["castiron.dev/release"] == target.release.id
        assert prometheus.queries == [asked, asked]  # one per step
