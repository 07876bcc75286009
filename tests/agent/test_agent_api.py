"""The control API of a real agent process over its real Unix socket."""

from __future__ import annotations

import json
import stat
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from castiron.agent.client import AgentClient, SpawnRequest, unix_connect
from castiron.agent.lifecycle import agent_pid, socket_path
from castiron.agent.routes import counters_from_json
from castiron.errors import AgentError, AgentRefusedError, NotFoundError
from castiron.settings import Settings


def raw(settings: Settings, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """Send one request by hand; returns (status, decoded JSON body)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: agent\r\n"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    with unix_connect(socket_path(settings), 10.0) as sock:
        sock.sendall(head.encode() + b"\r\n" + (body or b""))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ")[1])
    return status, json.loads(payload)


def test_socket_is_private_and_status_answers(settings: Settings, agent: AgentClient) -> None:
    path = socket_path(settings)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.agent_path.stat().st_mode) == 0o700
    status = agent.status()
    assert status.pid == agent_pid(settings)
    assert status.home == str(settings.home)
    assert status.router == "builtin"
    assert status.routes == ()
    assert agent.health()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        ("POST", "/v1/instances", b"{not json", 400, "body: invalid JSON"),
        ("POST", "/v1/instances", b"", 400, "body: a JSON object is required"),
        ("POST", "/v1/instances", b"[1]", 400, "body: expected object, got array"),
        (
            "POST",
            "/v1/instances",
            b'{"id": "a", "environment": "staging", "release": "r", "argv": ["x"], "tty": true}',
            400,
            "body: unknown field 'tty'",
        ),
        (
            "POST",
            "/v1/instances",
            b'{"id": "a", "environment": "staging", "release": "r", "argv": "x"}',
            400,
            "body.argv: expected array, got string",
        ),
        ("PUT", "/v1/routes/staging", b'{"environment": "staging"}', 400, "body: missing field"),
        (
            "PUT",
            "/v1/routes/staging",
            b'{"environment": "staging", "listen": "127.0.0.1:1", "drain_timeout": NaN}',
            400,
            "body: invalid JSON: NaN is not JSON",
        ),
        ("PUT", "/v1/metrics", b'{"listen": 9100}', 400, "body.listen: expected string"),
        ("PUT", "/v1/metrics", b'{"listen": "0.0.0.0:9100"}', 400, "must be on loopback"),
        ("GET", "/v1/events?since=soon", None, 400, "query since: 'soon' is not a number"),
        ("DELETE", "/v1/instances/nope?grace=-1", None, 400, "query grace: must be between"),
        ("GET", "/v1/nothing", None, 404, "no such endpoint: /v1/nothing"),
        ("GET", "/v2/status", None, 404, "the API lives under /v1"),
        ("GET", "/v1/instances/ghost", None, 404, "no instance 'ghost'"),
        ("GET", "/v1/routes/staging/counters", None, 404, "no route for environment 'staging'"),
        ("DELETE", "/v1/status", None, 405, "DELETE not allowed on /v1/status; use GET"),
        ("POST", "/v1/routes/staging", b"{}", 405, "use DELETE, GET, PUT"),
    ],
)
def test_bad_requests_get_a_status_and_a_reason(
    settings: Settings,
    agent: AgentClient,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    reason: str,
) -> None:
    got, payload = raw(settings, method, path, body)
    assert got == status
    assert reason in payload["error"]


def test_the_client_raises_agent_error_with_the_reason(agent: AgentClient) -> None:
    # A refusal is its own type (callers classify by it, never by the message's words).
    with pytest.raises(AgentRefusedError, match=r"body\.canary_weight: must be 0-100"):
        agent.put_route(
            "staging", {"environment": "staging", "listen": "127.0.0.1:1", "canary_weight": 500}
        )
    with pytest.raises(NotFoundError, match="no instance 'ghost'"):
        agent.instance("ghost")


def test_no_agent_means_a_clear_error(tmp_path: Path) -> None:
    client = AgentClient(tmp_path / "agent.sock")
    with pytest.raises(AgentError, match=r"^agent not running at .*agent\.sock$") as caught:
        client.status()
    assert not isinstance(caught.value, AgentRefusedError)
    assert not client.health()


def test_instances_spawn_list_logs_and_stop(
    settings: Settings, agent: AgentClient, tmp_path: Path, helpers: Any
) -> None:
    record = agent.spawn(
        SpawnRequest(
            id="worker-1",
            environment="staging",
            release="r1",
            argv=(sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"),
            env={"TOKEN": "do-not-record"},
            cwd=str(tmp_path),
            log_dir=str(tmp_path / "logs"),
        )
    )
    assert record.state == "running" and record.env_names == ("TOKEN",)
    assert agent.instance("worker-1") == record
    assert [r.id for r in agent.instances()] == ["worker-1"]
    assert agent.instances("production") == []
    helpers.wait_for(lambda: agent.instance_logs("worker-1") == "ready\n", what="output")
    assert (tmp_path / "logs" / "worker-1.log").read_text() == "ready\n"
    for path in settings.agent_path.rglob("*"):
        if path.is_file():
            assert b"do-not-record" not in path.read_bytes(), path
    final = agent.stop_instance("worker-1", grace=5)
    assert final.state == "exited" and final.exit_code == -15
    assert agent.instances() == []
    kinds = [e.kind for e in agent.events()]
    assert kinds[-2:] == ["instance-exited", "instance-stopped"]
    last = agent.events()[-1].seq
    assert agent.events(since=last) == []


def test_following_logs_streams_until_the_instance_exits(agent: AgentClient) -> None:
    code = "import time\nfor i in range(5):\n    print('tick', i, flush=True); time.sleep(0.05)\n"
    agent.spawn(
        SpawnRequest(
            id="ticker", environment="staging", release="r1", argv=(sys.executable, "-c", code)
        )
    )
    text = b"".join(agent.follow_instance_logs("ticker", lines=0)).decode()
    assert text.endswith("tick 4\n")
    assert agent.instance("ticker").exit_code == 0


def test_route_through_the_builtin_router_and_read_counters(
    agent: AgentClient, app_script: Path, helpers: Any
) -> None:
    app_port, listen_port, metrics_port = (helpers.free_port() for _ in range(3))
    agent.spawn(
        SpawnRequest(
            id="web-1",
            environment="staging",
            release="r1",
            argv=(sys.executable, str(app_script)),
            env={"PORT": str(app_port), "INSTANCE": "web-1"},
            address=f"127.0.0.1:{app_port}",
        )
    )
    helpers.wait_for(lambda: helpers.port_open(app_port), what="the app")
    route = {
        "environment": "staging",
        "listen": f"127.0.0.1:{listen_port}",
        "stable": {
            "release": "r1",
            "backends": [{"id": "web-1", "address": f"127.0.0.1:{app_port}"}],
        },
    }
    agent.put_route("staging", route)
    for _ in range(3):
        with urllib.request.urlopen(f"http://127.0.0.1:{listen_port}/", timeout=10) as response:
            assert response.read() == b"web-1\n"
    (counters,) = counters_from_json(agent.route_counters("staging"))
    assert counters.release == "r1"
    assert counters.requests == 3 and counters.responses_2xx == 3
    assert agent.route("staging")["listen"] == f"127.0.0.1:{listen_port}"
    assert list(agent.routes()) == ["staging"]
    assert agent.status().routes == ("staging",)

    assert agent.set_metrics(f"127.0.0.1:{metrics_port}") == f"127.0.0.1:{metrics_port}"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'environment="staging"' in text and 'release="r1"' in text
    assert agent.set_metrics(None) is None
    assert not helpers.port_open(metrics_port)

    agent.delete_route("staging")
    assert not helpers.port_open(listen_port)
    with pytest.raises(NotFoundError):
        agent.route("staging")
