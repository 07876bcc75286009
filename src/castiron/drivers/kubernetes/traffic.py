"""The Kubernetes traffic controller: the environment's Service selector is the switch.

Owns how the engine's traffic moves on a cluster: :meth:`KubernetesTraffic.switch` applies the
environment's stable Service (server-side, castiron's field manager) with a selector naming the
serving release, so the endpoints controller moves traffic to that release's *ready* pods only;
a canary with a weight above 0 selects every pod of the environment (replica-ratio weights);
:meth:`~KubernetesTraffic.flip` is a warm rollback (the selector flips back, after checking the
Service still serves the expected release and the warm pods are Ready);
:meth:`~KubernetesTraffic.current` reads the selector back, so a second machine sees the truth.

The Service is the only object it writes. It reaches the cluster through the driver's client
factory and knows nothing of the spec, the engine or the state store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from castiron.drivers.kubernetes.driver import KubernetesDriver
from castiron.drivers.kubernetes.manifests import (
    LABEL_ENVIRONMENT,
    LABEL_MANAGED_BY,
    LABEL_RELEASE,
    MANAGER,
    service,
)
from castiron.errors import RouterError
from castiron.model import HealthCheck
from castiron.traffic.base import Backend, BackendSet, Limits, ReleaseCounters, Stickiness
from castiron.traffic.controller import FlipOutcome, Routing


@dataclass
class KubernetesTraffic:
    """Moves environments' traffic by the selector of their stable Service."""

    driver: KubernetesDriver
    app_of: Callable[[str], str]
    """The app an environment belongs to (for its Service's name and labels)."""
    port_of: Callable[[str], int]
    """The port the app listens on in an environment (the Service's target port)."""

    def _apply(self, environment: str, release: str | None) -> None:
        options = self.driver.options_for(environment)
        obj = service(
            self.app_of(environment), environment, release, self.port_of(environment), options
        )
        api = self.driver.client(options)
        found = api.get("Service", options.namespace, obj["metadata"]["name"])
        if (
            found is not None
            and (found.get("metadata") or {}).get("labels", {}).get(LABEL_MANAGED_BY) != MANAGER
        ):
            raise RouterError(
                f"environment {environment!r}: Service {options.namespace}/"
                f"{obj['metadata']['name']} was not created by castiron; leaving it alone"
            )
        api.apply(obj)

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
        # ``limits`` and ``access_log`` configure castiron's own router; a Service has neither
        # (a cluster's ingress or Gateway sets body limits and keeps access logs).
        both = canary is not None and canary_weight > 0
        release = None if both else stable.release
        if canary is not None and canary_weight >= 100:
            release = canary.release
        self._apply(environment, release)

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
        previous = self.current(environment)
        serving = previous.stable.release if previous and previous.stable else None
        if serving != expect:
            why = f"Service serves {serving or 'nothing'}, expected {expect or 'nothing'}"
            return FlipOutcome(False, why, previous)
        for backend in stable.backends:
            ready, detail = self.driver.readiness(backend.address)
            if not ready:
                return FlipOutcome(False, f"{backend.id}: {detail}", previous)
        self._apply(environment, stable.release)
        return FlipOutcome(True, "", previous)

    def remove(self, environment: str) -> bool:
        options = self.driver.options_for(environment)
        name = options.service_for(self.app_of(environment), environment)
        api = self.driver.client(options)
        found = api.get("Service", options.namespace, name)
        if found is None:
            return False
        if (found.get("metadata") or {}).get("labels", {}).get(LABEL_MANAGED_BY) != MANAGER:
            return False
        return api.delete("Service", options.namespace, name)

    def current(self, environment: str) -> Routing | None:
        options = self.driver.options_for(environment)
        app = self.app_of(environment)
        name = options.service_for(app, environment)
        found = self.driver.client(options).get("Service", options.namespace, name)
        if found is None:
            return None
        selector: Mapping[str, str] = (found.get("spec") or {}).get("selector") or {}
        if selector.get(LABEL_ENVIRONMENT) != environment:
            return Routing(environment, _listen(options.namespace, name), None)
        observed = self.driver.observe(app, environment)
        release = selector.get(LABEL_RELEASE)
        if release is None:  # a canary: every release of the environment takes traffic
            by_release: dict[str, list[Backend]] = {}
            for o in observed:
                by_release.setdefault(o.instance.release, []).append(
                    Backend(o.instance.id, o.instance.address)
                )
            releases = sorted(by_release)
            if not releases:
                return Routing(environment, _listen(options.namespace, name), None)
            first = BackendSet(releases[0], tuple(by_release[releases[0]]))
            second = (
                BackendSet(releases[1], tuple(by_release[releases[1]]))
                if len(releases) > 1
                else None
            )
            return Routing(
                environment,
                _listen(options.namespace, name),
                first,
                second,
                50 if second is not None else 0,
            )
        backends = tuple(
            Backend(o.instance.id, o.instance.address)
            for o in observed
            if o.instance.release == release
        )
        return Routing(environment, _listen(options.namespace, name), BackendSet(release, backends))

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """None: a Service keeps no per-release counters (canary analysis reads Prometheus
        or pod readiness and restarts)."""
        return []


def _listen(namespace: str, name: str) -> str:
    return f"service/{namespace}/{name}"


__all__ = ["KubernetesTraffic"]
