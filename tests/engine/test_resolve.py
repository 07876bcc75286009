"""The resolved spec and its cache: a cached result is exactly what resolving gives (release
config, gates, canary, drift rules), environment values always come from the file being read,
and anything else voids the cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from castiron.engine.resolve import (
    CanaryConfig,
    CanaryStep,
    DriftRules,
    ResolvedSpec,
    cached_resolve_spec,
    resolve_spec,
)
from castiron.errors import SpecError, UsageError
from castiron.spec.load import load_spec

SPEC = textwrap.dedent(
    """
    app: hello
    service:
      port: 8000
      replicas: 2
      health: {http: /healthz, interval: 500ms}
      env:
        APP_VERSION: ${APP_VERSION:-dev}
        PLAIN: 1.10
      secrets: {TOKEN: {env: HELLO_TOKEN}}
    environments:
      staging:
        listen: 127.0.0.1:18080
        env: {STAGE: "${STAGE:-one}"}
        keep_warm: 5m
      production: {listen: 127.0.0.1:18081, replicas: 3}
    """
)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "castiron.yaml"
    path.write_text(SPEC)
    return path


def _uncached(path: Path, environ: dict[str, str]) -> ResolvedSpec:
    return resolve_spec(load_spec(path, environ))


@pytest.mark.parametrize("version", ["1", "2", ""])
def test_a_cached_result_equals_validation(spec_file: Path, tmp_path: Path, version: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(spec_file, {"APP_VERSION": "0"}, cache)  # fills the cache
    assert list(cache.iterdir())
    environ = {"APP_VERSION": version, "STAGE": "two"}
    assert cached_resolve_spec(spec_file, environ, cache) == _uncached(spec_file, environ)


def test_a_hit_does_not_import_pydantic(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(spec_file, {}, cache)
    code = (
        "import sys; from pathlib import Path; "
        "from castiron.engine.resolve import cached_resolve_spec as c; "
        f"s = c(Path({str(spec_file)!r}), {{'APP_VERSION': '7'}}, Path({str(cache)!r})); "
        "assert dict(s.environments['staging'].config.env)['APP_VERSION'] == '7'; "
        "print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_change_outside_env_values_is_validated_again(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("replicas: 2", "replicas: 4"))
    assert cached_resolve_spec(spec_file, {}, cache) == _uncached(spec_file, {})
    spec_file.write_text(SPEC.replace("replicas: 2", "replicas: 0"))
    with pytest.raises(SpecError, match=r"service\.replicas: must be at least 1"):
        cached_resolve_spec(spec_file, {}, cache)


def test_a_bad_env_value_is_never_served_from_the_cache(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("PLAIN: 1.10", "PLAIN: [1, 2]"))
    with pytest.raises(SpecError, match=r"service\.env\.PLAIN"):
        cached_resolve_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("${APP_VERSION:-dev}", "${APP_VERSION}"))
    with pytest.raises(SpecError, match="APP_VERSION is not set"):
        cached_resolve_spec(spec_file, {}, cache)


def test_a_damaged_or_missing_cache_is_ignored(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(spec_file, {}, cache)
    for entry in cache.iterdir():
        entry.write_text('{"key": "x"')
    assert cached_resolve_spec(spec_file, {}, cache) == _uncached(spec_file, {})
    missing = tmp_path / "no" / "cache"
    assert cached_resolve_spec(spec_file, {}, missing) == _uncached(spec_file, {})
    assert not missing.exists()  # never creates the state directory


def test_the_image_section_is_cached_with_its_env_from_this_parse(tmp_path: Path) -> None:
    path = tmp_path / "castiron.yaml"
    path.write_text(
        SPEC.replace(
            "app: hello\n",
            "app: hello\nimage:\n  context: ./src\n  exclude: ['*.log']\n"
            "  env: {BUILD: '${BUILD:-0}'}\n  labels: {team: web}\n",
        )
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_resolve_spec(path, {"BUILD": "1"}, cache)  # fills the cache
    hit = cached_resolve_spec(path, {"BUILD": "2"}, cache)
    assert hit == _uncached(path, {"BUILD": "2"})
    assert hit.image is not None and hit.service_port == 8000
    assert (hit.image["context"], hit.image["exclude"]) == ("./src", ["*.log"])
    assert (hit.image["env"], hit.image["labels"]) == ({"BUILD": "2"}, {"team": "web"})


GATED = SPEC.replace(
    "  production: {listen: 127.0.0.1:18081, replicas: 3}\n",
    """  production:
    listen: 127.0.0.1:18081
    promote_from: staging
    policy: {soak: 90s, approvals: 1, approvers: [keys/a.pub], checks: [[./smoke.sh]]}
    strategy:
      type: canary
      steps: [{weight: 10, pause: 1s}, {weight: 50, pause: manual}]
      sticky: {cookie: ab}
    drift: {watch: 60s, fix: true, ignore: ["**/__pycache__/"]}
""",
)


def test_gates_canary_and_drift_rules_are_resolved_and_cached(tmp_path: Path) -> None:
    path = tmp_path / "castiron.yaml"
    assert GATED != SPEC
    path.write_text(GATED)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = cached_resolve_spec(path, {}, cache)
    hit = cached_resolve_spec(path, {}, cache)
    assert hit == first == _uncached(path, {})
    production = hit.environment("production")
    assert production.gates.source == "staging" and production.gates.soak == 90
    assert production.gates.base_dir == tmp_path
    assert production.gates.checks == (("./smoke.sh",),)
    assert production.gates.active == ["promote_from", "soak", "approvals", "checks"]
    assert isinstance(production.canary, CanaryConfig)
    assert production.canary.steps == (CanaryStep(10, 1.0), CanaryStep(50, None))
    assert production.drift == DriftRules(watch=60.0, fix=True, ignore=("**/__pycache__/",))
    staging = hit.environment("staging")
    assert staging.canary is None and staging.gates.active == [] and staging.drift == DriftRules()


def test_an_unknown_environment_names_the_known_ones(spec_file: Path, tmp_path: Path) -> None:
    spec = cached_resolve_spec(spec_file, {}, tmp_path)
    known = r"no environment 'qa' in .* \(known: production, staging\)"
    with pytest.raises(UsageError, match=known):
        spec.environment("qa")
