"""Release resolution and plans: pure functions, so plain data in and out."""

from __future__ import annotations

from typing import Any

import pytest

from castiron.engine.plan import MASK, plan_deployment
from castiron.engine.release import release_from_json, release_to_json, resolve_release
from castiron.errors import UsageError
from castiron.model import Digest
from castiron.spec.schema import Spec

D1 = Digest("sha256:" + "1" * 64)
D2 = Digest("sha256:" + "2" * 64)


def _spec(**service: Any) -> Spec:
    return Spec.model_validate(
        {
            "app": "hello",
            "service": {
                "port": 8000,
                "env": {"LOG_LEVEL": "info"},
                "secrets": {"DB_PASSWORD": {"env": "HELLO_DB"}},
                **service,
            },
            "environments": {
                "staging": {"listen": "127.0.0.1:8080", "env": {"STAGE": "1"}},
                "production": {"listen": "127.0.0.1:8081", "replicas": 3},
            },
        }
    )


def test_release_id_is_stable_and_depends_on_digest_and_config() -> None:
    a = resolve_release(_spec(), "staging", D1)
    assert resolve_release(_spec(), "staging", D1).id == a.id
    assert resolve_release(_spec(), "staging", D2).id != a.id
    assert resolve_release(_spec(env={"LOG_LEVEL": "debug"}), "staging", D1).id != a.id


def test_environment_overrides_service() -> None:
    staging = resolve_release(_spec(), "staging", D1)
    production = resolve_release(_spec(), "production", D1)
    assert dict(staging.config.env) == {"LOG_LEVEL": "info", "STAGE": "1"}
    assert staging.config.replicas == 1
    assert production.config.replicas == 3


def test_secret_values_never_enter_a_release() -> None:
    release = resolve_release(_spec(), "staging", D1)
    assert dict(release.config.secrets) == {"DB_PASSWORD": "env:HELLO_DB"}


def test_unknown_environment_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"no environment 'prod'.*production, staging"):
        resolve_release(_spec(), "prod", D1)


def test_release_round_trips_through_json() -> None:
    release = resolve_release(_spec(), "production", D1)
    assert release_from_json(release_to_json(release)) == release


def test_tampered_release_record_is_refused() -> None:
    record = release_to_json(resolve_release(_spec(), "staging", D1))
    record["config"]["replicas"] = 9
    with pytest.raises(UsageError, match="does not match"):
        release_from_json(record)


def test_first_plan_creates_every_replica() -> None:
    plan = plan_deployment(None, resolve_release(_spec(), "production", D1), 0, "blue-green")
    assert (plan.create, plan.destroy, plan.has_changes) == (3, 0, True)
    assert any(c.field == "image" and c.after == D1 for c in plan.changes)


def test_same_release_is_an_empty_plan() -> None:
    release = resolve_release(_spec(), "staging", D1)
    plan = plan_deployment(release, release, 1, "blue-green")
    assert not plan.has_changes


def test_plan_shows_config_changes_and_masks_secrets() -> None:
    old = resolve_release(_spec(), "staging", D1)
    new = resolve_release(
        _spec(env={"LOG_LEVEL": "debug"}, secrets={"DB_PASSWORD": {"env": "OTHER"}}),
        "staging",
        D1,
    )
    plan = plan_deployment(old, new, 1, "rolling")
    fields = {c.field: (c.before, c.after) for c in plan.changes}
    assert fields["env.LOG_LEVEL"] == ("info", "debug")
    before, after = fields["secrets.DB_PASSWORD"]
    assert before == MASK and after is not None and after.startswith(MASK)
    assert "OTHER" not in str(plan.to_json())
    assert (plan.create, plan.destroy) == (1, 1)
