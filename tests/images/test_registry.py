"""Push and pull against a real registry (Debian's docker-registry on 127.0.0.1): the whole
protocol, faults injected by a proxy, TLS with Basic auth, and interop with skopeo and Docker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from castiron.errors import (
    DigestMismatchError,
    NotFoundError,
    PolicyRefusedError,
    RegistryAuthError,
    RegistryError,
)
from castiron.images import oci, provenance
from castiron.images.registry import TransferOptions, TransportOptions, parse_reference, pull, push
from castiron.images.registry.client import RegistryClient
from castiron.images.registry.transfer import cosign_tag, fallback_tag
from castiron.images.sign import (
    DSSE,
    SIGNATURE_ARTIFACT,
    generate_keypair,
    load_signer,
    sign_image,
    verify_image,
)
from castiron.images.store import ImageStore
from castiron.model import Digest

from .bakekit import APP_FILES, recipe, run_bake, write_tree
from .registrykit import PASSWORD, USER, Fault, Registry, fault_proxy

pytestmark = pytest.mark.registry

FAST = TransferOptions(transport=TransportOptions(attempts=4, backoff=0.01))


def _bake(
    tmp_path: Path, files: dict[str, bytes | str] | None = None, tag: str = "v1"
) -> tuple[ImageStore, Digest]:
    context = write_tree(tmp_path / f"ctx-{tag}", files or APP_FILES)
    result = run_bake(tmp_path / "store", context, recipe(layers=["deps/**"]), tags=(tag,))
    return ImageStore(tmp_path / "store"), result.digest


def _signed(tmp_path: Path) -> tuple[ImageStore, Digest, Path]:
    store, digest = _bake(tmp_path)
    pair = generate_keypair(tmp_path / "release")
    sign_image(store, digest, load_signer(pair.private_path), reference="hello:v1")
    return store, digest, pair.public_path


def _blob_puts(reg: Registry, repo: str) -> list[str]:
    """Digests of the blobs whose upload the registry logged as finished (PUT ?digest=)."""
    out = []
    for line in reg.requests("PUT", f"/v2/{repo}/blobs/uploads/"):
        query = urllib.parse.urlsplit(line.split('"')[1].split(" ")[1]).query
        out += urllib.parse.parse_qs(query).get("digest", [])
    return out


def test_push_then_pull_round_trip_with_signatures(registry: Registry, tmp_path: Path) -> None:
    store, digest, public = _signed(tmp_path)
    ref = parse_reference(f"{registry.host}/team/roundtrip:v1")
    pushed = push(store, digest, ref, environ={}, options=FAST)
    assert pushed.reference == f"{registry.host}/team/roundtrip@{digest}"
    assert [b.outcome for b in pushed.blobs] == ["uploaded"] * 3
    assert pushed.bytes_sent == sum(b.size for b in pushed.blobs)
    assert pushed.cosign_tags == (cosign_tag(digest, "sig"), cosign_tag(digest, "att"))
    assert not pushed.referrers_api and len(pushed.referrers) == 3

    target = ImageStore(tmp_path / "elsewhere")
    pulled = pull(target, ref, environ={}, options=FAST, tag="v1", verify_keys=[public])
    assert pulled.digest == digest and pulled.tag == "v1"
    assert pulled.verified_by == str(public)
    assert target.resolve("v1") == digest
    assert target.image(digest).config_digest == store.image(digest).config_digest
    assert verify_image(target, digest, [public]).ok


def test_cosign_tag_scheme(registry: Registry, tmp_path: Path) -> None:
    store, digest, _ = _signed(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/cosign:v1"), environ={})
    client = RegistryClient(registry.host, environ={})
    sig = client.get_manifest("team/cosign", cosign_tag(digest, "sig"))
    att = client.get_manifest("team/cosign", cosign_tag(digest, "att"))
    index = client.get_manifest("team/cosign", fallback_tag(digest))
    client.close()
    assert sig is not None and att is not None and index is not None
    sig_doc, att_doc = json.loads(sig.data), json.loads(att.data)
    (layer,) = sig_doc["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    assert layer["annotations"]["dev.cosignproject.cosign/signature"]
    payload = store.read_blob(layer["digest"])
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == digest
    assert sig_doc["config"]["mediaType"] == oci.CONFIG
    (att_layer,) = att_doc["layers"]
    assert att_layer["mediaType"] == "application/vnd.dsse.envelope.v1+json"
    assert att_layer["annotations"]["predicateType"] == "https://slsa.dev/provenance/v1"
    kinds = sorted(d["artifactType"] for d in json.loads(index.data)["manifests"])
    assert kinds == sorted([DSSE, SIGNATURE_ARTIFACT, oci.IN_TOTO])


def test_only_changed_blobs_are_uploaded(registry: Registry, tmp_path: Path) -> None:
    store, v1 = _bake(tmp_path)
    changed = {**APP_FILES, "server.py": "print('hello, v2')\n"}
    _, v2 = _bake(tmp_path, changed, tag="v2")
    repo = "team/versions"
    push(store, v1, parse_reference(f"{registry.host}/{repo}:v1"), environ={})
    image_v1, image_v2 = store.image(v1), store.image(v2)
    blobs_v1 = {image_v1.config_digest, *(d.digest for d in image_v1.layers)}
    assert set(_blob_puts(registry, repo)) >= blobs_v1
    sent_before = len(_blob_puts(registry, repo))
    second = push(store, v2, parse_reference(f"{registry.host}/{repo}:v2"), environ={})
    sent = _blob_puts(registry, repo)[sent_before:]
    new_layers = {d.digest for d in image_v2.layers} - {d.digest for d in image_v1.layers}
    assert len(new_layers) == 1
    image_blobs_sent = [
        d for d in sent if d in {image_v2.config_digest, *(x.digest for x in image_v2.layers)}
    ]
    assert sorted(image_blobs_sent) == sorted([*new_layers, image_v2.config_digest])
    assert [b.outcome for b in second.blobs].count("skipped") == 1
    heads_before = len(registry.requests("HEAD", f"/v2/{repo}/manifests/"))
    blob_heads_before = len(registry.requests("HEAD", f"/v2/{repo}/blobs/"))
    sent_before = len(_blob_puts(registry, repo))
    again = push(store, v2, parse_reference(f"{registry.host}/{repo}:v2"), environ={})
    assert _blob_puts(registry, repo)[sent_before:] == []  # nothing was sent again
    assert again.bytes_sent == 0 and again.skipped == 3
    # An unchanged re-push checks manifests (the image's, its artifacts'), never each blob.
    assert len(registry.requests("HEAD", f"/v2/{repo}/blobs/")) == blob_heads_before
    assert len(registry.requests("HEAD", f"/v2/{repo}/manifests/")) > heads_before


def test_second_repository_mounts_instead_of_uploading(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/mount-a:v1"), environ={})
    second = push(store, digest, parse_reference(f"{registry.host}/team/mount-b:v1"), environ={})
    assert [b.outcome for b in second.blobs] == ["mounted"] * 3
    assert _blob_puts(registry, "team/mount-b") == []  # artifacts' blobs were mounted too
    mounts = " ".join(registry.requests("POST", "/v2/team/mount-b/blobs/uploads/?mount="))
    assert all(urllib.parse.quote(b.digest) in mounts for b in second.blobs)


@pytest.mark.parametrize("kind", ["close", "swallow"])
def test_chunked_upload_resumes_after_a_dropped_connection(
    registry: Registry, tmp_path: Path, kind: str
) -> None:
    """A chunk's connection drops with no answer, the chunk lost (``close``) or held by the
    registry (``swallow``): the upload asks the registry what it holds and goes on from there.
    (A ``drop`` after the head would deliver a whole 202, whose body is empty: no fault.)"""
    big = {**APP_FILES, "deps/blob.bin": os.urandom(1 << 20)}  # does not compress
    store, digest = _bake(tmp_path, big)
    dropped: list[str] = []

    def rule(method: str, path: str) -> Fault | None:
        if method == "PATCH" and not dropped:
            dropped.append(path)
            return Fault(kind)
        return None

    options = TransferOptions(
        transport=TransportOptions(attempts=4, backoff=0.01),
        monolithic_max=64 * 1024,
        chunk_size=256 * 1024,
    )
    with fault_proxy(registry.host, rule) as proxy:
        result = push(
            store,
            digest,
            parse_reference(f"{proxy.host}/team/chunked:v1"),
            environ={},
            options=options,
        )
        assert dropped, "the proxy never saw a chunk"
        assert ("GET", dropped[0].split("?")[0]) in [
            (m, p.split("?")[0]) for m, p in proxy.seen
        ]  # asked the registry how much it holds
    assert "uploaded" in [b.outcome for b in result.blobs]
    target = ImageStore(tmp_path / "check")
    assert pull(target, parse_reference(f"{registry.host}/team/chunked:v1"), environ={}).digest == (
        digest
    )


def test_pull_resumes_a_dropped_blob_with_a_range_request(
    registry: Registry, tmp_path: Path
) -> None:
    store, digest = _bake(tmp_path, {**APP_FILES, "deps/blob.bin": b"x" * (1 << 20)})
    push(store, digest, parse_reference(f"{registry.host}/team/resume:v1"), environ={})
    dropped: list[str] = []

    def rule(method: str, path: str) -> Fault | None:
        if method == "GET" and "/blobs/" in path and not dropped:
            dropped.append(path)
            return Fault("drop", after=100)
        return None

    with fault_proxy(registry.host, rule) as proxy:
        target = ImageStore(tmp_path / "elsewhere")
        pulled = pull(
            target, parse_reference(f"{proxy.host}/team/resume:v1"), environ={}, options=FAST
        )
    assert pulled.digest == digest and dropped
    assert target.image(digest).layers == store.image(digest).layers


def test_retries_server_errors_with_backoff(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    failures: list[str] = []

    def rule(method: str, path: str) -> Fault | None:
        if method == "HEAD" and len(failures) < 2:
            failures.append(path)
            return Fault("status", status=503)
        return None

    sleeps: list[float] = []
    options = TransferOptions(
        transport=TransportOptions(attempts=3, backoff=0.05, sleep=sleeps.append)
    )
    with fault_proxy(registry.host, rule) as proxy:
        push(
            store,
            digest,
            parse_reference(f"{proxy.host}/team/retry:v1"),
            environ={},
            options=options,
        )
    assert sleeps[:2] == [0.05, 0.1]


def test_a_registry_that_keeps_failing_is_one_clear_error(
    registry: Registry, tmp_path: Path
) -> None:
    store, digest = _bake(tmp_path)
    always = Fault("status", status=500)
    with (
        fault_proxy(registry.host, lambda m, p: always) as proxy,
        pytest.raises(RegistryError) as err,
    ):
        push(store, digest, parse_reference(f"{proxy.host}/team/down:v1"), environ={}, options=FAST)
    assert str(err.value) == (
        f"registry {proxy.host}: HEAD /v2/team/down/manifests/v1 failed after 4 "
        "attempt(s): HTTP 500"
    )


def _store_is_empty(store: ImageStore) -> bool:
    blobs = list(store.blobs_dir.iterdir()) if store.blobs_dir.exists() else []
    return [b for b in blobs if not b.name.startswith(".tmp-")] == [] and store.index() == []


def test_a_registry_that_lies_about_a_blob_is_refused(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/liar:v1"), environ={})
    layer = store.image(digest).layers[-1].digest

    def rule(method: str, path: str) -> Fault | None:
        return Fault("corrupt") if method == "GET" and path.endswith(layer) else None

    target = ImageStore(tmp_path / "victim")
    with fault_proxy(registry.host, rule) as proxy, pytest.raises(DigestMismatchError) as err:
        pull(target, parse_reference(f"{proxy.host}/team/liar:v1"), environ={}, options=FAST)
    assert str(err.value) == (
        f"registry {proxy.host}: team/liar layer 2 {layer}: content does not match its digest; "
        "refused, nothing stored"
    )
    assert _store_is_empty(target)


def test_a_registry_that_lies_about_a_manifest_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/liar-m:v1"), environ={})

    def rule(method: str, path: str) -> Fault | None:
        return Fault("corrupt") if "/manifests/" in path else None

    target = ImageStore(tmp_path / "victim")
    with fault_proxy(registry.host, rule) as proxy, pytest.raises(DigestMismatchError) as err:
        pull(target, parse_reference(f"{proxy.host}/team/liar-m@{digest}"), environ={})
    assert str(err.value).startswith(
        f"registry {proxy.host}: manifest team/liar-m:{digest} hashes to sha256:"
    )
    assert _store_is_empty(target)


def test_truncated_blobs_are_refused_after_retries(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/short:v1"), environ={})
    layer = store.image(digest).layers[-1]

    def rule(method: str, path: str) -> Fault | None:
        return Fault("drop", after=10) if method == "GET" and path.endswith(layer.digest) else None

    target = ImageStore(tmp_path / "victim")
    with fault_proxy(registry.host, rule) as proxy, pytest.raises(RegistryError) as err:
        pull(target, parse_reference(f"{proxy.host}/team/short:v1"), environ={}, options=FAST)
    assert f"got 40 of {layer.size} bytes after 4 tries; the body was truncated" in str(err.value)
    assert _store_is_empty(target)


def test_a_manifest_too_large_is_refused(registry: Registry, tmp_path: Path) -> None:
    def rule(method: str, path: str) -> Fault | None:
        return Fault("huge") if "/manifests/" in path else None

    target = ImageStore(tmp_path / "victim")
    with fault_proxy(registry.host, rule) as proxy, pytest.raises(RegistryError) as err:
        pull(target, parse_reference(f"{proxy.host}/team/huge:v1"), environ={})
    assert str(err.value) == (
        f"registry {proxy.host}: manifest team/huge:v1 is 5242880 bytes, more than the "
        "4194304 castiron accepts"
    )
    assert _store_is_empty(target)


def test_missing_tag_and_unsigned_verify(registry: Registry, tmp_path: Path) -> None:
    target = ImageStore(tmp_path / "victim")
    with pytest.raises(NotFoundError) as err:
        pull(target, parse_reference(f"{registry.host}/team/nothing:v9"), environ={})
    assert str(err.value) == f"registry {registry.host}: team/nothing has no tag 'v9'"
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/unsigned:v1"), environ={})
    pair = generate_keypair(tmp_path / "k")
    with pytest.raises(PolicyRefusedError) as refused:
        pull(
            target,
            parse_reference(f"{registry.host}/team/unsigned:v1"),
            environ={},
            tag="v1",
            verify_keys=[pair.public_path],
        )
    assert str(refused.value).startswith(f"pull of {registry.host}/team/unsigned:v1: image ")
    assert "signature: no signature" in str(refused.value)
    assert _store_is_empty(target)


def test_index_pull_selects_the_host_platform(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    repo = "team/multi"
    push(store, digest, parse_reference(f"{registry.host}/{repo}:amd"), environ={})
    image = store.image(digest)
    host = oci.host_platform()
    other = "s390x" if host["architecture"] != "s390x" else "arm64"
    index = oci.canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": oci.INDEX,
            "manifests": [
                {
                    **image.descriptor().to_json(),
                    "platform": {"os": "linux", "architecture": other},
                },
                {**image.descriptor().to_json(), "platform": host},
            ],
        }
    )
    client = RegistryClient(registry.host, environ={})
    client.put_manifest(repo, "multi", index, oci.INDEX)
    client.close()
    target = ImageStore(tmp_path / "elsewhere")
    pulled = pull(target, parse_reference(f"{registry.host}/{repo}:multi"), environ={})
    assert pulled.digest == digest
    assert pulled.index_digest == "sha256:" + hashlib.sha256(index).hexdigest()


def test_unknown_and_unreachable_registries(tmp_path: Path) -> None:
    from castiron.ports import free_port

    store, digest = _bake(tmp_path)
    with pytest.raises(RegistryError) as err:
        push(
            store, digest, parse_reference("registry.invalid/team/app:v1"), environ={}, options=FAST
        )
    assert str(err.value) == ("unknown registry registry.invalid: its host name does not resolve")
    port = free_port()
    with pytest.raises(RegistryError) as refused:
        push(
            store,
            digest,
            parse_reference(f"127.0.0.1:{port}/team/app:v1"),
            environ={},
            options=FAST,
        )
    assert str(refused.value) == (
        f"registry 127.0.0.1:{port}: HEAD /v2/team/app/manifests/v1 failed after 4 "
        "attempt(s): connection refused"
    )


# -- TLS and Basic auth ------------------------------------------------------------------


def _tls(reg: Registry) -> TransferOptions:
    return TransferOptions(
        transport=TransportOptions(ca_file=reg.ca_file, attempts=2, backoff=0.01)
    )


def _docker_config(tmp_path: Path, host: str, user: str, password: str) -> dict[str, str]:
    import base64

    folder = tmp_path / "docker-config"
    folder.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return {"DOCKER_CONFIG": str(folder)}


def test_tls_with_basic_auth_from_docker_config(tls_registry: Registry, tmp_path: Path) -> None:
    store, digest, public = _signed(tmp_path)
    env = _docker_config(tmp_path, tls_registry.host, USER, PASSWORD)
    ref = parse_reference(f"{tls_registry.host}/team/private:v1")
    push(store, digest, ref, environ=env, options=_tls(tls_registry))
    target = ImageStore(tmp_path / "elsewhere")
    pulled = pull(target, ref, environ=env, options=_tls(tls_registry), verify_keys=[public])
    assert pulled.digest == digest


def test_tls_refusals(tls_registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    ref = parse_reference(f"{tls_registry.host}/team/private:v1")
    host = tls_registry.host
    with pytest.raises(RegistryError) as untrusted:
        push(store, digest, ref, environ={}, options=FAST)
    assert str(untrusted.value).startswith(f"registry {host}: TLS certificate not trusted (")
    with pytest.raises(RegistryAuthError) as anonymous:
        push(store, digest, ref, environ={}, options=_tls(tls_registry))
    assert str(anonymous.value) == (
        f"registry {host} needs credentials and none were found (docker login, "
        "~/.docker/config.json or CASTIRON_REGISTRY_USERNAME/PASSWORD)"
    )
    env = {"CASTIRON_REGISTRY_USERNAME": USER, "CASTIRON_REGISTRY_PASSWORD": "wrong"}
    with pytest.raises(RegistryAuthError) as wrong:
        push(store, digest, ref, environ=env, options=_tls(tls_registry))
    assert str(wrong.value) == (
        f"registry {host} refused the credentials of {USER!r} (from environment)"
    )
    assert "wrong" not in str(wrong.value)


# -- interop -------------------------------------------------------------------------------


def test_skopeo_reads_what_castiron_pushed(registry: Registry, tmp_path: Path) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    store, digest = _bake(tmp_path)
    push(store, digest, parse_reference(f"{registry.host}/team/skopeo:v1"), environ={})
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/team/skopeo:v1"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["Digest"] == digest
    # and castiron pulls what skopeo pushed
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--dest-tls-verify=false",
            f"oci:{store.root}:v1",
            f"docker://{registry.host}/team/from-skopeo:v1",
        ],
        capture_output=True,
        check=True,
    )
    target = ImageStore(tmp_path / "elsewhere")
    pulled = pull(target, parse_reference(f"{registry.host}/team/from-skopeo:v1"), environ={})
    assert target.image(pulled.digest).config_digest == store.image(digest).config_digest


@pytest.mark.docker
def test_docker_pulls_what_castiron_pushed(
    registry: Registry, tmp_path: Path, docker_engine: object
) -> None:
    store, digest = _bake(tmp_path)
    name = f"{registry.host}/team/docker-pull"
    push(store, digest, parse_reference(f"{name}:v1"), environ={})
    client = docker_engine
    image = client.images.pull(name, tag="v1")  # type: ignore[attr-defined]
    try:
        assert image.id == store.image(digest).config_digest
    finally:
        client.images.remove(f"{name}:v1", force=True)  # type: ignore[attr-defined]


def test_bearer_token_flow(registry: Registry, tmp_path: Path) -> None:
    store, digest = _bake(tmp_path)
    env = {"CASTIRON_REGISTRY_USERNAME": "ci", "CASTIRON_REGISTRY_PASSWORD": "tok3n"}
    with fault_proxy(registry.host, lambda m, p: None, bearer=("ci", "tok3n")) as proxy:
        ref = parse_reference(f"{proxy.host}/team/bearer:v1")
        push(store, digest, ref, environ=env, options=FAST)
        pulled = pull(ImageStore(tmp_path / "elsewhere"), ref, environ=env, options=FAST)
        assert pulled.digest == digest
        assert "repository:team/bearer:pull,push" in proxy.tokens
        assert "repository:team/bearer:pull" in proxy.tokens
        with pytest.raises(RegistryAuthError) as err:
            pull(
                ImageStore(tmp_path / "third"),
                ref,
                environ={**env, "CASTIRON_REGISTRY_PASSWORD": "nope"},
                options=FAST,
            )
    assert str(err.value) == (
        f"registry {proxy.host} refused the credentials of 'ci' (from environment)"
    )


def test_signatures_come_through_the_referrers_api(registry: Registry, tmp_path: Path) -> None:
    store, digest, public = _signed(tmp_path)
    repo = "team/with-api"
    push(store, digest, parse_reference(f"{registry.host}/{repo}:v1"), environ={})
    with fault_proxy(registry.host, lambda m, p: None, referrers_api=True) as proxy:
        target = ImageStore(tmp_path / "elsewhere")
        pulled = pull(
            target,
            parse_reference(f"{proxy.host}/{repo}:v1"),
            environ={},
            verify_keys=[public],
        )
        paths = [p for _, p in proxy.seen]
    assert pulled.verified_by == str(public) and len(pulled.referrers) == 3
    assert f"/v2/{repo}/referrers/{digest}" in paths
    assert f"/v2/{repo}/manifests/{fallback_tag(digest)}" not in paths
    # and a registry with the API gets no fallback tag
    with fault_proxy(registry.host, lambda m, p: None, referrers_api=True) as proxy:
        result = push(store, digest, parse_reference(f"{proxy.host}/team/api-only:v1"), environ={})
        puts = [p for m, p in proxy.seen if m == "PUT" and "/manifests/" in p]
    assert result.referrers_api
    assert f"/v2/team/api-only/manifests/{fallback_tag(digest)}" not in puts
    assert f"/v2/team/api-only/manifests/{cosign_tag(digest, 'sig')}" in puts


def test_pull_reads_cosign_tags_when_there_are_no_referrers(
    registry: Registry, tmp_path: Path
) -> None:
    store, digest, public = _signed(tmp_path)
    repo = "team/cosign-only"
    push(store, digest, parse_reference(f"{registry.host}/{repo}:v1"), environ={})
    client = RegistryClient(registry.host, environ={})
    index = client.get_manifest(repo, fallback_tag(digest))
    assert index is not None
    gone = client.send("DELETE", f"/v2/{repo}/manifests/{index.digest}", client.scope(repo, True))
    client.close()
    assert gone.status == 202  # now only cosign's .sig and .att tags say anything
    target = ImageStore(tmp_path / "elsewhere")
    pulled = pull(
        target, parse_reference(f"{registry.host}/{repo}:v1"), environ={}, verify_keys=[public]
    )
    assert pulled.verified_by == str(public)
    result = verify_image(target, digest, [public])
    assert result.signature.ok and result.provenance.ok and result.provenance.required
    (statement,) = provenance.read(target, digest)
    assert statement["subject"][0]["digest"]["sha256"] == digest.split(":")[1]


def test_http_library_errors_never_leak(registry: Registry, tmp_path: Path) -> None:
    hang_up = Fault("close")
    with (
        fault_proxy(registry.host, lambda m, p: hang_up) as proxy,
        pytest.raises(RegistryError) as err,
    ):
        pull(
            ImageStore(tmp_path / "x"),
            parse_reference(f"{proxy.host}/team/gone:v1"),
            environ={},
            options=FAST,
        )
    assert str(err.value) == (
        f"registry {proxy.host}: GET /v2/team/gone/manifests/v1 failed after 4 attempt(s): "
        "Remote end closed connection without response"
    )
    assert err.value.__cause__ is None  # http.client's exception is not chained to users
