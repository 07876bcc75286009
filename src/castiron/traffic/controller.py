"""The traffic controller: how the engine moves an environment's traffic, and nothing else.

Owns the :class:`TrafficController` protocol (switch a listener to a backend set atomically,
shift a weighted share to a second set, remove a listener, read the current routing and the
per-release counters) and its two implementations: :class:`AgentTraffic`, which drives the host
agent's routers through :mod:`castiron.agent.client`, and :class:`MemoryTraffic`, an in-memory
fake shipped for tests of the layers above (it passes the same conformance tests).

It knows nothing of releases as the engine sees them, the spec, the state store or runtimes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from castiron.agent.client import AgentClient, from_json
from castiron.errors import AgentError, AgentRefusedError, NotFoundError, RouterError, UsageError
from castiron.model import HealthCheck
from castiron.traffic.base import (
    Backend,
    BackendSet,
    LatencySummary,
    Limits,
    ReleaseCounters,
    RouteConfig,
    Stickiness,
)
from castiron.values import value


@value
class Routing:
    """Where an environment's listener sends traffic right now."""

    environment: str
    listen: str
    stable: BackendSet | None
    canary: BackendSet | None = None
    canary_weight: int = 0

    @property
    def releases(self) -> tuple[str, ...]:
        """Releases that receive traffic (the canary only when its weight is above 0)."""
        out = [] if self.stable is None else [self.stable.release]
        if self.canary is not None and self.canary_weight > 0:
            out.append(self.canary.release)
        return tuple(out)

    @property
    def backend_ids(self) -> frozenset[str]:
        """Ids of every instance that may receive traffic."""
        ids = {b.id for b in self.stable.backends} if self.stable is not None else set()
        if self.canary is not None and self.canary_weight > 0:
            ids |= {b.id for b in self.canary.backends}
        return frozenset(ids)


@value
class FlipOutcome:
    """The answer to :meth:`TrafficController.flip`."""

    flipped: bool
    """False: the route was left exactly as it was (see ``reason``)."""
    reason: str
    previous: Routing | None
    """The routing before the flip (None when there was no listener)."""


@value
class RouteDifference:
    """One field of a route kept as a live object of the runtime (a Kubernetes Service) that
    differs from what castiron applies."""

    target: str
    """The object: ``KIND NAMESPACE/NAME``."""
    path: str
    """The field, e.g. ``spec.type`` or ``spec.ports[http].port``."""
    want: object
    have: object


@runtime_checkable
class RouteDiffer(Protocol):
    """A traffic controller whose route is an object people can edit by hand (a Kubernetes
    Service: ``kubectl edit``/``patch``); re-applying the route (:meth:`~TrafficController.switch`)
    puts it back."""

    def route_diff(self, environment: str, release: str) -> list[RouteDifference]:
        """How ``environment``'s route differs from the one castiron applies while it serves
        ``release``, beyond which release it sends to (:meth:`~TrafficController.current`
        tells that); empty when it has no such route.

        Raises:
            RouterError, RuntimeDriverError: when the route cannot be read.
        """
        ...


@runtime_checkable
class RequestCounting(Protocol):
    """A traffic controller that can say whether an environment's route counts requests per
    release (a Kubernetes Service does not: :meth:`~TrafficController.counters` is always
    empty there, and an analysis must not wait for requests it can never see)."""

    def counts_requests(self, environment: str) -> bool:
        """Whether :meth:`~TrafficController.counters` of ``environment`` counts requests."""
        ...


class TrafficController(Protocol):
    """Moves one host's environments' traffic between backend sets."""

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
        """Route ``environment``'s listener to ``stable`` (and ``canary_weight`` % to
        ``canary``) atomically, creating the listener if needed; leaving backends drain.
        ``sticky`` keeps each client on the release it first got while there is a canary.
        ``limits`` (None: the defaults) and ``access_log`` configure the listener.

        Raises:
            RouterError: when the listener cannot be bound or the configuration is refused.
            AgentError: when the agent that runs the routers cannot be reached.
        """
        ...

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
        """Switch ``environment`` to the warm set ``stable`` in one step, provided its listener
        still serves release ``expect`` (None: nothing) and every backend of ``stable`` answers
        one probe of ``check``; otherwise change nothing and say why.

        Raises:
            RouterError: when the router refuses the configuration.
            AgentError: when the agent that runs the routers cannot be reached.
        """
        ...

    def remove(self, environment: str) -> bool:
        """Drain and close ``environment``'s listener. False when it had none.

        Raises:
            AgentError: when the agent cannot be reached.
        """
        ...

    def current(self, environment: str) -> Routing | None:
        """The routing in force for ``environment`` (None when it has no listener).

        Raises:
            AgentError: when the agent cannot be reached.
        """
        ...

    def counters(self, environment: str) -> list[ReleaseCounters]:
        """Per-release counters of ``environment``'s listener (empty when it has none).

        Raises:
            AgentError: when the agent cannot be reached.
        """
        ...


def _route(
    environment: str,
    listen: str,
    stable: BackendSet,
    canary: BackendSet | None,
    canary_weight: int,
    drain_timeout: float,
    sticky: Stickiness | None = None,
    limits: Limits | None = None,
    access_log: bool = False,
) -> RouteConfig:
    if not 0 <= canary_weight <= 100:
        raise UsageError(f"{environment}: canary weight {canary_weight} is not 0-100")
    if canary is None:
        canary_weight = 0
        sticky = None
    return RouteConfig(
        environment=environment,
        listen=listen,
        stable=stable,
        canary=canary,
        canary_weight=canary_weight,
        sticky=sticky,
        drain_timeout=drain_timeout,
        limits=limits or Limits(),
        access_log=access_log,
    )


def _serving(config: RouteConfig | None) -> str | None:
    if config is None or config.stable is None:
        return None
    if config.canary is not None and config.canary_weight:
        return None
    return config.stable.release


def _routing(config: RouteConfig) -> Routing:
    return Routing(
        config.environment, config.listen, config.stable, config.canary, config.canary_weight
    )


@contextmanager
def _refusal_as_router_error(environment: str) -> Iterator[None]:
    """Turn the agent's refusal of a route into a :class:`RouterError` naming ``environment``."""
    try:
        yield
    except AgentRefusedError as exc:
        raise RouterError(f"environment {environment!r}: {exc.message}") from exc


def _agent_routing(raw: Any, where: str) -> Routing:
    """The :class:`Routing` of a route configuration the agent sent (``where`` names it).

    Raises:
        AgentError: when the agent sent something that is not a route configuration.
    """
    try:
        return _routing(from_json(RouteConfig, raw, where))
    except UsageError as exc:
        raise AgentError(f"agent sent an unexpected route: {exc}") from exc


class AgentTraffic:
    """Traffic through the host agent's routers (builtin proxy or HAProxy)."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client

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
        config = _route(
            environment,
            listen,
            stable,
            canary,
            canary_weight,
            drain_timeout,
            sticky,
            limits,
            access_log,
        )
        with _refusal_as_router_error(environment):
            self.client.put_route(environment, config)

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
        config = _route(
            environment, listen, stable, None, 0, drain_timeout, None, limits, access_log
        )
        with _refusal_as_router_error(environment):
            data = self.client.flip_route(environment, config, expect=expect, check=check, env=env)
        raw = data.get("previous")
        previous = None if raw is None else _agent_routing(raw, "previous")
        return FlipOutcome(bool(data["flipped"]), str(data.get("reason", "")), previous)

    def remove(self, environment: str) -> bool:
        try:
            self.client.delete_route(environment)
        except NotFoundError:
            return False
        return True

    def current(self, environment: str) -> Routing | None:
        try:
            data = self.client.route(environment)
        except NotFoundError:
            return None
        return _agent_routing(data, "route")

    def counters(self, environment: str) -> list[ReleaseCounters]:
        try:
            items: list[Any] = self.client.route_counters(environment)
        except NotFoundError:
            return []
        try:
            return [
                from_json(ReleaseCounters, item, f"counters[{i}]") for i, item in enumerate(items)
            ]
        except UsageError as exc:
            raise AgentError(f"agent sent unexpected counters: {exc}") from exc


@dataclass
class MemoryTraffic:
    """Routing kept in memory, for tests; records every configuration it was given.

    ``fail_next`` makes the next ``switch`` raise :class:`RouterError` (to test undo paths).
    """

    routes: dict[str, RouteConfig] = field(default_factory=dict)
    history: list[RouteConfig] = field(default_factory=list)
    fail_next: int = 0
    refuse_flip: str = ""
    """When set, :meth:`flip` refuses with this reason (as if a warm backend did not answer)."""
    _served: dict[str, dict[str, int]] = field(default_factory=dict)

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
        config = _route(
            environment,
            listen,
            stable,
            canary,
            canary_weight,
            drain_timeout,
            sticky,
            limits,
            access_log,
        )
        if self.fail_next > 0:
            self.fail_next -= 1
            raise RouterError(f"environment {environment!r}: injected router failure")
        for other, route in self.routes.items():
            if other != environment and route.listen == listen:
                raise RouterError(f"environment {environment!r}: {listen} is in use by {other}")
        self.routes[environment] = config
        self.history.append(config)

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
        old = self.routes.get(environment)
        previous = None if old is None else _routing(old)
        serving = _serving(old)
        if serving != expect:
            why = f"route serves {serving or 'nothing'}, expected {expect or 'nothing'}"
            return FlipOutcome(False, why, previous)
        if self.refuse_flip:
            return FlipOutcome(False, self.refuse_flip, previous)
        self.switch(
            environment,
            listen,
            stable,
            drain_timeout=drain_timeout,
            limits=limits,
            access_log=access_log,
        )
        return FlipOutcome(True, "", previous)

    def remove(self, environment: str) -> bool:
        return self.routes.pop(environment, None) is not None

    def current(self, environment: str) -> Routing | None:
        config = self.routes.get(environment)
        return None if config is None else _routing(config)

    def counters(self, environment: str) -> list[ReleaseCounters]:
        served = self._served.get(environment, {})
        return [
            ReleaseCounters(release, n, n, 0, 0, 0, 0, 0, LatencySummary(1.0, 1.0, 1.0))
            for release, n in sorted(served.items())
        ]

    # --- test controls ---------------------------------------------------------------------

    def serve(self, environment: str, requests: int = 1) -> list[str]:
        """Pretend ``requests`` requests arrived; returns the release each one reached."""
        config = self.routes.get(environment)
        if config is None or config.stable is None:
            raise RouterError(f"environment {environment!r} has no listener")
        out: list[str] = []
        for i in range(requests):
            use_canary = config.canary is not None and (i * 100) // max(requests, 1) < (
                config.canary_weight
            )
            chosen = config.canary if use_canary and config.canary is not None else config.stable
            counts = self._served.setdefault(environment, {})
            counts[chosen.release] = counts.get(chosen.release, 0) + 1
            out.append(chosen.release)
        return out


def backend_set(release: str, backends: Sequence[tuple[str, str]]) -> BackendSet:
    """A :class:`BackendSet` of ``release`` from (instance id, address) pairs."""
    return BackendSet(release, tuple(Backend(i, a) for i, a in backends))


__all__ = [
    "AgentTraffic",
    "FlipOutcome",
    "MemoryTraffic",
    "RequestCounting",
    "RouteDiffer",
    "RouteDifference",
    "Routing",
    "TrafficController",
    "backend_set",
]
