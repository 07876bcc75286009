"""Route configurations and counters on the control API: their JSON form and its validation.

Owns the translation between the router's values (``RouteConfig``, ``ReleaseCounters`` from
:mod:`castiron.traffic.base`) and the JSON objects that :class:`castiron.agent.client.AgentClient`
sends and receives, plus the checks the agent makes before handing a configuration to a
router. It knows nothing of processes, sockets or the daemon.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable
from typing import Any

from castiron.agent.wire import from_json, to_json
from castiron.errors import UsageError
from castiron.model import Address, is_name
from castiron.traffic.base import ReleaseCounters, RouteConfig


def split_address(text: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as ``(host, port)``; the host is an IP or ``localhost``
    (see :meth:`castiron.model.Address.parse_listen`).

    Raises:
        UsageError: naming ``where`` when the address is malformed.
    """
    try:
        address = Address.parse_listen(text)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return address.host, address.port


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def route_from_json(environment: str, data: object) -> RouteConfig:
    """The :class:`RouteConfig` for ``environment`` from a request body, checked.

    Raises:
        UsageError: naming the bad field (``body.canary_weight: must be 0-100``).
    """
    if not is_name(environment):
        raise UsageError(f"environment {environment!r} is not a valid name")
    config = from_json(RouteConfig, data, "body")
    if config.environment != environment:
        raise UsageError(
            f"body.environment: {config.environment!r} does not match the path's {environment!r}"
        )
    split_address(config.listen, "body.listen")
    for label, backend_set in (("stable", config.stable), ("canary", config.canary)):
        if backend_set is None:
            continue
        seen: set[str] = set()
        for i, backend in enumerate(backend_set.backends):
            where = f"body.{label}.backends[{i}]"
            if not backend.id:
                raise UsageError(f"{where}.id: must not be empty")
            if backend.id in seen:
                raise UsageError(f"{where}.id: {backend.id!r} appears twice")
            seen.add(backend.id)
            split_address(backend.address, f"{where}.address")
    if not 0 <= config.canary_weight <= 100:
        raise UsageError("body.canary_weight: must be 0-100")
    if config.canary_weight and config.canary is None:
        raise UsageError("body.canary_weight: set, but there is no canary backend set")
    if not 0 <= config.drain_timeout < math.inf:
        raise UsageError("body.drain_timeout: must be a finite, non-negative number")
    for name in ("connect", "header_read", "backend_response", "idle"):
        if not 0 < getattr(config.timeouts, name) < math.inf:
            raise UsageError(f"body.timeouts.{name}: must be a finite, positive number")
    limits = config.limits
    if limits.max_body_bytes < 0:
        raise UsageError("body.limits.max_body_bytes: must not be negative")
    if not 0 < limits.body_timeout < math.inf:
        raise UsageError("body.limits.body_timeout: must be a finite, positive number")
    if limits.max_connections < 1:
        raise UsageError("body.limits.max_connections: must be at least 1")
    if config.max_header_bytes < 1024:
        raise UsageError("body.max_header_bytes: must be at least 1024")
    if config.sticky is not None and not config.sticky.name:
        raise UsageError("body.sticky.name: must not be empty")
    return config


def route_to_json(config: RouteConfig) -> dict[str, Any]:
    """The JSON object of ``config`` (what ``PUT /v1/routes/{env}`` takes)."""
    return to_json(config)


def counters_to_json(counters: Iterable[ReleaseCounters]) -> list[dict[str, Any]]:
    """The JSON array of per-release counters."""
    return [to_json(c) for c in counters]


def counters_from_json(items: Iterable[object]) -> list[ReleaseCounters]:
    """Per-release counters from :meth:`AgentClient.route_counters`.

    Raises:
        UsageError: when an item is not a ``ReleaseCounters`` object.
    """
    return [from_json(ReleaseCounters, item, f"counters[{i}]") for i, item in enumerate(items)]


__all__ = [
    "counters_from_json",
    "counters_to_json",
    "is_loopback",
    "route_from_json",
    "route_to_json",
    "split_address",
]
