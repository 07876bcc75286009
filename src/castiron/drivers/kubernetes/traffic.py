"""The Kubernetes traffic controller: the environment's Service selector is the switch.

Owns how the engine's traffic moves on a cluster: :meth:`KubernetesTraffic.switch` applies the
environment's stable Service (server-side, castiron's field manager) with a selector naming the
serving release, so the endpoints controller moves traffic to that release's *ready* pods only;
a canary with a weight above 0 selects every pod of the environment (replica-ratio weights),
unless the environment names a Gateway API Gateway: then each release has a Service of its own
and the environment's HTTPRoute sends the canary exactly its weight (``backendRefs`` weights),
while the stable Service keeps selecting the stable release;
:meth:`~KubernetesTraffic.flip` is a warm rollback (the selector flips back, after checking the
Service still serves the expected release and the warm pods are Ready);
:meth:`~KubernetesTraffic.current` reads the selector back, so a second machine sees the truth;
:meth:`~KubernetesTraffic.route_diff` compares the fields castiron sets on the stable Service
(type, ports, selector: :func:`service_differences`) with the live one, for drift; applying a
Service removes selector keys and ports someone else added (with a merge patch guarded by the
resourceVersion: server-side apply alone shares, and so keeps, a field another manager set).

The Services and the HTTPRoute are the only objects it writes. It reaches the cluster through
the driver's client factory and knows nothing of the spec, the engine or the state store.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from castiron.drivers.kubernetes.driver import KubernetesDriver
from castiron.drivers.kubernetes.manifests import (
    LABEL_ENVIRONMENT,
    LABEL_MANAGED_BY,
    LABEL_RELEASE,
    MANAGER,
    http_route,
    release_name,
    release_service,
    route_weights,
    service,
)
from castiron.errors import RouterError
from castiron.model import HealthCheck, Observed
from castiron.traffic.base import Backend, BackendSet, Limits, ReleaseCounters, Stickiness
from castiron.traffic.controller import FlipOutcome, RouteDifference, Routing


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
        self._apply_ours(environment, obj)

    def _apply_ours(self, environment: str, obj: dict[str, Any]) -> None:
        options = self.driver.options_for(environment)
        api = self.driver.client(options)
        kind, name = obj["kind"], obj["metadata"]["name"]
        found = api.get(kind, options.namespace, name)
        if (
            found is not None
            and (found.get("metadata") or {}).get("labels", {}).get(LABEL_MANAGED_BY) != MANAGER
        ):
            raise RouterError(
                f"environment {environment!r}: {kind} {options.namespace}/{name} was not "
                "created by castiron; leaving it alone"
            )
        applied = api.apply(obj)
        if kind == "Service" and service_differences(obj, applied, exact=True):
            # Selector keys or ports another field manager added survive a server-side apply
            # of castiron's own (the server shares, never drops, a field another manager set):
            # remove them with a merge patch guarded by the resourceVersion just read, then
            # apply again so castiron's manager owns what is left.
            api.merge_patch(kind, options.namespace, name, _removal(obj, applied))
            api.apply(obj)

    def route_diff(self, environment: str, release: str) -> list[RouteDifference]:
        """How the environment's stable Service differs from the one castiron applies while
        it serves ``release``: type, ports and selector (see :func:`service_differences`).
        A missing Service, or one castiron did not create, shows no difference here.

        Raises:
            RuntimeDriverError: when the cluster cannot be read.
        """
        options = self.driver.options_for(environment)
        want = service(
            self.app_of(environment), environment, release, self.port_of(environment), options
        )
        name = str(want["metadata"]["name"])
        live = self.driver.client(options).get("Service", options.namespace, name)
        if live is None or not _ours(live):
            return []
        target = f"Service {options.namespace}/{name}"
        return [
            RouteDifference(target, path, wanted, found)
            for path, wanted, found in service_differences(want, live)
        ]

    def _route(self, environment: str, weights: list[tuple[str, int]]) -> None:
        """Send ``weights`` of the environment's requests to each release's own Service
        through its HTTPRoute (the Services first, so the route never names a missing one)."""
        options = self.driver.options_for(environment)
        app, port = self.app_of(environment), self.port_of(environment)
        for release, _weight in weights:
            self._apply_ours(environment, release_service(app, environment, release, port, options))
        self._apply_ours(environment, http_route(app, environment, weights, options))

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
        if self.driver.options_for(environment).gateway is not None:
            weights = [(release or stable.release, 100)]
            if canary is not None and 0 < canary_weight < 100:
                weights = [(stable.release, 100 - canary_weight), (canary.release, canary_weight)]
            self._route(environment, weights)
            # Requests that bypass the Gateway keep reaching one release only.
            release = weights[0][0]
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
        if self.driver.options_for(environment).gateway is not None:
            self._route(environment, [(stable.release, 100)])
        self._apply(environment, stable.release)
        return FlipOutcome(True, "", previous)

    def remove(self, environment: str) -> bool:
        options = self.driver.options_for(environment)
        name = options.service_for(self.app_of(environment), environment)
        api = self.driver.client(options)
        if options.gateway is not None:
            route = options.route_for(self.app_of(environment), environment)
            found_route = api.get("HTTPRoute", options.namespace, route)
            if found_route is not None and _ours(found_route):
                api.delete("HTTPRoute", options.namespace, route)
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
        if options.gateway is not None and release is not None:
            routed = self._routed(environment, release, observed)
            if routed is not None:
                return routed
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

    def _routed(self, environment: str, stable: str, observed: list[Observed]) -> Routing | None:
        """The routing an HTTPRoute says, when it splits requests between two releases."""
        options = self.driver.options_for(environment)
        app = self.app_of(environment)
        found = self.driver.client(options).get(
            "HTTPRoute", options.namespace, options.route_for(app, environment)
        )
        if found is None:
            return None
        by_service = dict(route_weights(found))
        name_of = {
            o.instance.release: release_name(app, environment, o.instance.release) for o in observed
        }
        weights = {r: by_service.get(n, 0) for r, n in name_of.items() if n in by_service}
        others = [(w, r) for r, w in weights.items() if r != stable and w > 0]
        if not others:
            return None
        weight, canary = max(others)
        total = sum(weights.values()) or 1

        def backends(release: str) -> BackendSet:
            return BackendSet(
                release,
                tuple(
                    Backend(o.instance.id, o.instance.address)
                    for o in observed
                    if o.instance.release == release
                ),
            )

        listen = _listen(options.namespace, options.service_for(app, environment))
        return Routing(
            environment,
            listen,
            backends(stable),
            backends(canary),
            round(100 * weight / total),
        )

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """None: a Service keeps no per-release counters (canary analysis reads Prometheus
        or pod readiness and restarts)."""
        return []

    def counts_requests(self, environment: str) -> bool:
        """False: a Service counts no requests."""
        return False


SERVICE_PORT_FIELDS = ("port", "targetPort", "protocol")
"""The fields castiron sets on each port of a Service (besides its name)."""


def _port_key(port: Mapping[str, Any]) -> str:
    return str(port.get("name") or f"{port.get('port')}/{port.get('protocol') or 'TCP'}")


def service_differences(
    want: Mapping[str, Any], live: Mapping[str, Any], *, exact: bool = False
) -> list[tuple[str, object, object]]:
    """(path, wanted, found) for each field castiron sets on a Service that ``live`` has
    otherwise: ``spec.type``; each port's number, target port and protocol, and any port
    added or removed; the selector compared key by key *both ways* (a key added by hand
    changes which pods it selects although castiron never set it). The selector's release
    key is left out unless ``exact`` (which release a Service selects is the route itself).
    Fields the server fills in (``clusterIP``, ``nodePort``, ``sessionAffinity``) are not
    compared."""
    out: list[tuple[str, object, object]] = []
    wspec: Mapping[str, Any] = want.get("spec") or {}
    lspec: Mapping[str, Any] = live.get("spec") or {}
    if wspec.get("type", "ClusterIP") != lspec.get("type", "ClusterIP"):
        out.append(("spec.type", wspec.get("type", "ClusterIP"), lspec.get("type", "ClusterIP")))
    wports = {_port_key(p): p for p in wspec.get("ports") or []}
    lports = {_port_key(p): p for p in lspec.get("ports") or []}
    for key in sorted(set(wports) | set(lports)):
        wanted, found = wports.get(key), lports.get(key)
        if wanted is None or found is None:
            out.append((f"spec.ports[{key}]", wanted, found))
            continue
        for name in SERVICE_PORT_FIELDS:
            if wanted.get(name) != found.get(name):
                out.append((f"spec.ports[{key}].{name}", wanted.get(name), found.get(name)))
    wsel: Mapping[str, Any] = wspec.get("selector") or {}
    lsel: Mapping[str, Any] = lspec.get("selector") or {}
    for key in sorted(set(wsel) | set(lsel)):
        if key == LABEL_RELEASE and not exact:
            continue
        if wsel.get(key) != lsel.get(key):
            out.append((f"spec.selector.{key}", wsel.get(key), lsel.get(key)))
    return out


def _removal(want: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch taking from ``live`` the selector keys and ports ``want`` does not
    have (its ports list replaced by ``want``'s), valid only for ``live``'s resourceVersion."""
    lspec: Mapping[str, Any] = live.get("spec") or {}
    wspec: Mapping[str, Any] = want.get("spec") or {}
    extra = {k: None for k in lspec.get("selector") or {} if k not in wspec.get("selector", {})}
    mine = {_port_key(p) for p in wspec.get("ports") or []}
    kept = [
        copy.deepcopy(p)
        for p in lspec.get("ports") or []
        if _port_key(p) in mine  # the server's nodePort and the like stay
    ]
    return {
        "metadata": {"resourceVersion": (live.get("metadata") or {}).get("resourceVersion")},
        "spec": {"selector": extra, "ports": kept} if extra else {"ports": kept},
    }


def _ours(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("labels", {}).get(LABEL_MANAGED_BY) == MANAGER)


def _listen(namespace: str, name: str) -> str:
    return f"service/{namespace}/{name}"


__all__ = ["SERVICE_PORT_FIELDS", "KubernetesTraffic", "service_differences"]
