"""Signing and verification in the library: keys, cosign simple signing, DSSE provenance.

Tampering is simulated the two ways an attacker with write access to the store can try it:
editing blob files in place (caught by content addressing), and rewriting an artifact
consistently (new blob, new manifest, index entry swapped) without being able to re-sign.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from castiron.errors import ExitCode, PolicyRefusedError, UsageError
from castiron.images import oci, provenance
from castiron.images.archive import export_archive, import_archive
from castiron.images.sign import (
    ANN_KEYID,
    ANN_SIGNATURE,
    DSSE,
    KDF_ROUNDS,
    SIGNATURE_ARTIFACT,
    SIMPLE_SIGNING,
    KeyPair,
    Reason,
    b64decode_strict,
    generate_keypair,
    load_signer,
    load_verify_key,
    pae,
    require_signature,
    sign_image,
    verify_image,
)
from castiron.images.store import ImageStore, prune
from castiron.model import Digest

from .bakekit import run_bake, write_tree

# -- helpers (also used by test_sign_cli.py) ------------------------------------------------


def bake_tiny(store_root: Path, workdir: Path, content: str, tag: str) -> Digest:
    """Bake ``FROM scratch`` + one file into the store; returns the image digest."""
    context = write_tree(workdir / f"ctx-{tag}", {"hello.txt": content})
    return run_bake(store_root, context, tags=(tag,)).digest


def referrers(store: ImageStore, digest: Digest, artifact_type: str) -> list[Digest]:
    """The artifacts of one type listed for image ``digest``."""
    return [d.digest for d in store.referrers(digest) if d.artifact_type == artifact_type]


def rewrite_artifact(
    store: ImageStore,
    artifact: Digest,
    *,
    layer_bytes: bytes | None = None,
    signature: str | None = None,
    subject: Digest | None = None,
) -> Digest:
    """Rewrite an artifact consistently, as an attacker without the key would: store a new
    layer blob and manifest, and list the new manifest instead of the old one (or, with
    ``subject``, additionally, pointing at another image)."""
    manifest = store.read_json(artifact)
    layer = manifest["layers"][0]
    if layer_bytes is not None:
        layer["digest"] = store.put_bytes(layer_bytes)
        layer["size"] = len(layer_bytes)
    if signature is not None:
        layer["annotations"][ANN_SIGNATURE] = signature
    if subject is not None:
        manifest["subject"] = store.image(subject).descriptor().to_json()
    raw = oci.canonical_json(manifest)
    new = store.put_bytes(raw)
    entry = oci.Descriptor(
        oci.MANIFEST,
        new,
        len(raw),
        annotations={oci.ANN_SUBJECT: manifest["subject"]["digest"]},
        artifact_type=manifest["artifactType"],
    )

    def change(current: list[oci.Descriptor]) -> list[oci.Descriptor]:
        if subject is None:
            current = [d for d in current if d.digest != artifact]
        return [*current, entry]

    store.update_index(change)
    return new


@contextmanager
def flipped(path: Path, position: int) -> Iterator[None]:
    """Flip one bit of the byte at ``position`` in ``path`` (in place), then restore it."""
    original = path.read_bytes()
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o600)
    data = bytearray(original)
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)
        path.chmod(mode)


@contextmanager
def index_restored(store: ImageStore) -> Iterator[None]:
    """Put ``index.json`` back as it was after the block."""
    path = store.root / "index.json"
    saved = path.read_bytes()
    try:
        yield
    finally:
        path.write_bytes(saved)


def sample(n: int, count: int = 40) -> list[int]:
    """About ``count`` positions spread over ``range(n)``, always with the first and last."""
    return sorted({0, n - 1, *range(0, n, max(1, n // count))})


def payload_layer(store: ImageStore, artifact: Digest) -> dict[str, Any]:
    """The single layer descriptor (as JSON) of a signature or DSSE artifact."""
    layer: dict[str, Any] = store.read_json(artifact)["layers"][0]
    return layer


# -- fixtures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signed:
    store: ImageStore
    image: Digest
    other: Digest
    keys: KeyPair
    stranger: KeyPair
    signature: Digest
    envelope: Digest


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


@pytest.fixture
def signed(tmp_path: Path, store: ImageStore) -> Signed:
    """Two tiny images; the first signed (with its provenance) by ``keys``."""
    image = bake_tiny(store.root, tmp_path, "hello\n", "v1")
    other = bake_tiny(store.root, tmp_path, "other\n", "v2")
    keys = generate_keypair(tmp_path / "signer")
    stranger = generate_keypair(tmp_path / "stranger")
    result = sign_image(store, image, load_signer(keys.private_path), reference="hello:v1")
    assert len(result.provenance) == 1
    return Signed(store, image, other, keys, stranger, result.signature, result.provenance[0])


def verify(s: Signed, digest: Digest | None = None, key: Path | None = None) -> Any:
    return verify_image(s.store, digest or s.image, [key or s.keys.public_path])


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_generate_keypair_writes_pkcs8_and_spki(tmp_path: Path, passphrase: bytes | None) -> None:
    pair = generate_keypair(tmp_path / "k", passphrase)
    assert pair.private_path == tmp_path / "k.key" and pair.public_path == tmp_path / "k.pub"
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    private = pair.private_path.read_bytes()
    header = b"ENCRYPTED PRIVATE KEY" if passphrase else b"-----BEGIN PRIVATE KEY-----"
    assert header in private and pair.encrypted is (passphrase is not None)
    assert pair.public_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    signer = load_signer(pair.private_path, passphrase)
    assert signer.keyid == pair.keyid == load_verify_key(pair.public_path).keyid
    assert pair.keyid.startswith("sha256:") and len(pair.keyid) == 71
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("existing", ["k.key", "k.pub"])
def test_generate_keypair_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("precious\n")
    with pytest.raises(UsageError, match="already exists; refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    assert (tmp_path / existing).read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_generate_keypair_refuses_missing_dir_and_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        generate_keypair(tmp_path / "nope" / "k")
    with pytest.raises(UsageError, match="passphrase is empty"):
        generate_keypair(tmp_path / "k", b"")


def test_encrypted_key_needs_the_right_passphrase(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k", b"s3cret")
    assert load_signer(pair.private_path, b"s3cret").keyid == pair.keyid
    with pytest.raises(UsageError, match=r"k\.key: cannot decrypt it \(wrong passphrase\?\)"):
        load_signer(pair.private_path, b"wrong")
    with pytest.raises(UsageError, match="is encrypted and no passphrase was given"):
        load_signer(pair.private_path, None)
    plain = generate_keypair(tmp_path / "plain")
    with pytest.raises(UsageError, match="is not encrypted, but a passphrase was given"):
        load_signer(plain.private_path, b"s3cret")


def test_bad_key_files_are_usage_errors(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k")
    with pytest.raises(UsageError, match="does not exist"):
        load_signer(tmp_path / "missing.key")
    with pytest.raises(UsageError, match="this is a public key"):
        load_signer(pair.public_path)
    with pytest.raises(UsageError, match="this is a private key"):
        load_verify_key(pair.private_path)
    junk = tmp_path / "junk.pub"
    junk.write_bytes(b"not a key")
    with pytest.raises(UsageError, match=r"junk\.pub: not a valid public key"):
        load_verify_key(junk)
    with pytest.raises(UsageError, match=r"junk\.pub: not a PEM private key"):
        load_signer(junk)
    ed = ed25519.Ed25519PrivateKey.generate()
    ed_pem = tmp_path / "ed.key"
    ed_pem.write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(UsageError, match="not an ECDSA P-256 key"):
        load_signer(ed_pem)
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    pem = p384.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UsageError, match="public key #1: not an ECDSA P-256 key"):
        verify_image(ImageStore(tmp_path / "s"), Digest("sha256:" + "0" * 64), [pem])


# -- encodings -------------------------------------------------------------------------------


def test_pae_matches_the_dsse_spec() -> None:
    # The test vector from the DSSE protocol specification.
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("text", ["QUI=", "QUJ=", "QUI", "QU I=", "QUI==", "", "Q\u00e9I="])
def test_b64decode_strict_accepts_only_the_canonical_spelling(text: str) -> None:
    if text == "QUI=" or text == "":
        assert b64decode_strict(text) == base64.b64decode(text)
        return
    with pytest.raises(ValueError):
        b64decode_strict(text)


# -- sign and verify -------------------------------------------------------------------------


def test_signed_image_verifies_with_its_key(signed: Signed) -> None:
    result = verify(signed)
    assert result.ok
    assert result.verified_by is not None and result.verified_by.keyid == signed.keys.keyid
    assert result.signature.verified is not None
    assert result.signature.verified.reference == "hello:v1"
    assert result.provenance.required and result.provenance.ok
    assert "verified" in result.message()


def test_the_stored_artifacts_have_the_cosign_and_dsse_shapes(signed: Signed) -> None:
    store = signed.store
    manifest = store.read_json(signed.signature)
    assert manifest["artifactType"] == SIGNATURE_ARTIFACT
    assert manifest["subject"]["digest"] == signed.image
    assert manifest["annotations"][ANN_KEYID] == signed.keys.keyid
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == SIMPLE_SIGNING
    payload = json.loads(store.read_blob(layer["digest"]))
    assert payload["critical"] == {
        "identity": {"docker-reference": "hello:v1"},
        "image": {"docker-manifest-digest": signed.image},
        "type": "cosign container image signature",
    }
    assert payload["optional"]["creator"].startswith("castiron ")
    assert base64.b64decode(layer["annotations"][ANN_SIGNATURE])[0] == 0x30  # DER SEQUENCE
    envelope_manifest = store.read_json(signed.envelope)
    assert envelope_manifest["artifactType"] == DSSE
    assert envelope_manifest["subject"]["digest"] == signed.image
    envelope = store.read_json(envelope_manifest["layers"][0]["digest"])
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"][0]["keyid"] == signed.keys.keyid
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement == provenance.read(store, signed.image)[0]
    # Artifacts are listed in the index without a tag and are not images.
    assert set(store.tags()) == {"v1", "v2"}
    assert {i.digest for i in store.images()} == {signed.image, signed.other}


def test_signing_is_deterministic_and_several_keys_may_sign(signed: Signed) -> None:
    store = signed.store
    again = sign_image(
        store, signed.image, load_signer(signed.keys.private_path), reference="hello:v1"
    )
    assert again.signature == signed.signature
    assert len(referrers(store, signed.image, SIGNATURE_ARTIFACT)) == 1
    sign_image(store, signed.image, load_signer(signed.stranger.private_path), reference="hello:v1")
    assert len(referrers(store, signed.image, SIGNATURE_ARTIFACT)) == 2
    for pair in (signed.keys, signed.stranger):
        result = verify(signed, key=pair.public_path)
        assert result.ok and result.verified_by is not None
        assert result.verified_by.keyid == pair.keyid
    third = generate_keypair(signed.keys.private_path.parent / "third")
    result = verify(signed, key=third.public_path)
    assert not result.ok and result.signature.reasons == (Reason.OTHER_KEY,)


def test_any_of_several_trusted_keys_may_verify(signed: Signed) -> None:
    keys = [signed.stranger.public_path, signed.keys.public_path.read_bytes()]
    result = verify_image(signed.store, signed.image, keys)
    assert result.ok and result.verified_by is not None
    assert result.verified_by.source == "public key #2"
    with pytest.raises(UsageError, match="no public key"):
        verify_image(signed.store, signed.image, [])


def test_unsigned_image_has_no_signature(signed: Signed) -> None:
    result = verify(signed, signed.other)
    assert not result.ok
    assert result.signature.reasons == (Reason.NO_SIGNATURE,)
    assert result.provenance.reasons == (Reason.NO_SIGNATURE,)
    assert "signature: no signature" in result.message()


def test_signature_by_another_key(signed: Signed) -> None:
    result = verify(signed, key=signed.stranger.public_path)
    assert not result.ok
    assert result.signature.reasons == (Reason.OTHER_KEY,)
    assert result.provenance.reasons == (Reason.OTHER_KEY,)
    assert signed.keys.keyid in result.message()


def test_signature_copied_to_another_image_is_for_another_digest(signed: Signed) -> None:
    rewrite_artifact(signed.store, signed.signature, subject=signed.other)
    rewrite_artifact(signed.store, signed.envelope, subject=signed.other)
    result = verify(signed, signed.other)
    assert not result.ok
    assert result.signature.reasons == (Reason.OTHER_DIGEST,)
    assert result.provenance.reasons == (Reason.OTHER_DIGEST,)
    assert f"it signs {signed.image}" in result.message()
    assert verify(signed).ok  # the original is untouched


# -- tampering with the simple-signing payload and its signature -----------------------------


def test_any_byte_of_the_payload_blob_edited_in_place_fails(signed: Signed) -> None:
    store = signed.store
    layer = payload_layer(store, signed.signature)
    path = store.blob_path(layer["digest"])
    for position in range(layer["size"]):  # every byte: each check is cheap
        with flipped(path, position):
            result = verify(signed)
            assert not result.ok, position
            assert result.signature.reasons == (Reason.TAMPERED,), position
            assert "is damaged" in result.message()
    assert verify(signed).ok


def test_any_byte_of_the_payload_rewritten_consistently_fails(signed: Signed) -> None:
    store = signed.store
    original = store.read_blob(payload_layer(store, signed.signature)["digest"])
    for position in sample(len(original), 80):
        data = bytearray(original)
        data[position] ^= 0x01
        with index_restored(store):
            rewrite_artifact(store, signed.signature, layer_bytes=bytes(data))
            result = verify(signed)
            assert not result.ok, position
            assert result.signature.reasons == (Reason.TAMPERED,), position
            assert "payload tampered: the signature does not match the payload" in (
                result.message()
            )
    assert verify(signed).ok


def test_a_payload_for_another_image_without_a_new_signature_fails(signed: Signed) -> None:
    store = signed.store
    payload = json.loads(store.read_blob(payload_layer(store, signed.signature)["digest"]))
    payload["critical"]["image"]["docker-manifest-digest"] = signed.other
    rewrite_artifact(
        store, signed.signature, layer_bytes=oci.canonical_json(payload), subject=signed.other
    )
    result = verify(signed, signed.other)
    assert result.signature.reasons == (Reason.TAMPERED,)


def test_any_byte_of_the_signature_changed_fails(signed: Signed) -> None:
    store = signed.store
    encoded = payload_layer(store, signed.signature)["annotations"][ANN_SIGNATURE]
    der = base64.b64decode(encoded)
    for position in range(len(der)):  # every byte of the DER signature
        data = bytearray(der)
        data[position] ^= 0x01
        with index_restored(store):
            rewrite_artifact(
                store, signed.signature, signature=base64.b64encode(data).decode("ascii")
            )
            result = verify(signed)
            assert result.signature.reasons == (Reason.TAMPERED,), position
    for position in sample(len(encoded)):  # the base64 text itself, padding included
        replacement = "A" if encoded[position] != "A" else "B"
        text = encoded[:position] + replacement + encoded[position + 1 :]
        with index_restored(store):
            rewrite_artifact(store, signed.signature, signature=text)
            result = verify(signed)
            assert result.signature.reasons == (Reason.TAMPERED,), position
    assert verify(signed).ok


def test_any_byte_of_the_signature_manifest_edited_in_place_fails(signed: Signed) -> None:
    path = signed.store.blob_path(signed.signature)
    size = path.stat().st_size
    for position in sample(size):
        with flipped(path, position):
            result = verify(signed)
            assert result.signature.reasons == (Reason.TAMPERED,), position


def test_a_key_id_swapped_to_the_verifiers_key_still_fails(signed: Signed) -> None:
    store = signed.store
    stranger_sig = sign_image(
        store, signed.other, load_signer(signed.stranger.private_path), reference="x"
    ).signature
    manifest = store.read_json(stranger_sig)
    manifest["annotations"][ANN_KEYID] = signed.keys.keyid
    raw = oci.canonical_json(manifest)
    forged = store.put_bytes(raw)
    store.add_referrer(
        oci.Descriptor(
            oci.MANIFEST,
            forged,
            len(raw),
            annotations={oci.ANN_SUBJECT: signed.other},
            artifact_type=SIGNATURE_ARTIFACT,
        )
    )
    result = verify(signed, signed.other)
    assert not result.signature.ok
    assert set(result.signature.reasons) == {Reason.OTHER_KEY, Reason.TAMPERED}


# -- DSSE provenance -------------------------------------------------------------------------


def _envelope(signed: Signed) -> dict[str, Any]:
    return signed.store.read_json(payload_layer(signed.store, signed.envelope)["digest"])


def _rewrite_envelope(signed: Signed, change: Callable[[dict[str, Any]], None]) -> None:
    envelope = _envelope(signed)
    change(envelope)
    rewrite_artifact(signed.store, signed.envelope, layer_bytes=oci.canonical_json(envelope))


def _edit_statement(envelope: dict[str, Any]) -> None:
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["runDetails"]["builder"]["id"] = "https://evil.example/builder"
    envelope["payload"] = base64.b64encode(oci.canonical_json(statement)).decode()


def _flip_sig(envelope: dict[str, Any]) -> None:
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    envelope["signatures"][0]["sig"] = base64.b64encode(sig).decode()


def _retype(envelope: dict[str, Any]) -> None:
    envelope["payloadType"] = "application/json"


def _flip_payload_text(envelope: dict[str, Any]) -> None:
    text = envelope["payload"]
    envelope["payload"] = ("B" if text[0] == "A" else "A") + text[1:]


@pytest.mark.parametrize("change", [_edit_statement, _flip_sig, _retype, _flip_payload_text])
def test_tampered_provenance_envelope_fails(
    signed: Signed, change: Callable[[dict[str, Any]], None]
) -> None:
    _rewrite_envelope(signed, change)
    result = verify(signed)
    assert result.signature.ok and not result.provenance.ok and not result.ok
    assert result.provenance.reasons == (Reason.TAMPERED,)
    assert "provenance: " in result.message() and "payload tampered" in result.message()


def test_any_byte_of_the_envelope_edited_in_place_fails(signed: Signed) -> None:
    path = signed.store.blob_path(payload_layer(signed.store, signed.envelope)["digest"])
    for position in sample(path.stat().st_size):
        with flipped(path, position):
            result = verify(signed)
            assert result.provenance.reasons == (Reason.TAMPERED,), position
    assert verify(signed).ok


def test_unsigned_provenance_fails_and_no_provenance_passes(signed: Signed) -> None:
    store = signed.store
    store.update_index(lambda current: [d for d in current if d.digest != signed.envelope])
    result = verify(signed)
    assert result.signature.ok and not result.ok
    assert result.provenance.reasons == (Reason.NO_SIGNATURE,)
    # An image without any provenance (e.g. imported from `docker save`) needs only the
    # image signature.
    prov = referrers(store, signed.image, oci.IN_TOTO)
    store.update_index(lambda current: [d for d in current if d.digest not in prov])
    result = verify(signed)
    assert result.ok and not result.provenance.required
    assert result.provenance.summary() == "no provenance"


# -- the policy gate, archives and prune -----------------------------------------------------


def test_require_signature_refuses_with_the_rule(signed: Signed) -> None:
    assert require_signature(signed.store, signed.image, [signed.keys.public_path]).ok
    with pytest.raises(PolicyRefusedError) as info:
        require_signature(signed.store, signed.other, [signed.keys.public_path])
    assert info.value.rule == "require_signature"
    assert info.value.exit_code == ExitCode.REFUSED
    assert str(info.value).startswith(f"image {signed.other} does not verify: ")
    assert "no signature" in str(info.value)


def test_signatures_travel_with_export_and_import(signed: Signed, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    export_archive(signed.store, signed.image, "oci-archive", archive)
    other = ImageStore(tmp_path / "elsewhere")
    import_archive(other, archive)
    assert verify_image(other, signed.image, [signed.keys.public_path]).ok


def test_prune_keeps_signatures_of_kept_images(signed: Signed) -> None:
    report = prune(signed.store, dry_run=False)
    assert signed.signature not in report.dropped_entries
    assert verify(signed).ok


# -- standard tools --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_verifies_the_payload_and_the_envelope(signed: Signed, tmp_path: Path) -> None:
    store = signed.store
    layer = payload_layer(store, signed.signature)
    sig = tmp_path / "sig.der"
    sig.write_bytes(base64.b64decode(layer["annotations"][ANN_SIGNATURE]))
    payload = tmp_path / "payload.json"
    payload.write_bytes(store.read_blob(layer["digest"]))
    pub = str(signed.keys.public_path)

    def openssl_verify(data: Path, signature: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", pub, "-signature", str(signature), data],
            capture_output=True,
            text=True,
            check=False,
        )

    ok = openssl_verify(payload, sig)
    assert ok.returncode == 0 and "Verified OK" in ok.stdout
    payload.write_bytes(payload.read_bytes().replace(b"hello:v1", b"hello:v2"))
    assert openssl_verify(payload, sig).returncode != 0
    envelope = _envelope(signed)
    body = base64.b64decode(envelope["payload"])
    pae_file = tmp_path / "pae.bin"
    kind = envelope["payloadType"].encode()
    pae_file.write_bytes(b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(body), body))
    sig.write_bytes(base64.b64decode(envelope["signatures"][0]["sig"]))
    assert openssl_verify(pae_file, sig).returncode == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_reads_an_encrypted_private_key(tmp_path: Path) -> None:
    pair = generate_keypair(tmp_path / "k", b"pass phrase")
    out = subprocess.run(
        ["openssl", "pkey", "-in", str(pair.private_path), "-passin", "env:KEY_PASS", "-pubout"],
        capture_output=True,
        check=True,
        env={**os.environ, "KEY_PASS": "pass phrase"},
    )
    assert out.stdout == pair.public_path.read_bytes()
    parsed = subprocess.run(
        ["openssl", "asn1parse", "-in", str(pair.private_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ":PBES2" in parsed and ":PBKDF2" in parsed and ":hmacWithSHA256" in parsed
    assert ":aes-256-cbc" in parsed and f":{KDF_ROUNDS:06X}" in parsed
