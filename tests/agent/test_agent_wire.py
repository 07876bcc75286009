"""The control API's JSON codec and route validation refuse bad input with the exact place."""

from __future__ import annotations

import json
import math

import pytest

from castiron.agent.client import InstanceRecord, SpawnRequest, from_json, to_json
from castiron.agent.routes import counters_from_json, route_from_json, route_to_json
from castiron.errors import UsageError
from castiron.traffic.base import (
    Backend,
    BackendSet,
    LatencySummary,
    Limits,
    ReleaseCounters,
    RouteConfig,
)

ROUTE = {
    "environment": "staging",
    "listen": "127.0.0.1:8080",
    "stable": {"release": "r1", "backends": [{"id": "a", "address": "127.0.0.1:9001"}]},
}


def test_spawn_request_round_trips() -> None:
    request = SpawnRequest(
        id="web-1", environment="staging", release="r1", argv=("python3", "app.py"), env={"A": "1"}
    )
    assert from_json(SpawnRequest, json.loads(json.dumps(to_json(request)))) == request


def test_route_config_round_trips() -> None:
    config = RouteConfig(
        environment="staging",
        listen="127.0.0.1:8080",
        stable=BackendSet("r1", (Backend("a", "127.0.0.1:9001"),)),
        limits=Limits(max_body_bytes=5, body_timeout=1.5, max_connections=3, allow_get_body=True),
        access_log=True,
    )
    assert route_from_json("staging", json.loads(json.dumps(route_to_json(config)))) == config


def test_counters_with_an_infinite_bucket_travel_as_strict_json() -> None:
    counters = ReleaseCounters(
        release="r1",
        requests=1,
        responses_2xx=1,
        responses_3xx=0,
        responses_4xx=0,
        responses_5xx=0,
        connect_errors=0,
        drained_cut=0,
        latency=LatencySummary(1.0, 2.0, 3.0),
        histogram=((1.0, 0), (math.inf, 1)),
    )
    text = json.dumps(to_json(counters), allow_nan=False)
    assert counters_from_json([json.loads(text)]) == [counters]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "body: expected object, got array"),
        ({"id": "x", "environment": "e", "release": "r"}, "body: missing field 'argv'"),
        (
            {"id": "x", "environment": "e", "release": "r", "argv": ["a"], "colour": 1},
            "body: unknown field 'colour'",
        ),
        (
            {"id": 7, "environment": "e", "release": "r", "argv": ["a"]},
            "body.id: expected string, got integer",
        ),
        (
            {"id": "x", "environment": "e", "release": "r", "argv": "a b"},
            "body.argv: expected array, got string",
        ),
        (
            {"id": "x", "environment": "e", "release": "r", "argv": ["a", 1]},
            "body.argv[1]: expected string, got integer",
        ),
        (
            {"id": "x", "environment": "e", "release": "r", "argv": ["a"], "env": {"A": 1}},
            "body.env.A: expected string, got integer",
        ),
    ],
)
def test_spawn_request_refuses_bad_json(data: object, message: str) -> None:
    with pytest.raises(UsageError) as info:
        from_json(SpawnRequest, data)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"listen": "8080"}, "body.listen: '8080' is not HOST:PORT"),
        ({"listen": "example.com:80"}, "body.listen: 'example.com' is not an IP address"),
        ({"canary_weight": 101}, "body.canary_weight: must be 0-100"),
        ({"canary_weight": True}, "body.canary_weight: expected integer, got boolean"),
        ({"canary_weight": 10}, "body.canary_weight: set, but there is no canary"),
        ({"drain_timeout": "30s"}, "body.drain_timeout: expected number, got string"),
        ({"timeouts": {"idle": 0}}, "body.timeouts.idle: must be a finite, positive number"),
        ({"timeouts": {"idel": 1}}, "body.timeouts: unknown field 'idel'"),
        ({"sticky": {"kind": "ip", "name": "x"}}, 'body.sticky.kind: must be one of "cookie"'),
        ({"limits": {"max_connections": 0}}, "body.limits.max_connections: must be at least 1"),
        ({"limits": {"body_timeout": 0}}, "body.limits.body_timeout: must be a finite, positive"),
        ({"limits": {"max_body_bytes": -1}}, "body.limits.max_body_bytes: must not be negative"),
        ({"limits": {"max_body": 1}}, "body.limits: unknown field 'max_body'"),
        ({"access_log": "yes"}, "body.access_log: expected boolean, got string"),
        ({"environment": "prod"}, "body.environment: 'prod' does not match the path's"),
        (
            {"stable": {"release": "r1", "backends": [{"id": "a", "address": 9001}]}},
            "body.stable.backends[0].address: expected string, got integer",
        ),
        (
            {
                "stable": {
                    "release": "r1",
                    "backends": [
                        {"id": "a", "address": "127.0.0.1:1"},
                        {"id": "a", "address": "127.0.0.1:2"},
                    ],
                }
            },
            "body.stable.backends[1].id: 'a' appears twice",
        ),
    ],
)
def test_route_validation_names_the_bad_field(patch: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as info:
        route_from_json("staging", {**ROUTE, **patch})
    assert str(info.value).startswith(message)


def test_records_keep_env_names_only() -> None:
    record = InstanceRecord(
        id="a",
        environment="e",
        release="r",
        pid=1,
        start_time=2,
        argv=("x",),
        env_names=("SECRET",),
        cwd="/",
        log_path="/l",
        started_at=0.0,
    )
    assert record.handle == "1:2"
    assert "SECRET" in json.dumps(to_json(record))
