"""``castiron export ENV --format kubernetes``: byte-identical manifests of a release, valid on
Kubernetes 1.25-1.33, secrets named but never exported; refusals with one clear line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .bakekit import APP_FILES, write_tree

SPEC = """\
app: hello
image:
  context: ./app
  entrypoint: ["python3", "server.py"]
service:
  port: 8080
  replicas: 3
  env: {MODE: prod}
  secrets: {DB_PASSWORD: {env: HELLO_DB_PASSWORD}}
  health: {http: /healthz}
environments:
  prod:
    runtime: kubernetes
    listen: 127.0.0.1:18080
    kubernetes: {namespace: web, service: {port: 80}}
  local: {listen: 127.0.0.1:18081}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tree(tmp_path / "proj" / "app", APP_FILES)
    spec = tmp_path / "proj" / "castiron.yaml"
    spec.write_text(SPEC)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("HELLO_DB_PASSWORD", "s3cret-value")
    return spec


def test_export_is_byte_identical_and_valid(run_cli: Any, project: Path, tmp_path: Path) -> None:
    assert run_cli("-f", str(project), "bake", "--tag", "v1").exit_code == 0
    first = run_cli("-f", str(project), "export", "prod", "--format", "kubernetes")
    assert first.exit_code == 0, first.stderr
    out = tmp_path / "manifests.yaml"
    second = run_cli("-f", str(project), "export", "prod", "--format", "kubernetes", "-o", str(out))
    assert second.exit_code == 0, second.stderr
    assert out.read_text() == first.stdout
    assert "s3cret-value" not in first.stdout
    objects = [o for o in yaml.safe_load_all(first.stdout) if o]
    assert [(o["apiVersion"], o["kind"]) for o in objects] == [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
    ]
    made, svc = objects
    assert made["spec"]["replicas"] == 3
    assert made["metadata"]["namespace"] == "web"
    release = made["metadata"]["labels"]["castiron.dev/release"]
    assert made["metadata"]["name"] == f"hello-prod-{release}"
    assert svc["spec"]["selector"]["castiron.dev/release"] == release
    assert "# secrets: provide Secret web/hello-prod-" in first.stdout
    for version in ("1.25.0", "1.29.0", "1.33.0"):
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    as_json = run_cli("-f", str(project), "export", "prod", "--format", "kubernetes", "--json")
    data = json.loads(as_json.stdout)
    assert data["release"] == release and data["manifests"] == first.stdout


def test_export_refuses_other_runtimes(run_cli: Any, project: Path) -> None:
    assert run_cli("-f", str(project), "bake").exit_code == 0
    result = run_cli("-f", str(project), "export", "local", "--format", "kubernetes")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: environment 'local' runs on local, not kubernetes: nothing to export as "
        "Kubernetes manifests\n"
    )


def test_archives_still_need_an_output(run_cli: Any, project: Path) -> None:
    assert run_cli("-f", str(project), "bake", "--tag", "v1").exit_code == 0
    result = run_cli("-f", str(project), "export", "v1")
    assert result.exit_code == 2
    assert result.stderr == "error: --format oci-archive needs -o FILE\n"
