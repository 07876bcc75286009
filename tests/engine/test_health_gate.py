"""A slow or failing health gate talks: each unhealthy instance's last probe every few
seconds, and on failure its last output and the command that shows all of it. The default
deploy_timeout is derived from the health check."""

from __future__ import annotations

import pytest

from castiron.engine.resolve import default_deploy_timeout
from castiron.errors import DeployFailedError
from castiron.model import HealthCheck

from .conftest import Recorder, World


def test_waiting_reports_each_instances_last_probe_and_failure_names_the_logs_command(
    world: World,
) -> None:
    world.environ["SICK"] = "1"
    seen = Recorder()
    with pytest.raises(DeployFailedError) as err:
        world.deploy("staging", "v1", observer=seen)
    new = list(world.driver.created)
    assert len(new) == 2
    waiting = [line for line in seen.lines if "not healthy yet" in line]
    probe = "GET /healthz: 503 Service Unavailable"
    assert waiting == [
        f"{new[0]} not healthy yet after 3s of 5s: {probe}",
        f"{new[1]} not healthy yet after 3s of 5s: {probe}",
    ]
    release = world.store.list_deployments("staging")[0].to_release
    assert str(err.value) == (
        f"instance {new[0]} of release {release} not healthy after 5s (last probe: {probe})\n"
        f"last output:\nbooting {new[0]}\nerror: database unreachable\n"
        f"all of its output: castiron logs staging --instance {new[0]}"
    )


def test_the_default_deploy_timeout_follows_the_health_check(world: World) -> None:
    # cold: no deploy_timeout; health: start_period 1s, interval 100ms, timeout 2s, after 1
    world.environ["SICK"] = "1"
    with pytest.raises(DeployFailedError, match=r"not healthy after 7\.3s \(last probe"):
        world.deploy("cold", "v1")


@pytest.mark.parametrize(
    ("start_period", "interval", "timeout", "healthy_after", "expected"),
    [(30.0, 1.0, 2.0, 1, 39.0), (20.0, 0.5, 2.0, 1, 27.5), (0.0, 1.0, 1.0, 3, 10.0)],
)
def test_default_deploy_timeout(
    start_period: float, interval: float, timeout: float, healthy_after: int, expected: float
) -> None:
    check = HealthCheck("http", "/healthz", interval, timeout, healthy_after, start_period)
    assert default_deploy_timeout(check) == expected
