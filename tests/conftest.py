"""Shared fixtures: a per-test CASTIRON_HOME, an in-process CLI runner, and the CI guard.

The CI guard: with CI=true, a skipped test marked ``docker``, ``haproxy``, ``sandbox``,
``browser``, ``terraform``, ``registry`` or ``postgres`` fails the session, because those legs
must run in CI.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from castiron.cli.main import main

GUARDED_MARKERS = (
    "docker",
    "haproxy",
    "sandbox",
    "browser",
    "terraform",
    "registry",
    "postgres",
    "kubernetes",
)
_guarded_skips: list[str] = []


@dataclass
class CliResult:
    """What a CLI invocation produced."""

    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[object]:
    """A ``docker.DockerClient`` on the local engine; skips (a failure in CI) without one."""
    try:
        import docker
    except ImportError:
        pytest.skip("the docker SDK is not installed")
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        # Probe first: the SDK leaks its socket when the connection fails (a ResourceWarning).
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(host.removeprefix("unix://"))
            except OSError as exc:
                pytest.skip(f"no Docker engine at {host}: {exc}")
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield client
    finally:
        client.close()


BUSYBOX_IMAGE = "castiron-test/busybox:latest"


@pytest.fixture(scope="session")
def busybox_image(docker_engine: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tag of a tiny image built once per session: ``FROM scratch``, ``/bin/busybox``
    (busybox-static), ``CMD ["/bin/busybox", "sh"]``. Get its id with
    ``docker_engine.images.get(busybox_image).id``."""
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        pytest.skip("/bin/busybox is missing: install busybox-static")
    context = tmp_path_factory.mktemp("busybox-image")
    shutil.copy2(busybox, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sh"]\n'
    )
    docker_engine.images.build(
        path=str(context), tag=BUSYBOX_IMAGE, network_mode="host", pull=False, rm=True, forcerm=True
    )
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[object]:
    """A PostgreSQL server of this session (``pgserver.PostgresServer``): Debian's binaries,
    its own data directory, 127.0.0.1 on a free port. Skips (a failure in CI) without them."""
    from pgserver import PostgresServer, find_bin

    bin_dir = find_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: Any, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    import re
    import secrets

    name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    return str(postgres_server.create_database(f"t_{name}_{secrets.token_hex(3)}"))


@pytest.fixture(scope="session")
def kube_testbed() -> object:
    """The test cluster (``kubekit.Cluster``) of ``scripts/k8s-testbed``; skips (a failure
    in CI) without one."""
    from kubekit import Cluster, testbed_problem

    problem = testbed_problem()
    if problem is not None:
        pytest.skip(problem)
    return Cluster.from_env()


@pytest.fixture
def kube_namespace(kube_testbed: Any) -> Iterator[str]:
    """A namespace of its own on the test cluster, deleted after the test."""
    name = str(kube_testbed.create_namespace())
    try:
        yield name
    finally:
        kube_testbed.delete_namespace(name)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh CASTIRON_HOME for the test, set in the environment."""
    path = tmp_path / "home"
    monkeypatch.setenv("CASTIRON_HOME", str(path))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("CASTIRON_ACTOR", "tester@testhost")
    return path


@pytest.fixture
def run_cli(home: Path, capfd: pytest.CaptureFixture[str]) -> Iterator[object]:
    """Run ``castiron ARGS`` in-process; returns a :class:`CliResult`."""

    def _run(*args: str) -> CliResult:
        capfd.readouterr()
        code = main(list(args))
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    yield _run


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(m in report.keywords for m in GUARDED_MARKERS):
        _guarded_skips.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() == "true" and _guarded_skips:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI=true but {len(_guarded_skips)} test(s) needing Docker, HAProxy, a sandbox, "
                "a browser, Terraform, a registry, PostgreSQL or Kubernetes were skipped:",
                red=True,
            )
            for nodeid in _guarded_skips:
                reporter.write_line(f"  {nodeid}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
