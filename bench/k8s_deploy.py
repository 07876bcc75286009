#!/usr/bin/env python3
"""Kubernetes runtime benchmark, on the test bed: castiron vs kubectl on the same cluster.

    scripts/k8s-testbed build && scripts/k8s-testbed start && eval "$(scripts/k8s-testbed env)"
    python bench/k8s_deploy.py [--rounds 3] [--switches 10]

Both sides run the same image (castiron bakes it from /bin/busybox and loads it into the test
bed node's Docker engine; pods run it by image ID, ``imagePullPolicy: Never``), the same
readiness probe (``GET /`` every second), 1 replica, in a namespace of their own.

1. Deploy: ``castiron deploy`` of a new release (a changed env var; blue-green: create, wait
   until the pod is Ready, switch the Service selector) vs ``kubectl apply`` of the same
   Deployment with the changed env var + ``kubectl rollout status``. Both wait for the same
   pod start (scheduling, container start, the kubelet's first successful probe), so the
   difference of the medians is castiron's overhead.
2. Rollback: ``castiron rollback`` (the warm release: a selector flip) vs ``kubectl rollout
   undo`` + ``kubectl rollout status`` (a new pod of the previous template).
3. ``--switches`` deploys in a row under a client load through each side's Service (the API
   server's service proxy, sequential GETs): failed requests per side.

Everything is created in two fresh namespaces, deleted at the end.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from _machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
BUSYBOX = Path("/bin/busybox")
SCRIPT = (
    'mkdir -p /tmp/www; echo "$VERSION" > /tmp/www/index.html; '
    'exec /bin/busybox httpd -f -p "$HOST:$PORT" -h /tmp/www'
)
SPEC = """
app: bench
image:
  context: ./app
  workdir: /
  entrypoint: ["/bin/busybox", "sh", "-c", {script}]
service:
  port: 8000
  replicas: 1
  health: {{http: /, interval: 1s, timeout: 2s, start_period: 30s}}
  env: {{VERSION: "${{VERSION:-v1}}"}}
environments:
  staging:
    runtime: kubernetes
    listen: 127.0.0.1:1
    deploy_timeout: 120s
    drain_timeout: 1s
    keep_warm: 10m
    kubernetes: {{namespace: {namespace}, service: {{port: 80}}}}
"""


class Api:
    """The API server of ``KUBECONFIG`` over plain HTTPS."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.server = str(cluster["server"])
        self.token = str(config["users"][0]["user"]["token"])
        self.ssl = ssl.create_default_context()
        self.ssl.load_verify_locations(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )

    def call(self, path: str, method: str = "GET", body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=self.ssl, timeout=5) as response:
            text = response.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text


class Load:
    """Sequential GETs through a Service (service proxy), counting failures; bounded."""

    def __init__(self, api: Api, namespace: str, service: str) -> None:
        self.api, self.path = api, f"/api/v1/namespaces/{namespace}/services/{service}:80/proxy/"
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 900
        while not self._stop.is_set() and time.monotonic() < deadline and self.ok < 200_000:
            try:
                self.api.call(self.path)
                self.ok += 1
            except (OSError, urllib.error.URLError) as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def run(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} failed: {proc.stdout}{proc.stderr}")
    return took


def kubectl_objects(namespace: str, image: str, version: str) -> str:
    labels = {"app": "peer"}
    probe = {
        "httpGet": {"path": "/", "port": 8000},
        "periodSeconds": 1,
        "timeoutSeconds": 2,
        "failureThreshold": 1,
        "successThreshold": 1,
    }
    container = {
        "name": "app",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["/bin/busybox", "sh", "-c", SCRIPT],
        "env": [
            {"name": "VERSION", "value": version},
            {"name": "PORT", "value": "8000"},
            {"name": "HOST", "value": "0.0.0.0"},
        ],
        "ports": [{"containerPort": 8000, "protocol": "TCP"}],
        "readinessProbe": probe,
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 65534,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "peer", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {"medium": "Memory"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "peer", "namespace": namespace},
        "spec": {
            "selector": labels,
            "ports": [{"port": 80, "targetPort": 8000, "protocol": "TCP"}],
        },
    }
    return json.dumps(deployment) + "\n" + json.dumps(service) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switches", type=int, default=10)
    args = parser.parse_args()
    kubeconfig = Path(os.environ.get("KUBECONFIG", ""))
    if not kubeconfig.is_file() or not os.environ.get("CASTIRON_KUBERNETES_DOCKER_HOST"):
        sys.exit('start the test bed first: eval "$(scripts/k8s-testbed env)"')
    api = Api(kubeconfig)
    ours, peer = f"bench-{secrets.token_hex(3)}", f"peer-{secrets.token_hex(3)}"
    for name in (ours, peer):
        api.call("/api/v1/namespaces", "POST", {"metadata": {"name": name}})
    work = Path(tempfile.mkdtemp(prefix="k8s-bench-"))
    try:
        (work / "app" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, work / "app" / "bin" / "busybox")
        (work / "castiron.yaml").write_text(SPEC.format(script=json.dumps(SCRIPT), namespace=ours))
        env = {k: v for k, v in os.environ.items() if k != "VERSION"}
        env.update(
            CASTIRON_HOME=str(work / ".castiron"), NO_COLOR="1", SOURCE_DATE_EPOCH="1700000000"
        )
        castiron = [sys.executable, "-m", "castiron.cli.main"]
        kubectl = ["kubectl", "--kubeconfig", str(kubeconfig), "-n", peer]
        run([*castiron, "bake", "--tag", "v1"], env, work)
        run([*castiron, "deploy", "staging", "--yes"], {**env, "VERSION": "warmup"}, work)
        image = str(
            api.call(f"/apis/apps/v1/namespaces/{ours}/deployments")["items"][0]["spec"][
                "template"
            ]["spec"]["containers"][0]["image"]
        )
        manifests = work / "peer.json"

        def peer_apply(version: str) -> float:
            manifests.write_text(kubectl_objects(peer, image, version))
            took = run([*kubectl, "apply", "-f", str(manifests)], env)
            return took + run(
                [*kubectl, "rollout", "status", "deployment/peer", "--timeout=120s"], env
            )

        peer_apply("warmup")
        deploy_c, deploy_k, rollback_c, rollback_k = [], [], [], []
        for i in range(args.rounds):
            deploy_c.append(
                run([*castiron, "deploy", "staging", "--yes"], {**env, "VERSION": f"c{i}"}, work)
            )
            deploy_k.append(peer_apply(f"k{i}"))
            rollback_c.append(run([*castiron, "rollback", "staging"], env, work))
            started = time.perf_counter()
            run([*kubectl, "rollout", "undo", "deployment/peer"], env)
            run([*kubectl, "rollout", "status", "deployment/peer", "--timeout=120s"], env)
            rollback_k.append(time.perf_counter() - started)
        with Load(api, ours, "bench-staging") as load_c:
            for i in range(args.switches):
                run([*castiron, "deploy", "staging", "--yes"], {**env, "VERSION": f"s{i}"}, work)
        with Load(api, peer, "peer") as load_k:
            for i in range(args.switches):
                peer_apply(f"s{i}")
        med = statistics.median
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}")
        print(
            f"deploy (1 replica) castiron {med(deploy_c):.2f}s | kubectl apply+rollout status "
            f"{med(deploy_k):.2f}s | castiron overhead {med(deploy_c) - med(deploy_k):+.2f}s "
            f"(ratio {med(deploy_c) / med(deploy_k):.2f})"
        )
        print(
            f"rollback castiron (warm, selector flip) {med(rollback_c):.2f}s | kubectl rollout "
            f"undo+status {med(rollback_k):.2f}s (ratio {med(rollback_k) / med(rollback_c):.1f}x)"
        )
        print(
            f"{args.switches} switches under load: castiron {load_c.failed} failed / "
            f"{load_c.ok + load_c.failed} | kubectl {load_k.failed} failed / "
            f"{load_k.ok + load_k.failed}"
        )
    finally:
        for name in (ours, peer):
            with contextlib.suppress(OSError, urllib.error.URLError):
                api.call(f"/api/v1/namespaces/{name}", "DELETE")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
