"""The Kubernetes test bed as the tests see it: a real cluster from ``scripts/k8s-testbed``.

``scripts/test`` (as root) builds and starts the test bed and exports ``KUBECONFIG`` and
``CASTIRON_KUBERNETES_DOCKER_HOST`` (the node's own Docker engine, into which images are loaded
from castiron's store). Tests marked ``kubernetes`` skip without them, which fails a CI run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from castiron.drivers.kubernetes.client import KubeClient
from castiron.drivers.kubernetes.driver import KubernetesDriver
from castiron.drivers.kubernetes.manifests import LOADED_REPOSITORY, KubernetesOptions
from castiron.model import ImageRef


def testbed_problem() -> str | None:
    """Why no test cluster can be used (None when it can)."""
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig or not Path(kubeconfig).is_file():
        return "no KUBECONFIG (start one with scripts/k8s-testbed start; eval its env)"
    if not os.environ.get("CASTIRON_KUBERNETES_DOCKER_HOST"):
        return "no CASTIRON_KUBERNETES_DOCKER_HOST (the test bed node's Docker engine)"
    try:
        Cluster.from_env().raw("/readyz")
    except (OSError, urllib.error.URLError) as exc:
        return f"the test cluster does not answer: {exc}"
    return None


@dataclass
class Cluster:
    """The API server of the test bed, spoken to over plain HTTPS (the test's own view)."""

    kubeconfig: Path
    docker_host: str
    server: str
    token: str
    ca: ssl.SSLContext

    @classmethod
    def from_env(cls) -> Cluster:
        path = Path(os.environ["KUBECONFIG"])
        config = yaml.safe_load(path.read_text())
        cluster = config["clusters"][0]["cluster"]
        context = ssl.create_default_context()
        context.load_verify_locations(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        return cls(
            kubeconfig=path,
            docker_host=os.environ.get("CASTIRON_KUBERNETES_DOCKER_HOST", ""),
            server=str(cluster["server"]),
            token=str(config["users"][0]["user"]["token"]),
            ca=context,
        )

    def raw(self, path: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
        """One API request; the decoded JSON answer (text when it is not JSON)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=self.ca, timeout=timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the connection
            raise
        try:
            return json.loads(text)
        except ValueError:
            return text

    def service_get(self, namespace: str, service: str, port: int, path: str = "/") -> str:
        """GET ``path`` through the Service, by the API server's service proxy."""
        answer = self.raw(
            f"/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy{path}", timeout=5.0
        )
        return answer if isinstance(answer, str) else json.dumps(answer)

    def client(self) -> KubeClient:
        return KubeClient(kubeconfig=self.kubeconfig)

    def create_namespace(self) -> str:
        """A new namespace, once its default service account exists (pods need it)."""
        name = f"ci-{secrets.token_hex(4)}"
        self.raw("/api/v1/namespaces", "POST", {"metadata": {"name": name}})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(urllib.error.HTTPError):
                self.raw(f"/api/v1/namespaces/{name}/serviceaccounts/default")
                return name
            time.sleep(0.1)
        raise TimeoutError(f"namespace {name}: no default service account after 60s")

    def delete_namespace(self, name: str) -> None:
        with contextlib.suppress(urllib.error.HTTPError):
            self.raw(f"/api/v1/namespaces/{name}", "DELETE")

    def driver(self, root: Path, options: Mapping[str, KubernetesOptions]) -> KubernetesDriver:
        """A driver on the test bed that loads images into its node's Docker engine."""
        from castiron.drivers.docker import DockerDriver, DockerEndpoint
        from castiron.images.archive import export_archive
        from castiron.images.store import ImageStore

        def export(image: ImageRef) -> Path:
            dest = root / "archives" / f"{image.digest.removeprefix('sha256:')}.tar"
            return export_archive(
                ImageStore(image.store), image.digest, "docker-archive", dest
            ).path

        client = self.client()
        loader = DockerDriver(export=export, endpoint=DockerEndpoint(base_url=self.docker_host))

        def load(image: ImageRef) -> None:
            loader.name_image(image, LOADED_REPOSITORY)

        return KubernetesDriver(client=lambda _options: client, options=dict(options), load=load)
