"""The Kubernetes client boundary: no library, HTTP or socket error escapes unwrapped, and the
client library is never imported by the CLI's start-up or by the rest of castiron."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from castiron.drivers.kubernetes.client import KubeClient, merge_kubeconfigs
from castiron.drivers.kubernetes.driver import KubernetesDriver
from castiron.drivers.kubernetes.manifests import KubernetesOptions
from castiron.errors import RuntimeDriverError
from castiron.model import Digest, ImageRef, Instance, InstanceSpec, ReleaseId
from castiron.ports import free_port

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: "https://127.0.0.1:{port}", insecure-skip-tls-verify: true}}
users:
- name: u
  user: {{token: t}}
contexts:
- name: c
  context: {{cluster: c, user: u}}
current-context: c
"""


@pytest.fixture
def unreachable(tmp_path: Path) -> KubeClient:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG.format(port=free_port()))
    return KubeClient(kubeconfig=path, timeout=2.0)


def _spec() -> InstanceSpec:
    return InstanceSpec(
        id="i-1",
        app="a",
        environment="e",
        release=ReleaseId("r"),
        image=ImageRef(Digest("sha256:" + "1" * 64), Digest("sha256:" + "2" * 64), Path("/x")),
        command=("x",),
        env={},
        workdir="/",
        port=8000,
    )


def test_unreachable_server_is_one_wrapped_error(unreachable: KubeClient) -> None:
    driver = KubernetesDriver(client=lambda _o: unreachable, options={"e": KubernetesOptions()})
    instance = Instance(
        "i-1",
        "a",
        "e",
        ReleaseId("r"),
        "kubernetes",
        "k8s://default/i-1:8000",
        "default/i-1",
        Digest("sha256:" + "1" * 64),
    )
    calls = [
        lambda: driver.create(_spec()),
        lambda: driver.observe("a", "e"),
        lambda: driver.inspect(instance),
        lambda: driver.destroy(instance, 1.0),
        lambda: driver.readiness(instance.address),
    ]
    for call in calls:
        with pytest.raises(RuntimeDriverError) as caught:
            call()
        assert str(caught.value).startswith("kubernetes: cannot ")
        assert str(caught.value).endswith("ConnectError: [Errno 111] Connection refused")
        assert not isinstance(caught.value.__cause__, RuntimeDriverError)


def test_missing_kubeconfig_is_a_wrapped_error(tmp_path: Path) -> None:
    client = KubeClient(kubeconfig=tmp_path / "nope")
    with pytest.raises(RuntimeDriverError) as caught:
        client.get("Service", "default", "x")
    assert str(caught.value).startswith(
        f"kubernetes: cannot read the kubeconfig ({tmp_path / 'nope'}): "
    )


def test_cli_start_up_does_not_import_the_client_library() -> None:
    code = (
        "import sys\n"
        "from castiron.cli.main import main\n"
        "import castiron.compose, castiron.engine.release\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightkube', 'httpx2')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _kubeconfig(path: Path, *, context: str, server: str, current: str | None = None) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": context, "cluster": {"server": server}}],
                "users": [{"name": context, "user": {"token": f"token-{context}"}}],
                "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
                **({"current-context": current} if current else {}),
            }
        )
    )
    return path


def test_kubeconfig_files_merge_like_kubectl(tmp_path: Path) -> None:
    first = _kubeconfig(tmp_path / "a", context="one", server="https://127.0.0.1:1", current="one")
    second = _kubeconfig(tmp_path / "b", context="two", server="https://127.0.0.1:2", current="two")
    merged = merge_kubeconfigs(
        [yaml.safe_load(first.read_text()), yaml.safe_load(second.read_text())]
    )
    assert merged["current-context"] == "one"  # the first file to set it wins
    assert [c["name"] for c in merged["contexts"]] == ["one", "two"]
    shadow = merge_kubeconfigs(
        [merged, {"clusters": [{"name": "one", "cluster": {"server": "x"}}]}]
    )
    assert shadow["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:1"
    with pytest.raises(ValueError, match="needs a name"):
        merge_kubeconfigs([{"clusters": [{"cluster": {}}]}])


@pytest.mark.parametrize(("context", "port"), [(None, 1), ("one", 1), ("two", 2)])
def test_every_call_goes_to_the_context_named(
    tmp_path: Path, context: str | None, port: int
) -> None:
    first = _kubeconfig(tmp_path / "a", context="one", server="https://127.0.0.1:1", current="one")
    second = _kubeconfig(tmp_path / "b", context="two", server="https://127.0.0.1:2")
    client = KubeClient(kubeconfig=[first, second], context=context)
    config = client._config().get(context_name=context)
    assert config is not None and config.cluster.server == f"https://127.0.0.1:{port}"
    assert client.context == context


def test_an_unknown_context_is_one_wrapped_error(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path / "a", context="one", server="https://127.0.0.1:1", current="one")
    client = KubeClient(kubeconfig=path, context="nope")
    with pytest.raises(RuntimeDriverError, match=r"cannot read the kubeconfig.*nope"):
        client.get("Pod", "default", "x")


def test_without_kubeconfig_files_nothing_found_is_an_error(tmp_path: Path) -> None:
    client = KubeClient(kubeconfig=[tmp_path / "missing"])
    with pytest.raises(RuntimeDriverError, match="no kubeconfig file found"):
        client.get("Pod", "default", "x")
