"""The ``kubernetes:`` section of an environment: defaults, and located errors."""

from __future__ import annotations

import pytest

from castiron.drivers.kubernetes.manifests import KubernetesOptions
from castiron.engine.release import (
    release_config,
    release_from_json,
    release_to_json,
    resolve_release,
)
from castiron.errors import SpecError
from castiron.model import Digest
from castiron.spec.load import load_spec_text

HEAD = "app: hello\nenvironments:\n  k:\n    runtime: kubernetes\n    listen: 127.0.0.1:8080\n"


def _issues(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "castiron.yaml", {})
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            HEAD + "    kubernetes:\n      namespace: Bad_NS\n",
            "castiron.yaml:7:18: environments.k.kubernetes.namespace: 'Bad_NS' is not a "
            "Kubernetes name (1-63 lowercase letters, digits and '-')",
            id="namespace",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      servce: {}\n",
            "castiron.yaml:7:7: environments.k.kubernetes.servce: unknown key 'servce'; "
            "did you mean 'service'?",
            id="unknown-key",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      service: {type: External}\n",
            "castiron.yaml:7:23: environments.k.kubernetes.service.type: must be one of "
            "'ClusterIP', 'NodePort' or 'LoadBalancer'",
            id="service-type",
        ),
        pytest.param(
            HEAD.replace("kubernetes", "docker") + "    kubernetes: {namespace: web}\n",
            "castiron.yaml:6:17: environments.k.kubernetes: only for runtime: kubernetes "
            "(this environment's runtime is docker)",
            id="other-runtime",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      gateway: {name: edge, hostnames: [Bad_Host]}\n",
            "castiron.yaml:7:41: environments.k.kubernetes.gateway.hostnames.0: 'Bad_Host' is "
            "not a hostname such as app.example.com",
            id="gateway-hostname",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      gateway: {namespace: infra}\n",
            "castiron.yaml:7:16: environments.k.kubernetes.gateway: missing required key 'name'",
            id="gateway-name",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      resources: {cpu: lots}\n",
            "castiron.yaml:7:24: environments.k.kubernetes.resources.cpu: 'lots' is not a "
            "Kubernetes quantity such as 250m or 128Mi",
            id="quantity",
        ),
        pytest.param(
            HEAD + "    kubernetes:\n      service: {port: 0}\n",
            "castiron.yaml:7:23: environments.k.kubernetes.service.port: must be a port "
            "number from 1 to 65535",
            id="service-port",
        ),
        pytest.param(
            HEAD + "    strategy:\n      type: canary\n      steps: [{weight: 10}]\n"
            "      analysis: {max_error_rate: 0.01}\n",
            "castiron.yaml:9:34: environments.k.strategy.analysis.max_error_rate: a Kubernetes "
            "Service counts no requests; judge error rate and latency with "
            "analysis.prometheus (the canary's pods' readiness and restarts are always judged)",
            id="canary-error-rate",
        ),
        pytest.param(
            HEAD + "    strategy:\n      type: canary\n      steps: [{weight: 10}]\n"
            "      analysis: {http: [/ready]}\n",
            "castiron.yaml:9:24: environments.k.strategy.analysis.http: pods are not reachable "
            "from castiron's host; judge error rate and latency with analysis.prometheus "
            "(the canary's pods' readiness and restarts are always judged)",
            id="canary-http",
        ),
    ],
)
def test_located_errors(text: str, expected: str) -> None:
    assert _issues(text) == [expected]


def test_defaults_and_release_round_trip() -> None:
    loaded = load_spec_text(HEAD, "castiron.yaml", {})
    config = release_config(loaded, "k")
    assert config.kubernetes == KubernetesOptions()
    release = resolve_release(loaded, "k", Digest("sha256:" + "a" * 64))
    assert release_from_json(release_to_json(release)) == release


def test_section_is_carried_into_the_release() -> None:
    text = HEAD + (
        "    kubernetes:\n      namespace: web\n      service: {name: front, port: 8080}\n"
        "      node_selector: {kubernetes.io/os: linux}\n"
        "      resources: {cpu: 100m, memory: 64Mi}\n"
    )
    config = release_config(load_spec_text(text, "castiron.yaml", {}), "k")
    assert config.kubernetes == KubernetesOptions(
        namespace="web",
        service_name="front",
        service_port=8080,
        node_selector=(("kubernetes.io/os", "linux"),),
        cpu_request="100m",
        memory_request="64Mi",
    )


def test_other_runtimes_release_ids_do_not_change() -> None:
    text = "app: hello\nenvironments:\n  s: {listen: 127.0.0.1:8080}\n"
    config = release_config(load_spec_text(text, "castiron.yaml", {}), "s")
    assert config.kubernetes is None
    assert "kubernetes" not in config.to_json()


def test_a_kubernetes_canary_is_judged_by_prometheus() -> None:
    text = (
        HEAD + "    strategy:\n      type: canary\n      steps: [{weight: 10}]\n"
        "      analysis:\n        prometheus: {url: 'http://p:9090', query: up, max: 1}\n"
    )
    spec = load_spec_text(text, "castiron.yaml", {})
    analysis = spec.environments["k"].strategy.analysis
    assert analysis is not None and len(analysis.prometheus) == 1
