"""The castiron provider under a real Terraform, end to end: ``init`` from the filesystem
mirror ``castiron terraform-setup`` wrote, a plan that shows the resolved digest, apply,
a no-change plan, drift made outside Terraform shown as a diff (``-detailed-exitcode`` exits
2) and fixed by apply, a failed apply on an unhealthy release (Terraform's state unchanged, the
old release serving), castiron's errors as diagnostics with castiron's text (a spec error with
its location, a policy refusal), import, data sources and destroy (``castiron down``).
"""

from __future__ import annotations

import json
import re

import pytest

from castiron.agent.client import AgentClient

from .conftest import TfProject

pytestmark = [pytest.mark.terraform, pytest.mark.slow]

MAIN_TF = """
terraform {
  required_providers {
    castiron = { source = "castiron/castiron" }
  }
}

variable "image" {
  type    = string
  default = "v1"
}

variable "healthy" {
  type    = string
  default = "1"
}

resource "castiron_deployment" "staging" {
  spec        = "castiron.yaml"
  environment = "staging"
  image       = var.image
  env         = var.healthy == "1" ? null : { HEALTHY = var.healthy }
}

data "castiron_image" "wanted" {
  spec = "castiron.yaml"
  ref  = var.image
}

output "release" { value = castiron_deployment.staging.release }
output "digest" { value = castiron_deployment.staging.digest }
output "url" { value = castiron_deployment.staging.url }
output "image_digest" { value = data.castiron_image.wanted.digest }
output "image_tags" { value = data.castiron_image.wanted.tags }
"""


def digest_of(project: TfProject, tag: str) -> str:
    return str(project.json("inspect", tag)["digest"])


def status(project: TfProject) -> dict[str, object]:
    return project.status()


def error_line(text: str) -> str:
    """The first ``Error: ...`` line of Terraform's output (box drawing stripped)."""
    for line in text.splitlines():
        line = line.lstrip("│ ").strip()
        if line.startswith("Error: "):
            return line
    raise AssertionError(f"no Error: line in\n{text}")


def test_deployment_plan_apply_drift_failure_import_destroy(
    tf_project: type[TfProject],
) -> None:
    project = tf_project(MAIN_TF)
    project.bake("v1")
    project.bake("v2")
    v1, v2 = digest_of(project, "v1"), digest_of(project, "v2")

    project.tf_ok("init", "-no-color")
    mirror = project.root / ".terraform/providers/registry.terraform.io/castiron/castiron/0.1.0"
    assert mirror.is_dir()

    # The plan of a new deployment shows the digest the tag resolves to.
    plan = project.tf("plan", "-no-color", "-detailed-exitcode")
    assert plan.returncode == 2, plan.stderr
    assert f'+ digest      = "{v1}"' in plan.stdout
    assert "+ deployed_at = (known after apply)" in plan.stdout

    project.tf_ok("apply", "-no-color", "-auto-approve")
    out = project.outputs()
    current = status(project)
    assert out["release"] == current["release"] and out["digest"] == v1 == current["digest"]
    assert out["url"] == f"http://127.0.0.1:{project.port}/"
    assert (out["image_digest"], out["image_tags"]) == (v1, ["v1"])
    assert project.served() == "v1"

    # Nothing changed: plan exits 0.
    plan = project.tf("plan", "-no-color", "-detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "No changes." in plan.stdout

    # Drift 1: another digest deployed by hand; plan shows it, apply puts v1 back.
    project.ok("deploy", "staging", "--image", "v2", "--yes")
    plan = project.tf("plan", "-no-color", "-detailed-exitcode")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert f'~ digest      = "{v2}" -> "{v1}"' in plan.stdout
    project.tf_ok("apply", "-no-color", "-auto-approve")
    assert status(project)["digest"] == v1
    assert project.tf("plan", "-no-color", "-detailed-exitcode").returncode == 0

    # Drift 2: the serving instance stopped by hand; plan shows the finding, apply replaces it.
    (before,) = [str(i["id"]) for i in status(project)["instances"]]  # type: ignore[attr-defined]
    AgentClient(project.home / "agent" / "agent.sock").stop_instance(before, grace=2.0)
    plan = project.tf("plan", "-no-color", "-detailed-exitcode")
    assert plan.returncode == 2, plan.stdout + plan.stderr
    assert f'- "membership {before} state: expected running, actual ' in plan.stdout
    project.tf_ok("apply", "-no-color", "-auto-approve")
    after = [str(i["id"]) for i in status(project)["instances"]]  # type: ignore[attr-defined]
    assert before not in after and project.served() == "v1"
    assert project.tf("plan", "-no-color", "-detailed-exitcode").returncode == 0

    # A failed apply: the new release never gets healthy. castiron's text is the diagnostic,
    # Terraform's state keeps the old release and the old release still serves.
    release = project.outputs()["release"]
    failed = project.tf("apply", "-no-color", "-auto-approve", "-var", "healthy=0")
    assert failed.returncode == 1
    line = error_line(failed.stderr)
    match = re.fullmatch(
        r"Error: instance (\S+) of release ([0-9a-f]{16}) not healthy after 5s "
        r"\(last probe: .*\)",
        line,
    )
    assert match is not None, line
    assert match.group(2) != release
    assert "healthz: refusing, HEALTHY=0" in failed.stderr
    assert project.served() == "v1"
    assert status(project)["release"] == release
    state = json.loads(project.tf_ok("show", "-json"))
    (resource,) = [r for r in state["values"]["root_module"]["resources"] if r["mode"] == "managed"]
    assert resource["values"]["release"] == release
    assert resource["values"]["env"] is None

    # A spec error is a diagnostic with castiron's text and location.
    spec = project.root / "castiron.yaml"
    good = spec.read_text()
    spec.write_text(good.replace("replicas: 1", "replicas: 0"))
    broken = project.tf("plan", "-no-color")
    cli = project.run("plan", "staging")
    assert broken.returncode == 1 and cli.returncode == 2
    assert error_line(broken.stderr) == "Error: " + cli.stderr.splitlines()[0].removeprefix(
        "error: "
    )
    assert "castiron.yaml:8:13: service.replicas: must be at least 1" in broken.stderr
    spec.write_text(good)

    # Import: forget the resource, import the running environment; nothing to change.
    project.tf_ok("state", "rm", "castiron_deployment.staging")
    project.tf_ok("import", "-no-color", "castiron_deployment.staging", "castiron.yaml#staging")
    plan = project.tf("plan", "-no-color", "-detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr

    # Destroy is `castiron down`.
    project.tf_ok("destroy", "-no-color", "-auto-approve")
    assert status(project)["instances"] == []


PROMOTION_TF = """
terraform {
  required_providers {
    castiron = { source = "castiron/castiron" }
  }
}

resource "castiron_deployment" "staging" {
  spec        = "castiron.yaml"
  environment = "staging"
  image       = "v1"
}

resource "castiron_deployment" "production" {
  spec         = "castiron.yaml"
  environment  = "production"
  image        = castiron_deployment.staging.digest
  promote_from = "staging"
}

data "castiron_environment" "staging" {
  spec        = "castiron.yaml"
  environment = "staging"
  depends_on  = [castiron_deployment.staging]
}

output "staging_healthy" { value = data.castiron_environment.staging.healthy }
output "staging_release" { value = data.castiron_environment.staging.release }
"""


def test_promotion_refused_by_policy_is_a_diagnostic_and_creates_nothing(
    tf_project: type[TfProject],
) -> None:
    project = tf_project(PROMOTION_TF)
    project.bake("v1")
    project.tf_ok("init", "-no-color")
    applied = project.tf("apply", "-no-color", "-auto-approve")
    assert applied.returncode == 1, applied.stdout + applied.stderr
    assert "castiron_deployment.staging: Creation complete" in applied.stdout, applied.stderr
    # castiron's own refusal, as the CLI prints it for the same promotion.
    cli = project.run("promote", "staging", "production", "--yes")
    assert cli.returncode == 5
    digest = project.status()["digest"]
    refusal = (
        rf"refused by policy \(soak\): image {digest} has served staging for [0-9.]+s, "
        r"less than the soak of 1h"
    )
    assert re.fullmatch("Error: " + refusal, error_line(applied.stderr))
    (cli_error,) = [line for line in cli.stderr.splitlines() if line.startswith("error: ")]
    assert re.fullmatch("error: " + refusal, cli_error)
    state = json.loads(project.tf_ok("show", "-json"))
    managed = [
        r["address"] for r in state["values"]["root_module"]["resources"] if r["mode"] == "managed"
    ]
    assert managed == ["castiron_deployment.staging"]
    never = project.run("status", "production")
    assert (never.returncode, never.stderr) == (
        2,
        "error: environment 'production' was never deployed\n",
    )
    out = project.outputs()
    assert out["staging_healthy"] is True
    assert out["staging_release"] == project.status()["release"]
