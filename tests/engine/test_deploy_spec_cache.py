"""The deploy spec and its validation cache: a cached result is exactly what validating gives,
environment values always come from the file being read, and anything else voids the cache."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from castiron.engine.release import DeploySpec, cached_deploy_spec, deploy_spec
from castiron.errors import SpecError
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


def _uncached(path: Path, environ: dict[str, str]) -> DeploySpec:
    return deploy_spec(load_spec(path, environ))


@pytest.mark.parametrize("version", ["1", "2", ""])
def test_a_cached_result_equals_validation(spec_file: Path, tmp_path: Path, version: str) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_deploy_spec(spec_file, {"APP_VERSION": "0"}, cache)  # fills the cache
    assert list(cache.iterdir())
    environ = {"APP_VERSION": version, "STAGE": "two"}
    assert cached_deploy_spec(spec_file, environ, cache) == _uncached(spec_file, environ)


def test_a_hit_does_not_import_pydantic(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_deploy_spec(spec_file, {}, cache)
    code = (
        "import sys; from pathlib import Path; "
        "from castiron.engine.release import cached_deploy_spec as c; "
        f"s = c(Path({str(spec_file)!r}), {{'APP_VERSION': '7'}}, Path({str(cache)!r})); "
        "assert dict(s.environments['staging'].config.env)['APP_VERSION'] == '7'; "
        "print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_change_outside_env_values_is_validated_again(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_deploy_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("replicas: 2", "replicas: 4"))
    assert cached_deploy_spec(spec_file, {}, cache) == _uncached(spec_file, {})
    spec_file.write_text(SPEC.replace("replicas: 2", "replicas: 0"))
    with pytest.raises(SpecError, match=r"service\.replicas: must be at least 1"):
        cached_deploy_spec(spec_file, {}, cache)


def test_a_bad_env_value_is_never_served_from_the_cache(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_deploy_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("PLAIN: 1.10", "PLAIN: [1, 2]"))
    with pytest.raises(SpecError, match=r"service\.env\.PLAIN"):
        cached_deploy_spec(spec_file, {}, cache)
    spec_file.write_text(SPEC.replace("${APP_VERSION:-dev}", "${APP_VERSION}"))
    with pytest.raises(SpecError, match="APP_VERSION is not set"):
        cached_deploy_spec(spec_file, {}, cache)


def test_a_damaged_or_missing_cache_is_ignored(spec_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cached_deploy_spec(spec_file, {}, cache)
    for entry in cache.iterdir():
        entry.write_text('{"key": "x"')
    assert cached_deploy_spec(spec_file, {}, cache) == _uncached(spec_file, {})
    missing = tmp_path / "no" / "cache"
    assert cached_deploy_spec(spec_file, {}, missing) == _uncached(spec_file, {})
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
    cached_deploy_spec(path, {"BUILD": "1"}, cache)  # fills the cache
    hit = cached_deploy_spec(path, {"BUILD": "2"}, cache)
    assert hit == _uncached(path, {"BUILD": "2"})
    assert hit.image is not None and hit.service_port == 8000
    assert (hit.image["context"], hit.image["exclude"]) == ("./src", ["*.log"])
    assert (hit.image["env"], hit.image["labels"]) == ({"BUILD": "2"}, {"team": "web"})
