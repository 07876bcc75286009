"""The Kubernetes driver on the in-memory cluster: one Deployment per release whose pods are the
instances, scaled by their own field manager, every call on the environment's context."""

from __future__ import annotations

from pathlib import Path

import pytest

from castiron.drivers.kubernetes.driver import (
    KubernetesDriver,
    address_of,
    differences,
    parse_address,
)
from castiron.drivers.kubernetes.fake import FakeCluster
from castiron.drivers.kubernetes.manifests import KubernetesOptions
from castiron.errors import RuntimeDriverError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, ReleaseId

IMAGE = ImageRef(Digest("sha256:" + "1" * 64), Digest("sha256:" + "2" * 64), Path("/nonexistent"))
NS = "web"
DEPLOYMENT = "hello-prod-r1"


def _spec(instance: str, release: str = "r1", **env: str) -> InstanceSpec:
    return InstanceSpec(
        id=instance,
        app="hello",
        environment="prod",
        release=ReleaseId(release),
        image=IMAGE,
        command=("serve",),
        env={"DB_PASSWORD": "hunter2", **env},
        workdir="/app",
        port=8000,
        secret_names=frozenset({"DB_PASSWORD"}),
    )


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(context="prod-cluster")


@pytest.fixture
def driver(cluster: FakeCluster) -> KubernetesDriver:
    options = {"prod": KubernetesOptions(namespace=NS, context="prod-cluster")}

    def client(o: KubernetesOptions) -> FakeCluster:
        assert o.context == "prod-cluster", f"a call without the environment's context: {o}"
        return cluster

    return KubernetesDriver(client=client, options=options)


def test_instances_are_pods_of_one_deployment_per_release(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    one = driver.create(_spec("i-1"))
    two = driver.create(_spec("i-2"))
    assert one.handle == two.handle == f"{NS}/{DEPLOYMENT}"
    assert one.address == f"k8s://{NS}/{DEPLOYMENT}/i-1:8000"
    made = cluster.get("Deployment", NS, DEPLOYMENT)
    assert made is not None
    assert made["spec"]["replicas"] == 2
    assert made["metadata"]["annotations"]["castiron.dev/instances"] == "i-1,i-2"
    assert len(cluster.find("Pod", NS, {"castiron.dev/release": "r1"})) == 2
    # The scale has its own field manager; the body is castiron's.
    managers = [c[3] for c in cluster.calls if c[0] == "apply" and c[1] == "Deployment"]
    assert managers == ["castiron", "castiron-scale", "castiron", "castiron-scale"]
    assert "replicas" not in {
        p[-1] for p in cluster.owners[("Deployment", NS, DEPLOYMENT)]["castiron"]
    }
    # One Secret for the release.
    secrets = cluster.find("Secret", NS, {})
    assert [s["metadata"]["name"] for s in secrets] == [f"{DEPLOYMENT}-secrets"]
    observed = driver.observe("hello", "prod")
    assert [o.instance.id for o in observed] == ["i-1", "i-2"]
    assert {o.config["pod"] for o in observed} == {
        p["metadata"]["name"] for p in cluster.find("Pod", NS, {})
    }
    assert all(o.state == "running" and not o.stray for o in observed)


def test_destroy_scales_down_then_deletes_with_the_secret(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    one = driver.create(_spec("i-1"))
    two = driver.create(_spec("i-2"))
    driver.destroy(one, grace=1.0)
    made = cluster.get("Deployment", NS, DEPLOYMENT)
    assert made is not None and made["spec"]["replicas"] == 1
    assert made["metadata"]["annotations"]["castiron.dev/instances"] == "i-2"
    assert len(cluster.find("Pod", NS, {})) == 1
    assert driver.inspect(one).state == "missing"
    driver.destroy(two, grace=1.0)
    assert cluster.get("Deployment", NS, DEPLOYMENT) is None
    assert cluster.find("Secret", NS, {}) == []
    assert cluster.find("Pod", NS, {}) == []


def test_readiness_counts_ready_pods_by_rank(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    cluster.pod_outcome = lambda _pod: "starting"
    driver.readiness_ttl = 0.0
    one = driver.create(_spec("i-1"))
    two = driver.create(_spec("i-2"))
    assert driver.readiness(one.address) == (False, "not ready")
    pods = cluster.find("Pod", NS, {})
    cluster.set_pods(
        "ready", NS, {"pod-template-hash": pods[0]["metadata"]["labels"]["pod-template-hash"]}
    )
    assert driver.readiness(one.address)[0] and driver.readiness(two.address)[0]
    assert driver.readiness("127.0.0.1:80") == (False, "127.0.0.1:80: not a pod address")
    assert driver.readiness(f"k8s://{NS}/{DEPLOYMENT}/i-9:8000")[1].startswith("not an instance")


def test_a_crashing_pod_is_an_exited_instance(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    cluster.pod_outcome = lambda _pod: "crash"
    made = driver.create(_spec("i-1"))
    observed = driver.inspect(made)
    assert observed.state == "exited" and observed.exit_code == 1
    assert driver.readiness(made.address) == (False, "CrashLoopBackOff: back-off")


def test_a_concurrent_change_is_read_again_not_overwritten(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    driver.create(_spec("i-1"))
    stale = cluster.get("Deployment", NS, DEPLOYMENT)
    driver.create(_spec("i-2"))  # someone else scaled it since `stale` was read
    assert stale is not None
    left = driver._scale(cluster, NS, DEPLOYMENT, add="i-3", read=stale)
    assert left == ["i-1", "i-2", "i-3"]
    made = cluster.get("Deployment", NS, DEPLOYMENT)
    assert made is not None and made["spec"]["replicas"] == 3


def test_ids_are_never_reused_and_foreign_objects_are_left_alone(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    driver.create(_spec("i-1"))
    with pytest.raises(RuntimeDriverError, match="i-1 exists already"):
        driver.create(_spec("i-1"))
    cluster.kubectl_label("Deployment", NS, DEPLOYMENT, "app.kubernetes.io/managed-by", "helm")
    with pytest.raises(RuntimeDriverError, match="not created by castiron"):
        driver.create(_spec("i-2"))


def test_a_deployment_wanting_no_instance_is_a_stray_destroy_removes(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    made = driver.create(_spec("i-1"))
    cluster.kubectl_patch(
        "Deployment", NS, DEPLOYMENT, ("metadata", "annotations", "castiron.dev/instances"), ""
    )
    (left,) = driver.observe("hello", "prod")
    assert left.stray and left.instance.id == DEPLOYMENT
    driver.destroy(left.instance, grace=1.0)
    assert cluster.get("Deployment", NS, DEPLOYMENT) is None
    driver.destroy(made, grace=1.0)  # gone already: not an error


def test_a_deployment_of_an_earlier_version_is_read_and_destroyed(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "old-1",
                "namespace": NS,
                "labels": {
                    "app.kubernetes.io/managed-by": "castiron",
                    "app.kubernetes.io/name": "hello",
                    "castiron.dev/environment": "prod",
                    "castiron.dev/release": "r0",
                    "castiron.dev/instance": "old-1",
                },
                "annotations": {"castiron.dev/image": IMAGE.digest, "castiron.dev/port": "8000"},
            },
            "spec": {
                "selector": {"matchLabels": {"castiron.dev/instance": "old-1"}},
                "template": {
                    "metadata": {"labels": {"castiron.dev/instance": "old-1"}},
                    "spec": {"containers": [{"name": "app", "image": "x"}]},
                },
            },
        }
    )
    (old,) = driver.observe("hello", "prod")
    assert old.instance.id == "old-1" and old.instance.handle == f"{NS}/old-1"
    legacy = Instance(
        "old-1",
        "hello",
        "prod",
        ReleaseId("r0"),
        "kubernetes",
        f"k8s://{NS}/old-1:8000",
        f"{NS}/old-1",
        IMAGE.digest,
    )
    assert driver.readiness(legacy.address)[0]
    driver.destroy(legacy, grace=1.0)
    assert cluster.get("Deployment", NS, "old-1") is None


def test_addresses_are_stable_and_parse_back() -> None:
    assert address_of("ns", "dep", "i-1", 8000) == "k8s://ns/dep/i-1:8000"
    assert parse_address("k8s://ns/dep/i-1:8000") == ("ns", "dep", "i-1")
    assert parse_address("k8s://ns/old:8000") == ("ns", "old", "old")
    assert parse_address("k8s://ns:8000") is None
    assert parse_address("127.0.0.1:8000") is None


def test_a_bare_address_reaches_the_context_of_its_environment(cluster: FakeCluster) -> None:
    options = {"prod": KubernetesOptions(namespace=NS, context="prod-cluster")}
    seen: list[str | None] = []

    def client(o: KubernetesOptions) -> FakeCluster:
        seen.append(o.context)
        return cluster

    first = KubernetesDriver(client=client, options=options)
    made = first.create(_spec("i-1"))
    # A second process (a warm rollback) knows the address only.
    second = KubernetesDriver(client=client, options=options)
    seen.clear()
    assert second.readiness(made.address)[0]
    assert second.logs(made, 5).startswith("pod hello-prod-r1-")
    assert seen and set(seen) == {"prod-cluster"}


def test_differences_compare_named_lists_by_name_and_skip_server_fields() -> None:
    want = {
        "metadata": {"name": "d", "resourceVersion": "1", "labels": {"a": "1"}},
        "spec": {"containers": [{"name": "app", "env": [{"name": "X", "value": "1"}]}]},
        "status": {"replicas": 1},
    }
    have = {
        "metadata": {"name": "d", "resourceVersion": "9", "labels": {"a": "2"}},
        "spec": {
            "containers": [
                {"name": "app", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]}
            ]
        },
        "status": {"replicas": 3},
    }
    assert differences(want, have) == [
        ("metadata.labels.a", "1", "2"),
        ("spec.containers[app].env[Y]", None, {"name": "Y", "value": "2"}),
    ]
    assert differences({"args": ["a", "b"]}, {"args": ["a", "c"]}) == [("args[1]", "b", "c")]
    assert differences({"args": ["a"]}, {"args": ["a", "c"]}) == [("args", ["a"], ["a", "c"])]


def test_live_diff_is_a_dry_run_that_writes_nothing(
    driver: KubernetesDriver, cluster: FakeCluster
) -> None:
    driver.create(_spec("i-1"))
    assert driver.live_diff(_spec("drift")) == []  # defaults cancel out
    before = cluster.get("Deployment", NS, DEPLOYMENT)
    cluster.kubectl_patch(
        "Deployment", NS, DEPLOYMENT, ("spec", "template", "spec", "enableServiceLinks"), True
    )
    (diff,) = driver.live_diff(_spec("drift"))
    assert (diff.target, diff.path, diff.want, diff.have) == (
        f"Deployment {NS}/{DEPLOYMENT}",
        "spec.template.spec.enableServiceLinks",
        False,
        True,
    )
    after = cluster.get("Deployment", NS, DEPLOYMENT)
    assert after is not None and before is not None
    assert after["spec"]["template"]["spec"]["enableServiceLinks"] is True  # not applied
    cluster.kubectl_delete("Secret", NS, f"{DEPLOYMENT}-secrets")
    assert [d.target for d in driver.live_diff(_spec("drift"))][-1] == (
        f"Secret {NS}/{DEPLOYMENT}-secrets"
    )


def _pod(phase: str, waiting: str | None = None) -> dict[str, object]:
    state = {"waiting": {"reason": waiting, "message": "…"}} if waiting else {"running": {}}
    return {
        "metadata": {"name": "p"},
        "status": {"phase": phase, "containerStatuses": [{"name": "app", "state": state}]},
    }


@pytest.mark.parametrize(
    ("pod", "state"),
    [
        # the kubelet retries it: right after a release's Secret is created, a node under load
        # shows "failed to sync secret cache" for a while, then starts the container
        (_pod("Pending", "CreateContainerConfigError"), "starting"),
        (_pod("Pending", "ContainerCreating"), "starting"),
        (_pod("Running", "CrashLoopBackOff"), "exited"),
        (_pod("Pending", "ErrImageNeverPull"), "exited"),
        (_pod("Failed"), "exited"),
        (_pod("Running"), "running"),
    ],
)
def test_a_pod_state_is_terminal_only_when_it_will_not_come_up_by_itself(
    pod: dict[str, object], state: str
) -> None:
    from castiron.drivers.kubernetes.driver import _state

    assert _state([pod]) == state
