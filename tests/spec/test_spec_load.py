"""Loading a spec: interpolation, x- keys, merge keys, env values as written, the file API."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from castiron.errors import SpecError
from castiron.spec import load as load_module
from castiron.spec.load import LoadedSpec, interpolate_text, load_spec, load_spec_text
from castiron.spec.schema import Spec

BASE = "app: hello\nenvironments:\n  staging: {listen: 127.0.0.1:8080}\n"


def _load(text: str, environ: dict[str, str] | None = None) -> Spec:
    return load_spec_text(text, "castiron.yaml", environ or {})


def _issues(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        _load(text, environ)
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("plain", {}, "plain"),
        ("${A}", {"A": "x"}, "x"),
        ("a-${A}-b", {"A": "x"}, "a-x-b"),
        ("${A:-fallback}", {}, "fallback"),
        ("${A:-fallback}", {"A": ""}, "fallback"),
        ("${A:-fallback}", {"A": "set"}, "set"),
        ("${A}", {"A": ""}, ""),
        ("$${A}", {}, "${A}"),
        ("cost: $5 and $HOME", {}, "cost: $5 and $HOME"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${A:-}", {}, ""),
    ],
)
def test_interpolate_text(text: str, environ: dict[str, str], expected: str) -> None:
    assert interpolate_text(text, environ) == (expected, [])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "${MISSING}",
            "environment variable MISSING is not set (set it, or write ${MISSING:-default})",
        ),
        (
            "${1BAD}",
            "'${1BAD}' is not a valid reference: write ${NAME} or ${NAME:-default}, "
            "or $${ for a literal '${'",
        ),
        ("${OPEN", "unclosed '${': write ${NAME} or ${NAME:-default}, or $${ for a literal '${'"),
    ],
)
def test_interpolate_text_errors(text: str, error: str) -> None:
    assert interpolate_text(text, {})[1] == [error]


def test_interpolation_in_spec_values() -> None:
    spec = _load(
        "app: ${APP:-hello}\n"
        "service:\n  port: ${PORT}\n  env: {VERSION: '${VERSION}', LITERAL: '$${NOT_ME}'}\n"
        "environments:\n  staging: {listen: '127.0.0.1:${STAGING_PORT:-8080}'}\n",
        {"PORT": "9000", "VERSION": "1.2.3"},
    )
    assert spec.app == "hello"
    assert spec.service.port == 9000
    assert spec.service.env == {"VERSION": "1.2.3", "LITERAL": "${NOT_ME}"}
    assert spec.environments["staging"].listen == "127.0.0.1:8080"


def test_undefined_variable_is_named_at_its_scalar() -> None:
    assert _issues("app: hello\nservice:\n  port: ${APP_PORT}\n") == [
        "castiron.yaml:3:9: service.port: environment variable APP_PORT is not set "
        "(set it, or write ${APP_PORT:-default})"
    ]


def test_secrets_and_checks_are_not_interpolated() -> None:
    spec = _load(
        "app: hello\n"
        "service:\n  secrets: {DB_PASSWORD: {env: '${UNSET}'}}\n"
        "environments:\n  prod:\n    listen: 1\n    policy: {checks: [[./smoke.sh, '${URL}']]}\n"
    )
    assert spec.service.secrets["DB_PASSWORD"].env == "${UNSET}"
    assert spec.environments["prod"].policy.checks == (("./smoke.sh", "${URL}"),)


def test_x_keys_are_stripped_and_top_level_ones_kept() -> None:
    spec = _load(
        "app: hello\n"
        "x-team: {owner: platform, page: '${NOT_INTERPOLATED}'}\n"
        "image: {x-note: ignored, workdir: /srv}\n"
        "environments:\n  staging: {listen: 1, x-dashboard: 'https://example.invalid'}\n"
    )
    assert spec.extensions == {"x-team": {"owner": "platform", "page": "${NOT_INTERPOLATED}"}}
    assert spec.image.workdir == "/srv"
    assert "extensions" not in spec.model_dump()


def test_anchors_and_merge_keys() -> None:
    spec = _load(
        "app: hello\n"
        "x-defaults: &defaults {listen: 127.0.0.1:8080, replicas: 2, drain_timeout: 5s}\n"
        "environments:\n"
        "  staging: {<<: *defaults}\n"
        "  production:\n    <<: [*defaults]\n    listen: 127.0.0.1:8081\n    replicas: 3\n"
    )
    assert spec.environments["staging"].replicas == 2
    assert spec.environments["production"].listen == "127.0.0.1:8081"
    assert spec.environments["production"].replicas == 3
    assert spec.environments["production"].drain_timeout == 5.0


def test_env_values_keep_their_text() -> None:
    spec = _load(
        "app: hello\n"
        "image:\n  env: {PY: 3.10}\n"
        "service:\n  env: {VERSION: 1.10, DEBUG: yes, COUNT: 010, QUOTED: 'no'}\n"
        "environments:\n  s: {listen: 1, env: {FLAG: off}}\n"
    )
    assert spec.image.env == {"PY": "3.10"}
    assert spec.service.env == {"VERSION": "1.10", "DEBUG": "yes", "COUNT": "010", "QUOTED": "no"}
    assert spec.environments["s"].env == {"FLAG": "off"}


def test_durations_and_defaults() -> None:
    spec = _load(
        "app: hello\n"
        "service:\n  health: {http: /healthz, interval: 500ms, timeout: 2s, start_period: 1m}\n"
        "environments:\n  s: {listen: 8080, keep_warm: 1h, drain_timeout: 1.5}\n"
    )
    health = spec.service.health
    assert (health.interval, health.timeout, health.start_period) == (0.5, 2.0, 60.0)
    env = spec.environments["s"]
    assert (env.keep_warm, env.drain_timeout, env.deploy_timeout) == (3600.0, 1.5, None)
    assert env.listen == "127.0.0.1:8080"


def test_bom_is_accepted() -> None:
    assert load_spec_text(b"\xef\xbb\xbf" + BASE.encode(), "castiron.yaml", {}).app == "hello"


def test_load_spec_returns_path_digest_and_base_dir(tmp_path: Path) -> None:
    path = tmp_path / "castiron.yaml"
    path.write_bytes(BASE.encode())
    loaded = load_spec(path, {})
    assert isinstance(loaded, LoadedSpec)
    assert loaded.path == path and loaded.path.is_absolute()
    assert loaded.base_dir == tmp_path
    assert loaded.digest == "sha256:" + hashlib.sha256(BASE.encode()).hexdigest()
    assert loaded.spec.environments["staging"].listen == "127.0.0.1:8080"


def test_load_spec_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "castiron.yaml").write_text("app: hello\nservice: {port: 0}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_spec(Path("castiron.yaml"), {})
    assert str(info.value) == (
        "castiron.yaml:2:17: service.port: must be a port number from 1 to 65535"
    )


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path, {})
    assert str(info.value) == f"{path}:1:1: no such file"
    assert info.value.exit_code == 2


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path, {})
    assert str(info.value) == f"{tmp_path}:1:1: is a directory, not a file"


def test_oversized_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "castiron.yaml"
    path.write_bytes(b"#" * (5 * 1024 * 1024))
    with pytest.raises(SpecError) as info:
        load_spec(path, {})
    assert str(info.value).endswith(":1:1: the file is larger than 1048576 bytes (1 MiB)")


def test_loader_imports_no_cli_and_reads_no_environment() -> None:
    source = Path(load_module.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    # No os: the environment is passed in, never read.
    assert not imported & {"click", "rich", "os"}


def test_quoted_port_reference_becomes_a_number() -> None:
    spec = _load("app: hello\nservice: {port: '${PORT}'}\n", {"PORT": "9000"})
    assert spec.service.port == 9000


def test_unquoted_reference_in_flow_mapping_gets_a_hint() -> None:
    assert _issues("app: hello\nservice: {port: ${PORT}}\n", {"PORT": "1"}) == [
        "castiron.yaml:2:18: invalid YAML: expected ',' or '}', but got '{' (while parsing a "
        "flow mapping); quote values that contain ${...} inside [...] or {...}"
    ]


def test_typed_after_interpolation() -> None:
    spec = _load(
        "app: hello\nenvironments:\n  s:\n    listen: 1\n    replicas: ${R:-2}\n"
        "    strategy:\n      analysis:\n        max_error_rate: ${RATE}\n",
        {"RATE": "0.05"},
    )
    assert spec.environments["s"].replicas == 2
    analysis = spec.environments["s"].strategy.analysis
    assert analysis is not None and analysis.max_error_rate == 0.05


def test_router_section_short_form_and_defaults() -> None:
    from castiron.spec.load import load_spec_text

    text = (
        "app: hello\nenvironments:\n"
        "  a: {listen: 127.0.0.1:8080, router: haproxy}\n"
        "  b: {listen: 127.0.0.1:8081, router: {max_body: 512KiB, body_timeout: 2s}}\n"
        "  c: {listen: 127.0.0.1:8082}\n"
    )
    envs = load_spec_text(text, "castiron.yaml", {}).environments
    assert envs["a"].router.type == "haproxy" and envs["a"].router.max_body == 10 * 1024**2
    assert (envs["b"].router.max_body, envs["b"].router.body_timeout) == (512 * 1024, 2.0)
    c = envs["c"].router
    assert (c.type, c.max_connections, c.allow_get_body, c.access_log) == (
        "builtin",
        1024,
        False,
        False,
    )
