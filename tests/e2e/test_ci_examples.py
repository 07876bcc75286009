"""The CI templates in examples/ci/ run as written: every ``run:`` step of the GitHub Actions
workflow, and every job's ``before_script`` + ``script`` of the GitLab CI file in stage order,
against a loopback registry (Debian's docker-registry) and local environments.

What only a hosted CI provides is supplied here: the ``${{ … }}`` expressions and predefined
variables (registry, repository, commit, the signing-key secret), ``$GITHUB_ENV`` and GitLab's
dotenv artifacts between steps and jobs, and the runner's persistent ``CASTIRON_HOME`` (the
project's own). ``uses:`` steps (the checkout) and the ``pip install castiron`` lines are the
only things not run: the project is already on disk and castiron already installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.images.registrykit import Registry, run_registry

from .conftest import Project, free_port, get

pytestmark = [pytest.mark.slow, pytest.mark.registry]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"
CHECK = "import sys, urllib.request as u; u.urlopen(sys.argv[1] + '/healthz', timeout=5)"
PRODUCTION = """
  production:
    listen: 127.0.0.1:{port}
    promote_from: staging
    deploy_timeout: 20s
    drain_timeout: 2s
    keep_warm: 10m
    isolation: none
    policy:
      require_signature: [keys/release.pub]
      checks:
        - ["python3", "-c", "{check}", "${{URL}}"]
"""
SHA = "3f2a9c1d" * 5


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("ci-registry")) as reg:
        yield reg


def _pipeline_project(make_project: Callable[..., Project]) -> tuple[Project, int, Path]:
    project = make_project(replicas=1)
    prod_port = free_port()
    spec = project.root / "castiron.yaml"
    spec.write_text(spec.read_text() + PRODUCTION.format(port=prod_port, check=CHECK))
    (project.root / "keys").mkdir()
    secrets = project.root.parent / f"{project.root.name}-secrets"
    secrets.mkdir()
    project.ok("keys", "generate", "--out", str(secrets / "release"))
    (project.root / "keys" / "release.pub").write_bytes((secrets / "release.pub").read_bytes())
    return project, prod_port, secrets / "release.key"


def _run(script: str, cwd: Path, env: dict[str, str], what: str) -> None:
    bindir = str(Path(sys.executable).parent)  # where this castiron's command is installed
    env = {**env, "PATH": bindir + os.pathsep + env.get("PATH", os.defpath)}
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"{what} failed:\n{script}\n{proc.stdout}\n{proc.stderr}"


def _check_promoted(project: Project, prod_port: int, registry: Registry, repo: str) -> None:
    staging = project.json("status", "staging")["environments"]
    production = project.json("status", "production")["environments"]
    assert isinstance(staging, list) and isinstance(production, list)
    assert production[0]["digest"] == staging[0]["digest"]
    assert get(prod_port)[1].strip() == "v1" and project.served() == "v1"
    digest = str(staging[0]["digest"])
    tags = registry.requests("PUT", f"/v2/{repo}/manifests/{digest.replace(':', '-')}.sig")
    assert tags, "the signature went to the registry in cosign's tag scheme"


def _is_install(line: str) -> bool:
    return "pip install" in line and "castiron" in line


def test_github_actions_workflow_runs_as_written(
    make_project: Callable[..., Project], registry: Registry, tmp_path: Path
) -> None:
    doc: dict[Any, Any] = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    project, prod_port, key = _pipeline_project(make_project)
    expressions = {
        "vars.REGISTRY": registry.host,
        "github.repository": "team/gh-app",
        "github.actor": "ci-bot",
        "secrets.GITHUB_TOKEN": "",
        "github.event.repository.name": "gh-app",
        "secrets.CASTIRON_SIGNING_KEY": key.read_text(),
    }

    def expand(values: dict[str, Any] | None) -> dict[str, str]:
        return {
            k: re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: expressions[m.group(1)], str(v))
            for k, v in (values or {}).items()
        }

    (job,) = doc["jobs"].values()
    github_env = tmp_path / "github-env"
    github_env.write_text("")
    runner_temp = tmp_path / "runner-temp"
    runner_temp.mkdir()
    env = {**project.env, **expand(doc.get("env")), **expand(job.get("env"))}
    env.update(
        {
            "CASTIRON_HOME": str(project.home),  # the runner's persistent home
            "GITHUB_SHA": SHA,
            "GITHUB_ENV": str(github_env),
            "RUNNER_TEMP": str(runner_temp),
        }
    )
    ran = []
    for step in job["steps"]:
        if "uses" in step:
            continue
        script = step["run"]
        if _is_install(script):
            continue
        _run(script, project.root, {**env, **expand(step.get("env"))}, step.get("name", ""))
        ran.append(step["name"])
        for line in github_env.read_text().splitlines():
            name, _, value = line.partition("=")
            env[name] = value
    assert len(ran) == 7 and ran[-1] == "Promote the same digest to production"
    assert list(runner_temp.iterdir()) == []  # the key did not outlive its step
    _check_promoted(project, prod_port, registry, "team/gh-app")


def test_gitlab_ci_pipeline_runs_as_written(
    make_project: Callable[..., Project], registry: Registry, tmp_path: Path
) -> None:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "gitlab-ci.yml").read_text())
    project, prod_port, key = _pipeline_project(make_project)
    predefined = {
        "CI_REGISTRY_IMAGE": f"{registry.host}/team/gl-app",
        "CI_REGISTRY_USER": "ci-bot",
        "CI_REGISTRY_PASSWORD": "",
        "CI_PROJECT_NAME": "gl-app",
        "CI_COMMIT_SHA": SHA,
        "CASTIRON_SIGNING_KEY": str(key),  # a File-type variable holds the file's path
    }

    def expand(value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: predefined.get(m.group(1), m.group(0)), value)

    variables = {k: expand(str(v)) for k, v in doc["variables"].items()}
    env = {**project.env, **predefined, **variables, "CASTIRON_HOME": str(project.home)}
    stages = doc["stages"]
    jobs = sorted(
        ((name, job) for name, job in doc.items() if isinstance(job, dict) and "stage" in job),
        key=lambda item: stages.index(item[1]["stage"]),
    )
    assert [name for name, _ in jobs] == ["bake-sign-push", "deploy-staging", "promote-production"]
    before = [line for line in doc["default"]["before_script"] if not _is_install(line)]
    for name, job in jobs:
        lines = [*before, *job["script"]]
        _run("\n".join(lines), project.root, dict(env), name)
        dotenv = job.get("artifacts", {}).get("reports", {}).get("dotenv")
        if dotenv:
            for line in (project.root / dotenv).read_text().splitlines():
                key_, _, value = line.partition("=")
                env[key_] = value
    assert env["DIGEST"].startswith("sha256:")
    _check_promoted(project, prod_port, registry, "team/gl-app")
    assert os.environ.get("CASTIRON_HOME") != str(project.home)
