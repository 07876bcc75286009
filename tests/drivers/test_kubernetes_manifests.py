"""The Kubernetes manifest builders: golden cases, and every object valid on 1.25-1.33.

Each ``kubernetes_cases/*.json`` holds ``{"spec": …, "options": …, "expected": [objects]}``;
``CASTIRON_UPDATE_GOLDEN=1`` rewrites ``expected`` from the builders (review the diff).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from castiron.drivers.kubernetes.manifests import (
    KubernetesOptions,
    deployment,
    dump,
    http_route,
    release_name,
    release_service,
    route_weights,
    scale,
    secret,
    service,
    wanted_instances,
)
from castiron.errors import RuntimeDriverError
from castiron.model import Digest, HealthCheck, ImageRef, InstanceSpec, ReleaseId

CASES = Path(__file__).parent / "kubernetes_cases"
VERSIONS = [f"1.{minor}.0" for minor in range(25, 34)]
DIGEST = Digest("sha256:" + "1" * 64)
CONFIG = Digest("sha256:" + "2" * 64)


def _spec(data: dict[str, Any]) -> InstanceSpec:
    return InstanceSpec(
        id=data["id"],
        app=data["app"],
        environment=data["environment"],
        release=ReleaseId(data["release"]),
        image=ImageRef(DIGEST, CONFIG, Path("/nonexistent")),
        command=tuple(data.get("command", ())),
        env=dict(data.get("env", {})),
        workdir=data.get("workdir", "/app"),
        port=int(data.get("port", 8000)),
        user=data.get("user"),
        secret_names=frozenset(data.get("secret_names", ())),
        writable=tuple(data.get("writable", ())),
        memory=data.get("memory"),
        cpus=data.get("cpus"),
        labels=dict(data.get("labels", {})),
        health=HealthCheck(**data["health"]) if "health" in data else None,
    )


def _objects(case: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _spec(case["spec"])
    options = KubernetesOptions.from_json(case.get("options", {}))
    held = secret(spec, options)
    out = [] if held is None else [held]
    out.append(deployment(spec, options))
    out.append(service(spec.app, spec.environment, spec.release, spec.port or 8000, options))
    return out


def _case_files() -> list[Path]:
    return sorted(CASES.glob("*.json"))


@pytest.mark.parametrize("path", _case_files(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    built = _objects(case)
    if os.environ.get("CASTIRON_UPDATE_GOLDEN") == "1":
        case["expected"] = built
        path.write_text(json.dumps(case, indent=2, sort_keys=True) + "\n")
    assert built == case["expected"]


@pytest.mark.parametrize("path", _case_files(), ids=lambda p: p.stem)
@pytest.mark.parametrize("version", VERSIONS)
def test_valid_on_current_kubernetes(path: Path, version: str) -> None:
    for obj in _objects(json.loads(path.read_text())):
        kubernetes_validate.validate(obj, version, strict=True)


def test_only_core_and_apps_v1() -> None:
    kinds = {
        (obj["apiVersion"], obj["kind"])
        for path in _case_files()
        for obj in _objects(json.loads(path.read_text()))
    }
    assert kinds == {("v1", "Secret"), ("apps/v1", "Deployment"), ("v1", "Service")}


def test_dump_is_byte_stable() -> None:
    case = json.loads((CASES / "secrets-and-limits.json").read_text())
    assert dump(_objects(case)) == dump(_objects(json.loads(json.dumps(case))))
    assert dump(_objects(case)).startswith("---\n{\n")


def test_secret_values_only_in_the_secret() -> None:
    case = json.loads((CASES / "secrets-and-limits.json").read_text())
    objects = _objects(case)
    held, made = objects[0], objects[1]
    assert held["stringData"] == {"DB_PASSWORD": "hunter2"}
    assert "hunter2" not in json.dumps(made)
    env = made["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "DB_PASSWORD",
        "valueFrom": {
            "secretKeyRef": {"name": "hello-prod-9f8e7d6c5b4a3f2e-secrets", "key": "DB_PASSWORD"}
        },
    } in env
    assert held["metadata"]["name"] == "hello-prod-9f8e7d6c5b4a3f2e-secrets"


def test_one_deployment_per_release() -> None:
    case = json.loads((CASES / "secrets-and-limits.json").read_text())
    one = _spec({**case["spec"], "id": "first"})
    two = _spec({**case["spec"], "id": "second"})
    options = KubernetesOptions.from_json(case.get("options", {}))
    made = deployment(one, options)
    assert made == deployment(two, options)  # the instance is not in the Deployment
    assert made["metadata"]["name"] == "hello-prod-9f8e7d6c5b4a3f2e"
    assert "replicas" not in made["spec"]  # the scale's own field manager sets them
    assert made["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "castiron",
        "app.kubernetes.io/name": "hello",
        "castiron.dev/environment": "prod",
        "castiron.dev/release": "9f8e7d6c5b4a3f2e",
    }
    assert deployment(one, options, replicas=3)["spec"]["replicas"] == 3


def test_release_name_fits_a_dns_label() -> None:
    release = "0123456789abcdef"
    assert release_name("hello", "prod", release) == f"hello-prod-{release}"
    long = release_name("a" * 80, "production", release)
    assert len(long) == 63 and long.endswith(f"-{release}")
    assert release_name("a" * 45 + "-", "x", release) == "a" * 45 + f"-{release}"


def test_scale_names_the_wanted_instances() -> None:
    made = scale("hello-prod-r", "web", ["i-1", "i-2"], "42")
    assert made == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "hello-prod-r",
            "namespace": "web",
            "annotations": {"castiron.dev/instances": "i-1,i-2"},
            "resourceVersion": "42",
        },
        "spec": {"replicas": 2},
    }
    assert wanted_instances(made) == ["i-1", "i-2"]
    assert wanted_instances(scale("d", "web", [])) == []


def test_canary_selector_spans_releases() -> None:
    made = service("hello", "prod", None, 8000, KubernetesOptions())
    assert made["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "castiron",
        "app.kubernetes.io/name": "hello",
        "castiron.dev/environment": "prod",
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("memory", "lots", "prod/i-1: memory: not a size: 'lots'"),
        ("cpus", 0.0, "prod/i-1: cpus must be more than 0, not 0.0"),
        (
            "writable",
            ["relative"],
            "prod/i-1: writable path 'relative' must be an absolute path below '/'",
        ),
    ],
)
def test_bad_values_name_the_instance(field: str, value: object, message: str) -> None:
    data: dict[str, Any] = {"id": "i-1", "app": "hello", "environment": "prod", "release": "r"}
    data[field] = value
    with pytest.raises(RuntimeDriverError) as caught:
        deployment(_spec(data), KubernetesOptions())
    assert str(caught.value) == message


GATEWAY = KubernetesOptions(
    namespace="web", gateway="edge", gateway_namespace="infra", hostnames=("hello.example.com",)
)

HTTP_ROUTE_SCHEMA: dict[str, Any] = {
    # The fields castiron writes, with the constraints of the Gateway API's v1 HTTPRoute
    # (kubernetes-validate has no schema for it: it is not part of Kubernetes itself).
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "group": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "namespace": {"type": "string", "minLength": 1, "maxLength": 63},
                        },
                    },
                },
                "hostnames": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
                "rules": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "backendRefs": {
                                "type": "array",
                                "maxItems": 16,
                                "items": {
                                    "type": "object",
                                    "required": ["name", "port"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "group": {"type": "string"},
                                        "kind": {"type": "string"},
                                        "name": {"type": "string", "minLength": 1},
                                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                        "weight": {
                                            "type": "integer",
                                            "minimum": 0,
                                            "maximum": 1000000,
                                        },
                                    },
                                },
                            }
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("version", VERSIONS)
def test_release_services_are_valid_on_current_kubernetes(version: str) -> None:
    made = release_service("hello", "prod", "0123456789abcdef", 8000, GATEWAY)
    assert made["metadata"]["name"] == "hello-prod-0123456789abcdef"
    assert made["spec"]["selector"]["castiron.dev/release"] == "0123456789abcdef"
    kubernetes_validate.validate(made, version, strict=True)


def test_http_route_splits_by_exact_weights() -> None:
    made = http_route("hello", "prod", [("aaaa", 90), ("bbbb", 10)], GATEWAY)
    jsonschema.validate(made, HTTP_ROUTE_SCHEMA)
    assert made["metadata"] == {
        "name": "hello-prod",
        "namespace": "web",
        "labels": {
            "app.kubernetes.io/managed-by": "castiron",
            "app.kubernetes.io/name": "hello",
            "castiron.dev/environment": "prod",
        },
    }
    assert made["spec"]["parentRefs"][0]["namespace"] == "infra"
    assert route_weights(made) == [("hello-prod-aaaa", 90), ("hello-prod-bbbb", 10)]
    assert made["spec"]["rules"][0]["backendRefs"][0]["port"] == 80
    with pytest.raises(RuntimeDriverError, match="weight 101"):
        http_route("hello", "prod", [("aaaa", 101)], GATEWAY)
    with pytest.raises(RuntimeDriverError, match="no Gateway"):
        http_route("hello", "prod", [("aaaa", 100)], KubernetesOptions())


def test_gateway_options_round_trip_and_leave_older_releases_alone() -> None:
    assert KubernetesOptions.from_json(GATEWAY.to_json()) == GATEWAY
    assert "gateway" not in KubernetesOptions().to_json()  # release ids made before stay
