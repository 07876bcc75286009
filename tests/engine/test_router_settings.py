"""The spec's ``router:`` section reaches every route the engine sets: deploy and rollback."""

from __future__ import annotations

from castiron.engine.rollback import rollback
from castiron.traffic.base import Limits

from .conftest import World


def test_router_settings_reach_every_route(world: World) -> None:
    spec = world.root / "castiron.yaml"
    spec.write_text(
        spec.read_text().replace(
            "staging: {listen: 127.0.0.1:18080,",
            "staging: {router: {max_body: 1KiB, body_timeout: 2s, max_connections: 7, "
            "allow_get_body: true, access_log: true}, listen: 127.0.0.1:18080,",
        )
    )
    world.deploy("staging", "v1")
    world.deploy("staging", "v2")
    rollback(world.engine().context, "staging")
    expected = Limits(max_body_bytes=1024, body_timeout=2.0, max_connections=7, allow_get_body=True)
    routes = [c for c in world.traffic.history if c.environment == "staging"]
    assert len(routes) >= 3
    assert all(c.limits == expected and c.access_log for c in routes)


def test_without_a_router_section_routes_get_the_safe_defaults(world: World) -> None:
    world.deploy("staging", "v1")
    (route,) = [c for c in world.traffic.history if c.environment == "staging"]
    assert route.limits == Limits() and not route.access_log
    assert not route.limits.allow_get_body
