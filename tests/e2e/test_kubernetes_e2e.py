"""The engine on a real Kubernetes control plane (``scripts/k8s-testbed``), through the real CLI,
with requests sent through the environment's Service (the API server's service proxy) during
switches: blue-green, rolling, an unhealthy release refused, a warm rollback, drift found and
fixed, secrets as a Secret per release (never in castiron's state), ``down``, and ``kill -9``
of the CLI mid-deploy recovered by the next command. Each release is one Deployment whose pods
are its instances (their ids in the ``castiron.dev/instances`` annotation).

The image is baked by castiron from ``/bin/busybox`` (busybox-static). The test bed's node runs
its own Docker engine: castiron loads the image there from its store
(``CASTIRON_KUBERNETES_DOCKER_HOST``) and pods run it by image ID with ``imagePullPolicy:
Never`` (the registry path, ``image_repository``, pulls ``REPO@sha256:…`` instead). The pod
writes ``$VERSION`` into ``/tmp/www`` and serves it with ``busybox httpd``; with ``HEALTHY=0``
it serves nothing and its readiness probe never passes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from castiron.engine.journal import STEPS

from .conftest import Project, free_port, project_env, reap_home, wait_for

pytestmark = [pytest.mark.kubernetes, pytest.mark.slow]

BUSYBOX = Path("/bin/busybox")
APP = "kube"
SCRIPT = (
    'mkdir -p /tmp/www; if [ "$HEALTHY" = 0 ]; then echo "refusing to serve: HEALTHY=0"; '
    'else echo "$VERSION" > /tmp/www/index.html; echo "serving $VERSION"; fi; '
    'if [ "$CRASH_AFTER" != 0 ]; then /bin/busybox httpd -f -p "$HOST:$PORT" -h /tmp/www & '
    'sleep "$CRASH_AFTER"; echo "crashing after $CRASH_AFTER s"; exit 3; fi; '
    'exec /bin/busybox httpd -f -p "$HOST:$PORT" -h /tmp/www'
)
SPEC = """
app: {app}
image:
  context: ./app
  workdir: /
  entrypoint: ["/bin/busybox", "sh", "-c", {script}]
service:
  port: 8000
  replicas: {replicas}
  health: {{http: /, interval: 1s, timeout: 2s, start_period: 30s}}
  env:
    VERSION: ${{VERSION:-v1}}
    HEALTHY: ${{HEALTHY:-1}}
    CRASH_AFTER: ${{CRASH_AFTER:-0}}
  secrets: {{API_KEY: {{env: KUBE_E2E_API_KEY}}}}
environments:
  staging:
    runtime: kubernetes
    listen: 127.0.0.1:{port}
    deploy_timeout: {deploy_timeout}
    drain_timeout: 1s
    keep_warm: 10m
    strategy: {{type: {strategy}, batch: 1{steps}}}
    kubernetes: {{namespace: {namespace}, service: {{port: 80}}}}
"""
SECRET_VALUE = "kube-e2e-secret-value-7f3a"
SERVICE = f"{APP}-staging"


@dataclass
class KubeProject(Project):
    """A project deploying to the test cluster; ``served`` goes through the Service."""

    cluster: Any = None
    namespace: str = ""

    def served(self) -> str:
        return str(self.cluster.service_get(self.namespace, SERVICE, 80)).strip()

    def kubectl(self, *args: str) -> str:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.cluster.kubeconfig), "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


@dataclass
class ServiceLoad:
    """Sequential GETs through the Service from a thread, counting failures (bounded)."""

    project: KubeProject
    max_requests: int = 5000
    max_seconds: float = 240.0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    bodies: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while not self._stop.is_set() and sent < self.max_requests and time.monotonic() < deadline:
            sent += 1
            try:
                body = self.project.served()
            except (OSError, urllib.error.URLError) as exc:
                self.failed += 1
                self.errors.append(repr(exc))
            else:
                self.ok += 1
                self.bodies.add(body)
            time.sleep(0.02)

    def __enter__(self) -> ServiceLoad:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@pytest.fixture
def make_project(
    tmp_path: Path, kube_testbed: Any, kube_namespace: str
) -> Iterator[Callable[..., KubeProject]]:
    """A project deploying ``staging`` to its own namespace of the test cluster."""
    if not BUSYBOX.is_file():
        pytest.skip(f"{BUSYBOX} is missing: install busybox-static")

    def _make(
        replicas: int = 2,
        deploy_timeout: str = "60s",
        strategy: str = "blue-green",
        steps: str = "[{weight: 50, pause: manual}]",
    ) -> KubeProject:
        root = tmp_path / "project"
        (root / "app" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, root / "app" / "bin" / "busybox")
        port = free_port()
        (root / "castiron.yaml").write_text(
            SPEC.format(
                app=APP,
                script=json.dumps(SCRIPT),
                replicas=replicas,
                port=port,
                deploy_timeout=deploy_timeout,
                strategy=strategy,
                steps=f", steps: {steps}" if strategy == "canary" else "",
                namespace=kube_namespace,
            )
        )
        env = project_env(root, ("VERSION", "HEALTHY", "CRASH_AFTER", "KUBE_E2E_API_KEY"))
        env["CASTIRON_KUBERNETES_DOCKER_HOST"] = kube_testbed.docker_host
        env["KUBECONFIG"] = str(kube_testbed.kubeconfig)
        env["KUBE_E2E_API_KEY"] = SECRET_VALUE
        made.append(root)
        return KubeProject(root, port, env, cluster=kube_testbed, namespace=kube_namespace)

    made: list[Path] = []
    yield _make
    for root in made:  # the host agent a command started for this home
        reap_home(root / ".castiron")


def _deployments(project: KubeProject) -> list[dict[str, Any]]:
    data = json.loads(project.kubectl("get", "deployments", "-o", "json", "--show-managed-fields"))
    return list(data["items"])


def _instances(made: dict[str, Any]) -> list[str]:
    """The instances a release's Deployment runs (its annotation)."""
    text = made["metadata"].get("annotations", {}).get("castiron.dev/instances", "")
    return [i for i in text.split(",") if i]


def test_blue_green_rollback_secrets_down(make_project: Callable[..., KubeProject]) -> None:
    project = make_project(replicas=2)
    project.bake("v1")
    first = project.deploy("v1", "one")
    assert project.served() == "one"
    assert project.ok("logs", "staging").count("serving one") == 2  # the pods' own output
    status = project.status()
    assert status["release"] == first["release"]
    # One Deployment per release, its pods the instances; castiron's labels, image by ID,
    # never pulled, hardened.
    made = _deployments(project)
    assert len(made) == 1
    assert made[0]["metadata"]["name"] == f"{APP}-staging-{first['release']}"
    assert made[0]["spec"]["replicas"] == 2
    assert len(_instances(made[0])) == 2
    managers = {m["manager"] for m in made[0]["metadata"]["managedFields"]}
    assert {"castiron", "castiron-scale"} <= managers
    labels = made[0]["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "castiron"
    assert labels["castiron.dev/release"] == first["release"]
    container = made[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["imagePullPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Secrets: a Secret per release, referenced by valueFrom; never in castiron's state.
    secrets = json.loads(
        project.kubectl(
            "get", "secrets", "-l", "app.kubernetes.io/managed-by=castiron", "-o", "json"
        )
    )
    assert len(secrets["items"]) == 1
    assert {
        "name": "API_KEY",
        "valueFrom": {
            "secretKeyRef": {"name": f"{made[0]['metadata']['name']}-secrets", "key": "API_KEY"}
        },
    } in container["env"]
    for path in project.home.rglob("*"):
        if path.is_file():
            assert SECRET_VALUE.encode() not in path.read_bytes(), path
    # Blue-green under load through the Service: no failed request.
    with ServiceLoad(project) as load:
        second = project.deploy("v1", "two")
        wait_for(lambda: "two" in load.bodies, timeout=30, what="v2 through the Service")
    assert load.failed == 0, load.errors[:5]
    assert load.bodies <= {"one", "two"}
    assert project.served() == "two"
    assert len(_deployments(project)) == 2  # the previous release is kept warm
    # Warm rollback: the selector flips back to the warm release.
    with ServiceLoad(project) as load:
        rolled = project.json("rollback", "staging")
        wait_for(lambda: project.served() == "one", timeout=30, what="rollback to one")
    assert load.failed == 0, load.errors[:5]
    assert rolled["release"] == first["release"]
    svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
    assert svc["spec"]["selector"]["castiron.dev/release"] == first["release"]
    assert second["release"] != first["release"]
    # down removes every object castiron made, and the Service.
    project.ok("down", "staging", "--yes")
    wait_for(lambda: not _deployments(project), timeout=30, what="deployments removed")
    left = json.loads(
        project.kubectl(
            "get", "services,secrets", "-l", "app.kubernetes.io/managed-by=castiron", "-o", "json"
        )
    )
    assert left["items"] == []


def test_unhealthy_release_is_refused(make_project: Callable[..., KubeProject]) -> None:
    project = make_project(replicas=1, deploy_timeout="15s")
    project.bake("v1")
    first = project.deploy("v1", "one")
    proc = project.run(
        "deploy", "staging", "--image", "v1", "--yes", extra={"VERSION": "bad", "HEALTHY": "0"}
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not healthy after 15s" in proc.stderr
    assert project.served() == "one"
    names = {d["metadata"]["labels"]["castiron.dev/release"] for d in _deployments(project)}
    wait_for(
        lambda: (
            {d["metadata"]["labels"]["castiron.dev/release"] for d in _deployments(project)}
            == {first["release"]}
        ),
        timeout=30,
        what="the refused release's Deployment deleted",
    )
    assert first["release"] in names


def test_rolling_under_load(make_project: Callable[..., KubeProject]) -> None:
    project = make_project(replicas=2, strategy="rolling")
    project.bake("v1")
    project.deploy("v1", "one")
    with ServiceLoad(project) as load:
        second = project.deploy("v1", "two")
        wait_for(lambda: project.served() == "two", timeout=30, what="two served")
    assert load.failed == 0, load.errors[:5]
    assert load.bodies <= {"one", "two"}
    # The previous release was scaled down batch by batch, to nothing.
    wait_for(
        lambda: (
            [d["metadata"]["name"] for d in _deployments(project)]
            == [f"{APP}-staging-{second['release']}"]
        ),
        timeout=30,
        what="only the new release's Deployment left",
    )


def test_drift_found_and_fixed(make_project: Callable[..., KubeProject]) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    project.deploy("v1", "one")
    (made,) = _deployments(project)
    name = made["metadata"]["name"]
    (instance,) = _instances(made)
    project.kubectl("set", "env", f"deployment/{name}", "VERSION=hacked")
    proc = project.run("drift", "staging", "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    findings = json.loads(proc.stdout)["findings"]
    assert {"kind": "config", "instance": instance, "path": "env.VERSION"}.items() <= findings[
        0
    ].items()
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    wait_for(lambda: project.served() == "one", timeout=60, what="fixed instance serving")
    assert project.run("drift", "staging").returncode == 0
    (after,) = _deployments(project)
    assert instance not in _instances(after)  # replaced, never modified
    env = after["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "VERSION", "value": "one"} in env
    # `kubectl scale`: more pods than castiron's instances.
    project.kubectl("scale", f"deployment/{name}", "--replicas=3")
    proc = project.run("drift", "staging", "--json")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert {f["path"] for f in json.loads(proc.stdout)["findings"]} == {"replicas"}
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    (scaled,) = _deployments(project)
    assert scaled["spec"]["replicas"] == 1 == len(_instances(scaled))
    assert project.run("drift", "staging").returncode == 0


@pytest.mark.parametrize("step", ["health", "switched"])
def test_kill_during_deploy_then_recovery(
    make_project: Callable[..., KubeProject], step: str
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    first = project.deploy("v1", "one")
    proc = project.start(
        "deploy", "staging", "--yes", extra={"VERSION": "two", "CASTIRON_TEST_PAUSE_AT": step}
    )
    try:
        wait_for(lambda: (project.home / f"paused-at-{step}").exists(), timeout=120, what="pause")
        assert project.served() in ("one", "two")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    status = project.status()  # the next command recovers
    after_switch = STEPS.index(step) >= STEPS.index("switched")
    assert project.served() == ("two" if after_switch else "one")
    if not after_switch:
        assert status["release"] == first["release"]
    history = project.json("history", "staging")["deployments"]
    assert isinstance(history, list)
    assert history[0]["outcome"] == ("succeeded" if after_switch else "aborted")
    assert history[0]["recovered"] is True
    serving = str(status["release"])
    expected = {first["release"], serving} if after_switch else {first["release"]}
    wait_for(
        lambda: (
            {d["metadata"]["labels"]["castiron.dev/release"] for d in _deployments(project)}
            == expected
        ),
        timeout=30,
        what="only the recorded releases' Deployments left",
    )
    db = sqlite3.connect(project.home / "state.db")
    try:
        recorded = {row[0] for row in db.execute("select id from instances")}
    finally:
        db.close()
    assert recorded == {i for d in _deployments(project) for i in _instances(d)}


def test_canary_abort_restores_stable(make_project: Callable[..., KubeProject]) -> None:
    project = make_project(replicas=1, strategy="canary")
    project.bake("v1")
    stable = project.deploy("v1", "one")["release"]
    proc = project.start(
        "deploy", "staging", "--image", "v1", "--yes", "--json", extra={"VERSION": "two"}
    )
    try:
        # At the manual step the selector spans both releases (replica-ratio weights).
        wait_for(
            lambda: "two" in {project.served() for _ in range(6)},
            timeout=120,
            what="the canary to take its share",
        )
        svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
        assert "castiron.dev/release" not in svc["spec"]["selector"]
        result = project.json("abort", "staging")
        _out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert result["outcome"] == "aborted" and result["release"] == stable
    assert proc.returncode == 1, err
    svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
    assert svc["spec"]["selector"]["castiron.dev/release"] == stable
    assert {project.served() for _ in range(6)} == {"one"}
    wait_for(
        lambda: (
            {d["metadata"]["labels"]["castiron.dev/release"] for d in _deployments(project)}
            == {stable}
        ),
        timeout=30,
        what="the canary's Deployment deleted",
    )


def test_canary_pods_failing_abort_it(make_project: Callable[..., KubeProject]) -> None:
    """The canary's pods become Ready, then their container exits (the kubelet would restart
    it): the analysis (from the pods: a Service counts no requests) aborts the canary during
    its step, and stable serves everything again."""
    project = make_project(replicas=1, strategy="canary", steps="[{weight: 50, pause: 40s}]")
    project.bake("v1")
    stable = project.deploy("v1", "one")["release"]
    proc = project.run(
        "deploy", "staging", "--image", "v1", "--yes",
        extra={"VERSION": "two", "CRASH_AFTER": "3"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "aborted at step 1/1" in proc.stderr, proc.stderr
    # (the container's exit status is named when the kubelet has reported it by then)
    assert "is not Ready" in proc.stderr, proc.stderr
    svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
    assert svc["spec"]["selector"]["castiron.dev/release"] == stable
    assert {project.served() for _ in range(6)} == {"one"}
    wait_for(
        lambda: (
            {d["metadata"]["labels"]["castiron.dev/release"] for d in _deployments(project)}
            == {stable}
        ),
        timeout=30,
        what="the canary's Deployment deleted",
    )


def test_drift_selector_elsewhere_and_deleted_by_hand(
    make_project: Callable[..., KubeProject],
) -> None:
    project = make_project(replicas=1)
    project.bake("v1")
    first = project.deploy("v1", "one")
    assert project.run("drift", "staging").returncode == 0  # server defaults are not drift
    # An edit of a field castiron set, found by the server-side apply dry-run diff.
    (made,) = _deployments(project)
    loosen = {"spec": {"template": {"spec": {"automountServiceAccountToken": True}}}}
    project.kubectl("patch", "deployment", made["metadata"]["name"], "-p", json.dumps(loosen))
    found = project.run("drift", "staging", "--json")
    assert found.returncode == 3, found.stdout + found.stderr
    paths = {f["path"] for f in json.loads(found.stdout)["findings"]}
    assert any(p.endswith("spec.template.spec.automountServiceAccountToken") for p in paths)
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert project.run("drift", "staging").returncode == 0
    patch = json.dumps({"spec": {"selector": {"castiron.dev/release": "elsewhere"}}})
    project.kubectl("patch", "service", SERVICE, "-p", patch)
    found = project.run("drift", "staging", "--json")
    assert found.returncode == 3, found.stdout + found.stderr
    kinds = {f["kind"] for f in json.loads(found.stdout)["findings"]}
    assert kinds == {"membership"}
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
    assert svc["spec"]["selector"]["castiron.dev/release"] == first["release"]
    assert project.served() == "one"
    # The Service's type and ports edited by hand: found key by key, fixed by applying it
    # again (the same object, no instance replaced).
    before = svc
    extra = {"name": "debug", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
    edit = {"spec": {"type": "NodePort", "ports": [*svc["spec"]["ports"], extra]}}
    project.kubectl("patch", "service", SERVICE, "-p", json.dumps(edit))
    found = project.run("drift", "staging", "--json")
    assert found.returncode == 3, found.stdout + found.stderr
    paths = {f["path"] for f in json.loads(found.stdout)["findings"]}
    assert any("spec.type" in p for p in paths), paths
    assert any("spec.ports[debug]" in p for p in paths), paths
    pods = {d["metadata"]["name"] for d in _deployments(project)}
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    svc = json.loads(project.kubectl("get", "service", SERVICE, "-o", "json"))
    assert svc["spec"]["type"] == before["spec"]["type"]
    assert [p["name"] for p in svc["spec"]["ports"]] == [p["name"] for p in before["spec"]["ports"]]
    assert svc["metadata"]["uid"] == before["metadata"]["uid"]
    assert {d["metadata"]["name"] for d in _deployments(project)} == pods
    assert project.run("drift", "staging").returncode == 0
    assert project.served() == "one"
    (made,) = _deployments(project)
    project.kubectl("delete", "deployment", made["metadata"]["name"])
    found = project.run("drift", "staging", "--json")
    assert found.returncode == 3, found.stdout + found.stderr
    fixed = project.run("drift", "staging", "--fix")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    wait_for(lambda: project.served() == "one", timeout=60, what="a replacement serving")
    assert project.run("drift", "staging").returncode == 0
