"""`castiron init`, `castiron validate` and `castiron schema`, in-process and as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from castiron.spec.load import load_spec

FIVE_MISTAKES = """\
app: hello
service:
  replica: 2
  port: eighty
environments:
  staging:
    runtime: local
  production:
    listen: 127.0.0.1:8081
    replicas: 0
    strategy: {type: canary, steps: [{weight: 10, pause: soon}]}
"""

FIVE_MESSAGES = [
    "castiron.yaml:3:3: service.replica: unknown key 'replica'; did you mean 'replicas'?",
    "castiron.yaml:4:9: service.port: must be an integer",
    "castiron.yaml:7:5: environments.staging: missing required key 'listen'",
    "castiron.yaml:10:15: environments.production.replicas: must be at least 1",
    "castiron.yaml:11:58: environments.production.strategy.steps.0.pause: must be a duration "
    "such as 30s or 5m, or 'manual'",
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    project = tmp_path / "my-project"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("CASTIRON_SPEC", raising=False)
    return project


def test_init_writes_a_valid_commented_starter(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("init")
    assert result.exit_code == 0, result.stderr
    path = workdir / "castiron.yaml"
    assert f"wrote {path} for app 'my-project'" in result.stdout
    text = path.read_text(encoding="utf-8")
    assert text.count("#") > 10
    loaded = load_spec(path, {})
    assert loaded.spec.app == "my-project"
    assert sorted(loaded.spec.environments) == ["production", "staging"]
    assert run_cli("validate").stdout == "ok\n"


def test_init_with_app_name_and_file(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("-f", "deploy/app.yaml", "init", "--app", "shop")
    assert result.exit_code == 2
    assert "directory" in result.stderr and "does not exist" in result.stderr
    (workdir / "deploy").mkdir()
    assert run_cli("-f", "deploy/app.yaml", "init", "--app", "shop").exit_code == 0
    assert load_spec(workdir / "deploy" / "app.yaml", {}).spec.app == "shop"


def test_init_refuses_to_overwrite(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    path = workdir / "castiron.yaml"
    path.write_text("app: mine\n", encoding="utf-8")
    result = run_cli("init")
    assert result.exit_code == 2
    assert result.stderr == f"error: {path} already exists; not overwriting it\n"
    assert path.read_text(encoding="utf-8") == "app: mine\n"


def test_init_refuses_a_bad_app_name(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("init", "--app", "My_App")
    assert result.exit_code == 2
    assert "'My_App' is not a valid app name" in result.stderr
    assert not (workdir / "castiron.yaml").exists()


def test_validate_ok_json(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    run_cli("init", "--app", "hello")
    result = run_cli("validate", "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["ok"] is True
    assert body["app"] == "hello"
    assert body["environments"] == ["production", "staging"]
    assert body["digest"].startswith("sha256:")
    assert body["file"] == str(workdir / "castiron.yaml")


def test_validate_reports_every_error(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "castiron.yaml").write_text(FIVE_MISTAKES, encoding="utf-8")
    result = run_cli("validate")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = [line.removeprefix("error: ").strip() for line in result.stderr.splitlines()]
    assert lines == FIVE_MESSAGES


def test_validate_json_errors(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "castiron.yaml").write_text(FIVE_MISTAKES, encoding="utf-8")
    result = run_cli("validate", "--json")
    assert result.exit_code == 2
    body = json.loads(result.stdout)
    assert body["ok"] is False
    assert body["errors"][0] == {
        "file": "castiron.yaml",
        "line": 3,
        "column": 3,
        "path": "service.replica",
        "message": "unknown key 'replica'; did you mean 'replicas'?",
    }
    assert len(body["errors"]) == 5


def test_validate_file_argument_wins_over_global_option(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "bad.yaml").write_text(FIVE_MISTAKES, encoding="utf-8")
    run_cli("-f", "good.yaml", "init")
    assert run_cli("-f", "good.yaml", "validate").exit_code == 0
    assert run_cli("-f", "bad.yaml", "validate").exit_code == 2
    assert run_cli("-f", "bad.yaml", "validate", "good.yaml").exit_code == 0


def test_validate_missing_file(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("validate", "nope.yaml")
    assert result.exit_code == 2
    assert result.stderr == "error: nope.yaml:1:1: no such file\n"


def test_validate_as_a_process_prints_all_five_mistakes(tmp_path: Path) -> None:
    (tmp_path / "castiron.yaml").write_text(FIVE_MISTAKES, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "castiron.cli.main", "validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "CASTIRON_HOME": str(tmp_path / "h")},
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line.removeprefix("error: ").strip() for line in proc.stderr.splitlines()]
    assert lines == FIVE_MESSAGES


def test_schema_prints_a_json_schema(run_cli) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "castiron.yaml"
    assert schema["required"] == ["app"]
    assert schema["patternProperties"] == {"^x-": {}}
    assert "extensions" not in schema["properties"]
    compact = run_cli("schema", "--json")
    assert json.loads(compact.stdout) == schema
    assert compact.stdout.count("\n") == 1
