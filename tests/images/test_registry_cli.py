"""``castiron push`` / ``castiron pull`` through the CLI, a deploy plan and a bake base named by
a registry reference, against a real docker-registry on 127.0.0.1."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from castiron.engine.imageref import resolve_image_reference
from castiron.images import provenance
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, run_bake, write_tree
from .registrykit import Registry

pytestmark = pytest.mark.registry

SPEC = """
app: hello
image:
  base: {base}
  context: ./app
  entrypoint: ["/bin/true"]
service:
  port: 8080
environments:
  staging: {{listen: "127.0.0.1:18080"}}
"""


def _json(result: Any, code: int = 0) -> dict[str, Any]:
    assert result.exit_code == code, result.stderr
    return dict(json.loads(result.stdout))


@pytest.fixture
def pushed(registry: Registry, run_cli: Any, home: Path, tmp_path: Path) -> tuple[str, str]:
    """v1 baked into the CLI's store, signed, and pushed: (reference, digest)."""
    result = run_bake(home / "images", write_tree(tmp_path / "ctx", APP_FILES), tags=("v1",))
    _json(run_cli("keys", "generate", "--out", str(tmp_path / "release"), "--json"))
    _json(run_cli("sign", "v1", "--key", str(tmp_path / "release.key"), "--json"))
    ref = f"{registry.host}/cli/hello-{uuid.uuid4().hex[:8]}:v1"
    out = _json(run_cli("push", "v1", ref, "--json"))
    assert out["digest"] == result.digest and out["tag"] == "v1"
    assert out["reference"] == f"{ref.rsplit(':', 1)[0]}@{result.digest}"
    assert out["layers_skipped"] == 0 and out["bytes_sent"] > 0
    assert len(out["cosign_tags"]) == 2
    return ref, result.digest


def test_push_again_sends_nothing(run_cli: Any, pushed: tuple[str, str]) -> None:
    ref, digest = pushed
    again = _json(run_cli("push", digest, ref, "--json"))
    assert again["bytes_sent"] == 0 and again["layers_skipped"] == len(again["blobs"])
    text = run_cli("push", "v1", ref)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == f"pushed {ref.rsplit(':', 1)[0]}@{digest}"


def test_pull_verifies_and_tags_only_when_asked(
    run_cli: Any, pushed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, digest = pushed
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "other"))
    out = _json(run_cli("pull", ref, "--verify", str(tmp_path / "release.pub"), "--json"))
    assert out["digest"] == digest and out["tag"] is None
    assert out["verified_by"] == str(tmp_path / "release.pub")
    store = ImageStore(tmp_path / "other" / "images")
    assert store.tags() == {} and store.resolve(digest) == digest
    tagged = _json(run_cli("pull", f"{ref.rsplit(':', 1)[0]}@{digest}", "--tag", "v1", "--json"))
    assert tagged["tag"] == "v1" and tagged["bytes_received"] == 0
    assert store.resolve("v1") == digest
    assert run_cli("verify", "v1", "--key", str(tmp_path / "release.pub")).exit_code == 0


def test_pull_refusals(
    run_cli: Any,
    pushed: tuple[str, str],
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, _ = pushed
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "other"))
    bad = run_cli("pull", "not a ref")
    assert bad.exit_code == 2
    assert bad.stderr == (
        "error: invalid registry reference 'not a ref': expected host[:port]/repo[:tag]\n"
    )
    name = ref.rsplit(":", 1)[0]
    missing = run_cli("pull", f"{name}:v404")
    assert missing.exit_code == 2
    repo = name.split("/", 1)[1]
    assert missing.stderr == f"error: registry {registry.host}: {repo} has no tag 'v404'\n"
    _json(run_cli("keys", "generate", "--out", str(tmp_path / "stranger"), "--json"))
    refused = run_cli("pull", ref, "--verify", str(tmp_path / "stranger.pub"))
    assert refused.exit_code == 5
    assert refused.stderr.startswith(f"error: pull of {ref}: image ")
    images = tmp_path / "other" / "images"
    assert [p.name for p in (images / "blobs" / "sha256").iterdir()] == []
    assert ImageStore(images).index() == []


def test_push_refusals(run_cli: Any, registry: Registry) -> None:
    unknown = run_cli("push", "nope", f"{registry.host}/cli/x:v1")
    assert unknown.exit_code == 2
    assert unknown.stderr.startswith("error: no image tagged 'nope' in ")
    bad = run_cli("push", "v1", "cli/x:v1")
    assert bad.exit_code == 2
    assert bad.stderr == (
        "error: invalid registry reference 'cli/x:v1': expected host[:port]/repo[:tag] "
        "(the host has a dot or a port, or is localhost)\n"
    )


def test_plan_resolves_a_registry_reference_before_the_plan(
    run_cli: Any, pushed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, digest = pushed
    project = tmp_path / "proj"
    (project / "app").mkdir(parents=True)
    (project / "castiron.yaml").write_text(SPEC.format(base="scratch"))
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "deployer"))
    monkeypatch.chdir(project)
    plan = _json(run_cli("plan", "staging", "--image", ref, "--json"))
    assert plan["digest"] == digest and plan["tag"] is None
    store = ImageStore(tmp_path / "deployer" / "images")
    assert store.image(digest).digest == digest  # pulled once, by the plan


def test_resolve_image_reference_leaves_store_names_alone(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    assert resolve_image_reference(store, "v1", {}) == "v1"
    assert resolve_image_reference(store, None, {}) is None
    assert not store.root.exists()


def test_bake_on_a_registry_base_pins_its_digest(
    run_cli: Any, pushed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, digest = pushed
    project = tmp_path / "proj"
    write_tree(project / "app", {"extra.txt": "on top\n"})
    (project / "castiron.yaml").write_text(SPEC.format(base=ref))
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "builder"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    baked = _json(run_cli("-f", str(project / "castiron.yaml"), "bake", "--tag", "app1", "--json"))
    store = ImageStore(tmp_path / "builder" / "images")
    (statement,) = provenance.read(store, baked["digest"])
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    name = ref.rsplit(":", 1)[0]
    assert {"uri": f"{name}@{digest}", "digest": {"sha256": digest.split(":")[1]}} in deps
    base_layers = store.image(digest).layers
    assert store.image(baked["digest"]).layers[: len(base_layers)] == base_layers


def test_progress_shows_every_blob_with_bytes_and_rate(registry: Registry, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from castiron.cli.commands.registry_cmd import transfer_progress
    from castiron.images import oci
    from castiron.images.registry import parse_reference, pull, push

    result = run_bake(tmp_path / "store", write_tree(tmp_path / "ctx", APP_FILES), tags=("v1",))
    store = ImageStore(tmp_path / "store")
    ref = parse_reference(f"{registry.host}/cli/progress-{uuid.uuid4().hex[:8]}:v1")
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with transfer_progress(console) as observer:
        push(store, result.digest, ref, environ={}, observer=observer)
        pull(ImageStore(tmp_path / "other"), ref, environ={}, observer=observer)
    text = out.getvalue()
    image = store.image(result.digest)
    for blob in [image.config_descriptor, *image.layers]:
        assert f"uploaded {oci.short(blob.digest)}" in text
        assert f"downloaded {oci.short(blob.digest)}" in text
    size = image.config_descriptor.size
    assert f"{size}/{size} bytes" in text  # bytes done/total (and a rate, once measurable)


def test_tls_flags_and_environment_credentials(
    run_cli: Any,
    tls_registry: Registry,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from .registrykit import PASSWORD, USER

    run_bake(home / "images", write_tree(tmp_path / "ctx", APP_FILES), tags=("v1",))
    ref = f"{tls_registry.host}/cli/tls-{uuid.uuid4().hex[:8]}:v1"
    monkeypatch.setenv("CASTIRON_REGISTRY_USERNAME", USER)
    monkeypatch.setenv("CASTIRON_REGISTRY_PASSWORD", PASSWORD)
    untrusted = run_cli("push", "v1", ref)
    assert untrusted.exit_code == 1
    assert untrusted.stderr.startswith(
        f"error: registry {tls_registry.host}: TLS certificate not trusted ("
    )
    assert PASSWORD not in untrusted.stderr
    pushed = _json(run_cli("push", "v1", ref, "--ca-file", str(tls_registry.ca_file), "--json"))
    assert pushed["bytes_sent"] > 0
    # --insecure accepts the certificate unverified (never downgrading to plain HTTP here)
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "other"))
    pulled = _json(run_cli("pull", ref, "--insecure", "--json"))
    assert pulled["digest"] == pushed["digest"]
    monkeypatch.setenv("CASTIRON_REGISTRY_PASSWORD", "wrong")
    refused = run_cli("pull", ref, "--ca-file", str(tls_registry.ca_file))
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"error: registry {tls_registry.host} refused the credentials of {USER!r} "
        "(from environment)\n"
    )
