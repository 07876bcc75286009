"""Image signatures and signed provenance: key files, cosign "simple signing", DSSE envelopes.

Owns ECDSA P-256 key files (generate, load), the cosign simple-signing payload and the OCI
artifact that carries its signature, DSSE envelopes over the build provenance, and the
verification of both (:func:`verify_image`, and :func:`require_signature` for the policy gate).
Signatures live in the image store as artifacts whose ``subject`` is the image, listed in
``index.json`` without a tag, so they travel with ``export``/``import`` and live as long as
the image.

It never reads the environment (passphrases are passed in as bytes), never prints, and knows
nothing of the spec, the engine or any runtime.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from castiron import __version__
from castiron.errors import CastironError, ImageError, PolicyRefusedError, UsageError
from castiron.images import oci, provenance
from castiron.images.store import ImageStore
from castiron.model import Digest

SIGNATURE_ARTIFACT = oci.SIGNATURE_ARTIFACT
"""``artifactType`` of a signature artifact (cosign's)."""
SIMPLE_SIGNING = oci.SIMPLE_SIGNING
"""Media type of the signed payload layer (cosign's)."""
SIMPLE_SIGNING_TYPE = "cosign container image signature"
ANN_SIGNATURE = oci.ANN_SIGNATURE
"""Layer annotation holding the base64 DER ECDSA signature (cosign's)."""
ANN_KEYID = oci.ANN_KEYID
"""Which key claims to have signed (a hint for error messages, never trusted)."""
DSSE = oci.DSSE
"""``artifactType`` and layer media type of a DSSE envelope."""
DSSE_PAYLOAD_TYPE = oci.IN_TOTO
ANN_PREDICATE_TYPE = oci.ANN_PREDICATE_TYPE

KDF_ROUNDS = 600_000
"""PBKDF2-HMAC-SHA256 iterations protecting an encrypted private key (OWASP's 2023 advice)."""
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_PAYLOAD_BYTES = 1024 * 1024
"""The largest simple-signing payload castiron will read (they are a few hundred bytes)."""


class Reason(enum.StrEnum):
    """Why a signature artifact did not verify."""

    NO_SIGNATURE = "no signature"
    OTHER_KEY = "signed by another key"
    TAMPERED = "payload tampered"
    OTHER_DIGEST = "signature for another digest"
    MALFORMED = "malformed signature"


# -- keys ------------------------------------------------------------------------------------


def keyid_of(public_key: ec.EllipticCurvePublicKey) -> str:
    """A key's id: ``sha256:`` + the hex SHA-256 of its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _ecdsa(deterministic: bool) -> ec.ECDSA:
    return ec.ECDSA(hashes.SHA256(), deterministic_signing=deterministic)


class Signer(Protocol):
    """Something that signs bytes with ECDSA P-256/SHA-256 and returns a DER signature."""

    @property
    def keyid(self) -> str:
        """The id of the public key that verifies this signer's signatures."""
        ...

    def sign(self, data: bytes) -> bytes:
        """The DER-encoded signature of ``data``."""
        ...


@dataclass(frozen=True)
class EcdsaSigner:
    """A :class:`Signer` over an in-memory ECDSA P-256 private key.

    Signatures are deterministic (RFC 6979) where the crypto library supports it, so signing
    the same image twice with the same key yields the same artifact.
    """

    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    source: str
    """Where the key came from (a file name), for messages."""

    @property
    def keyid(self) -> str:
        """See :func:`keyid_of`."""
        return keyid_of(self.private_key.public_key())

    def sign(self, data: bytes) -> bytes:
        """The DER-encoded ECDSA-P256-SHA256 signature of ``data``."""
        try:
            return self.private_key.sign(data, _ecdsa(True))
        except UnsupportedAlgorithm:
            return self.private_key.sign(data, _ecdsa(False))


@dataclass(frozen=True)
class VerifyKey:
    """A public key to verify with, and where it came from."""

    public_key: ec.EllipticCurvePublicKey
    source: str

    @property
    def keyid(self) -> str:
        """See :func:`keyid_of`."""
        return keyid_of(self.public_key)

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` (DER) is this key's ECDSA-P256-SHA256 signature of ``data``."""
        try:
            self.public_key.verify(signature, data, _ecdsa(False))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class KeyPair:
    """Key files written by :func:`generate_keypair`."""

    private_path: Path
    public_path: Path
    keyid: str
    encrypted: bool


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + body


def _der_seq(*items: bytes) -> bytes:
    return _der(0x30, b"".join(items))


def _der_oid(dotted: str) -> bytes:
    first, second, *rest = (int(p) for p in dotted.split("."))
    out = bytearray([40 * first + second])
    for value in rest:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return _der(0x06, bytes(out))


def _encrypted_pkcs8_pem(
    key: ec.EllipticCurvePrivateKey, passphrase: bytes, rounds: int = KDF_ROUNDS
) -> bytes:
    """PKCS#8 ``EncryptedPrivateKeyInfo`` (PBES2: PBKDF2-HMAC-SHA256 + AES-256-CBC) as PEM.

    The crypto library's own PKCS#8 encryption uses only 2048 PBKDF2 rounds and cannot be
    tuned, so the (standard, OpenSSL-readable) container is written here; decryption is left
    to the library.
    """
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, iv = os.urandom(16), os.urandom(16)
    aes_key = PBKDF2HMAC(hashes.SHA256(), 32, salt, rounds).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(padded) + encryptor.finalize()
    pbkdf2 = _der_seq(
        _der_oid("1.2.840.113549.1.5.12"),  # PBKDF2
        _der_seq(
            _der(0x04, salt),
            _der(0x02, rounds.to_bytes(rounds.bit_length() // 8 + 1, "big")),
            _der_seq(_der_oid("1.2.840.113549.2.9"), b"\x05\x00"),  # hmacWithSHA256, NULL
        ),
    )
    aes = _der_seq(_der_oid("2.16.840.1.101.3.4.1.42"), _der(0x04, iv))  # aes256-CBC
    info = _der_seq(
        _der_seq(_der_oid("1.2.840.113549.1.5.13"), _der_seq(pbkdf2, aes)),  # PBES2
        _der(0x04, sealed),
    )
    text = base64.b64encode(info).decode("ascii")
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return "\n".join(
        ["-----BEGIN ENCRYPTED PRIVATE KEY-----", *lines, "-----END ENCRYPTED PRIVATE KEY-----", ""]
    ).encode("ascii")


def _publish_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` atomically, refusing to replace anything already there."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # unlike rename, link never replaces an existing file
        except FileExistsError:
            raise UsageError(f"{path} already exists; refusing to overwrite it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def generate_keypair(prefix: Path, passphrase: bytes | None = None) -> KeyPair:
    """Write a new ECDSA P-256 keypair: ``PREFIX.key`` (PKCS#8 PEM, mode 0600; when
    ``passphrase`` is given, encrypted with PBES2: PBKDF2-HMAC-SHA256 with
    :data:`KDF_ROUNDS` rounds and AES-256-CBC) and ``PREFIX.pub`` (SubjectPublicKeyInfo PEM).

    Raises:
        UsageError: when either file exists (nothing is overwritten), the directory does not
            exist, or the passphrase is empty.
    """
    private_path = prefix.with_name(prefix.name + ".key")
    public_path = prefix.with_name(prefix.name + ".pub")
    if passphrase is not None and not passphrase:
        raise UsageError("the key passphrase is empty")
    if not prefix.parent.is_dir():
        raise UsageError(f"cannot write keys: directory {prefix.parent} does not exist")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise UsageError(f"{path} already exists; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    if passphrase:
        private_pem = _encrypted_pkcs8_pem(key, passphrase)
    else:
        private_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _publish_new(private_path, private_pem, 0o600)
    try:
        _publish_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink()
        raise
    return KeyPair(private_path, public_path, keyid_of(key.public_key()), passphrase is not None)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise UsageError(f"{what} {path} is too large to be a key")
    return data


def load_signer(path: Path, passphrase: bytes | None = None) -> EcdsaSigner:
    """Load an ECDSA P-256 private key (PKCS#8 or SEC1 PEM, optionally encrypted).

    Raises:
        UsageError: naming the file when it is missing, not a P-256 private key, encrypted
            without a passphrase, not encrypted but given one, or the passphrase is wrong.
    """
    data = _read_key_file(path, "private key")
    if b"PRIVATE KEY-----" not in data:
        if b"PUBLIC KEY-----" in data:
            raise UsageError(f"private key {path}: this is a public key; sign with the .key file")
        raise UsageError(f"private key {path}: not a PEM private key")
    encrypted = b"ENCRYPTED" in data
    if encrypted and not passphrase:
        raise UsageError(
            f"private key {path} is encrypted and no passphrase was given (see --passphrase-env)"
        )
    if not encrypted and passphrase:
        raise UsageError(f"private key {path} is not encrypted, but a passphrase was given")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except ValueError as exc:
        if encrypted:
            raise UsageError(f"private key {path}: cannot decrypt it (wrong passphrase?)") from None
        raise UsageError(f"private key {path}: not a valid PEM private key ({exc})") from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"private key {path}: cannot be loaded ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError(f"private key {path}: not an ECDSA P-256 key")
    return EcdsaSigner(key, str(path))


def load_verify_key(source: Path | bytes, label: str | None = None) -> VerifyKey:
    """Load an ECDSA P-256 public key from a PEM (or DER) SubjectPublicKeyInfo file or bytes.

    Raises:
        UsageError: naming the file (or ``label``) when it is missing or not a P-256 public key.
    """
    if isinstance(source, Path):
        where = label or str(source)
        data = _read_key_file(source, "public key")
    else:
        where = label or "public key"
        data = source
    try:
        if data.lstrip().startswith(b"-----"):
            if b"PRIVATE KEY-----" in data:
                raise UsageError(
                    f"public key {where}: this is a private key; verify with the .pub file"
                )
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"public key {where}: not a valid public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UsageError(f"public key {where}: not an ECDSA P-256 key")
    return VerifyKey(key, where)


def _verify_keys(public_keys: Sequence[Path | bytes | VerifyKey]) -> list[VerifyKey]:
    keys: list[VerifyKey] = []
    for i, k in enumerate(public_keys):
        if isinstance(k, VerifyKey):
            keys.append(k)
        else:
            keys.append(load_verify_key(k, None if isinstance(k, Path) else f"public key #{i + 1}"))
    if not keys:
        raise UsageError("no public key to verify with")
    return keys


# -- encodings -------------------------------------------------------------------------------


def simple_signing_payload(
    digest: Digest, reference: str, optional: Mapping[str, str] | None = None
) -> bytes:
    """The cosign simple-signing payload for ``digest`` as canonical JSON bytes."""
    return oci.canonical_json(
        {
            "critical": {
                "identity": {"docker-reference": reference},
                "image": {"docker-manifest-digest": digest},
                "type": SIMPLE_SIGNING_TYPE,
            },
            "optional": dict(optional) if optional is not None else None,
        }
    )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's Pre-Authentication Encoding: ``DSSEv1 LEN(type) type LEN(body) body``."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def b64encode(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64decode_strict(text: str) -> bytes:
    """Decode standard base64, accepting only the one canonical spelling of the bytes.

    Raises:
        ValueError: for anything else (bad characters, padding, or non-zero spare bits), so
            that no change to a stored signature can go unnoticed.
    """
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not valid base64 ({exc})") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return data


def dsse_envelope(statement: Mapping[str, Any], signer: Signer) -> dict[str, Any]:
    """A DSSE envelope signing ``statement`` (an in-toto statement, as canonical JSON)."""
    body = oci.canonical_json(statement)
    sig = signer.sign(pae(DSSE_PAYLOAD_TYPE, body))
    return {
        "payloadType": DSSE_PAYLOAD_TYPE,
        "payload": b64encode(body),
        "signatures": [{"keyid": signer.keyid, "sig": b64encode(sig)}],
    }


# -- signing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignResult:
    """What :func:`sign_image` stored."""

    digest: Digest
    keyid: str
    reference: str
    signature: Digest
    """The signature artifact's manifest digest."""
    provenance: tuple[Digest, ...]
    """The DSSE envelope artifacts, one per provenance statement of the image."""


def docker_reference(store: ImageStore, ref: str, digest: Digest) -> str:
    """The ``docker-reference`` to sign for ``ref``: ``<title>:<tag>`` for a tag,
    ``<title>@<digest>`` otherwise (the image's title annotation is the app name).

    Raises:
        NotFoundError, ImageError: when the image cannot be read.
    """
    title = store.image(digest).annotations.get(oci.ANN_TITLE) or "castiron"
    if store.tags().get(ref) == digest:
        return f"{title}:{ref}"
    return f"{title}@{digest}"


def sign_image(
    store: ImageStore,
    digest: Digest,
    signer: Signer,
    *,
    reference: str,
    optional: Mapping[str, str] | None = None,
) -> SignResult:
    """Sign image ``digest``: a cosign simple-signing signature artifact, and a DSSE envelope
    for each of its provenance statements. Both refer to the image and are listed in the
    index; signing again adds another signature (identical ones are stored once).

    Raises:
        NotFoundError: when the image is not in the store.
        ImageError: when the image or its provenance is damaged, or the store cannot be written.
    """
    store.ensure()
    with store.using():
        image = store.image(digest)
        subject = image.descriptor()
        extra = {"creator": f"castiron {__version__}"}
        payload = simple_signing_payload(digest, reference, {**extra, **(optional or {})})
        signature = b64encode(signer.sign(payload))
        layer = oci.Descriptor(
            SIMPLE_SIGNING,
            store.put_bytes(payload),
            len(payload),
            annotations={ANN_SIGNATURE: signature},
        )
        sig_artifact = store.attach(subject, SIGNATURE_ARTIFACT, layer, {ANN_KEYID: signer.keyid})
        envelopes: list[Digest] = []
        for statement in provenance.read(store, digest):
            envelope = oci.canonical_json(dsse_envelope(statement, signer))
            env_layer = oci.Descriptor(DSSE, store.put_bytes(envelope), len(envelope))
            annotations = {ANN_KEYID: signer.keyid}
            predicate = statement.get("predicateType")
            if isinstance(predicate, str):
                annotations[ANN_PREDICATE_TYPE] = predicate
            envelopes.append(store.attach(subject, DSSE, env_layer, annotations))
    return SignResult(digest, signer.keyid, reference, sig_artifact, tuple(envelopes))


# -- verification ----------------------------------------------------------------------------

CheckKind = Literal["signature", "provenance"]


@dataclass(frozen=True)
class ArtifactCheck:
    """The outcome of checking one signature artifact (or DSSE envelope) of an image."""

    artifact: Digest
    claimed_keyid: str | None
    """The key id the artifact names (untrusted; used to explain failures)."""
    verified_by: VerifyKey | None
    reason: Reason | None
    detail: str
    reference: str | None = None
    """The signed ``docker-reference`` (simple signing only), once verified."""

    @property
    def ok(self) -> bool:
        """True when a given key verified it and it names exactly this image."""
        return self.verified_by is not None and self.reason is None

    def describe(self) -> str:
        """One line: ``<short artifact>: <reason>: <detail>`` or ``verified by ...``."""
        head = oci.short(self.artifact)
        if self.ok and self.verified_by is not None:
            return f"{head}: verified by {self.verified_by.source} ({self.verified_by.keyid})"
        return f"{head}: {self.reason}: {self.detail}" if self.detail else f"{head}: {self.reason}"


@dataclass(frozen=True)
class Check:
    """The image signature check, or the provenance check, of one image."""

    kind: CheckKind
    artifacts: tuple[ArtifactCheck, ...]
    required: bool
    """For provenance: whether the image has provenance at all (no provenance passes)."""

    @property
    def verified(self) -> ArtifactCheck | None:
        """The first artifact that verified, if any."""
        return next((a for a in self.artifacts if a.ok), None)

    @property
    def ok(self) -> bool:
        """True when an artifact verified, or nothing was required."""
        return self.verified is not None or not self.required

    @property
    def reasons(self) -> tuple[Reason, ...]:
        """The distinct failure reasons (``no signature`` when there is no artifact)."""
        if self.ok:
            return ()
        if not self.artifacts:
            return (Reason.NO_SIGNATURE,)
        return tuple(dict.fromkeys(a.reason for a in self.artifacts if a.reason is not None))

    def summary(self) -> str:
        """One line for people: what verified, or every reason it did not."""
        if self.verified is not None:
            return self.verified.describe()
        if not self.required:
            return "no provenance"
        if not self.artifacts:
            return str(Reason.NO_SIGNATURE)
        return "; ".join(a.describe() for a in self.artifacts)


@dataclass(frozen=True)
class VerificationResult:
    """Whether image ``digest`` carries a valid signature (and signed provenance) by one of
    the given keys; which key verified, or the exact reason each artifact failed."""

    digest: Digest
    keyids: tuple[str, ...]
    signature: Check
    provenance: Check

    @property
    def ok(self) -> bool:
        """True when the signature verifies and, if the image has provenance, so does a DSSE
        envelope over it."""
        return self.signature.ok and self.provenance.ok

    @property
    def verified_by(self) -> VerifyKey | None:
        """The key that verified the image signature."""
        v = self.signature.verified
        return v.verified_by if v is not None else None

    def message(self) -> str:
        """One line naming the image and why it did not verify (or what did)."""
        parts = [f"signature: {self.signature.summary()}"]
        parts.append(f"provenance: {self.provenance.summary()}")
        verdict = "verified" if self.ok else "does not verify"
        return f"image {self.digest} {verdict}: " + " | ".join(parts)


def _match_key(
    keys: Sequence[VerifyKey], claimed: str | None, signature: bytes, data: bytes
) -> VerifyKey | tuple[Reason, str]:
    for key in keys:
        if key.verifies(signature, data):
            return key
    known = {k.keyid for k in keys}
    if claimed is None:
        return Reason.OTHER_KEY, "no given key verifies it (it names no key; or it was altered)"
    if claimed not in known:
        return Reason.OTHER_KEY, f"it names key {claimed}, not the given key(s)"
    return Reason.TAMPERED, "the signature does not match the payload"


def _check_signature(
    store: ImageStore, digest: Digest, artifact: Digest, keys: Sequence[VerifyKey]
) -> ArtifactCheck:
    claimed: str | None = None

    def fail(reason: Reason, detail: str) -> ArtifactCheck:
        return ArtifactCheck(artifact, claimed, None, reason, detail)

    try:
        manifest = store.read_json(artifact)
        ann = manifest.get("annotations")
        if isinstance(ann, dict) and isinstance(ann.get(ANN_KEYID), str):
            claimed = ann[ANN_KEYID]
        layers = oci.manifest_layers(manifest, f"signature artifact {artifact}")
        payload_layers = [d for d in layers if d.media_type == SIMPLE_SIGNING]
        if len(payload_layers) != 1:
            return fail(Reason.MALFORMED, f"expected one {SIMPLE_SIGNING} layer")
        layer = payload_layers[0]
        encoded = layer.annotations.get(ANN_SIGNATURE)
        if encoded is None:
            return fail(Reason.MALFORMED, f"the payload layer has no {ANN_SIGNATURE} annotation")
        payload = store.read_blob(layer.digest, MAX_PAYLOAD_BYTES)
    except CastironError as exc:
        return fail(Reason.TAMPERED, str(exc))
    try:
        signature = b64decode_strict(encoded)
    except ValueError as exc:
        return fail(Reason.TAMPERED, f"the signature is {exc}")
    matched = _match_key(keys, claimed, signature, payload)
    if isinstance(matched, tuple):
        return fail(*matched)
    try:
        doc = oci.parse_json_object(payload, "payload")
        critical = doc["critical"]
        signed_digest = critical["image"]["docker-manifest-digest"]
        kind = critical["type"]
        reference = critical.get("identity", {}).get("docker-reference")
    except (CastironError, KeyError, TypeError, AttributeError) as exc:
        return fail(Reason.MALFORMED, f"the signed payload is not simple signing ({exc})")
    if kind != SIMPLE_SIGNING_TYPE:
        return fail(Reason.MALFORMED, f"the signed payload's type is {kind!r}")
    if signed_digest != digest:
        return ArtifactCheck(
            artifact, claimed, matched, Reason.OTHER_DIGEST, f"it signs {signed_digest}"
        )
    ref = reference if isinstance(reference, str) else None
    return ArtifactCheck(artifact, claimed, matched, None, "", ref)


def _statement_digests(statement: Mapping[str, Any]) -> list[str]:
    subjects = statement.get("subject")
    out: list[str] = []
    if isinstance(subjects, list):
        for s in subjects:
            d = s.get("digest") if isinstance(s, dict) else None
            if isinstance(d, dict) and isinstance(d.get("sha256"), str):
                out.append("sha256:" + d["sha256"])
    return out


def _check_envelope(
    store: ImageStore, digest: Digest, artifact: Digest, keys: Sequence[VerifyKey]
) -> ArtifactCheck:
    claimed: str | None = None

    def fail(reason: Reason, detail: str) -> ArtifactCheck:
        return ArtifactCheck(artifact, claimed, None, reason, detail)

    try:
        manifest = store.read_json(artifact)
        layers = [
            d
            for d in oci.manifest_layers(manifest, f"provenance artifact {artifact}")
            if d.media_type == DSSE
        ]
        if len(layers) != 1:
            return fail(Reason.MALFORMED, f"expected one {DSSE} layer")
        envelope = store.read_json(layers[0].digest)
    except CastironError as exc:
        return fail(Reason.TAMPERED, str(exc))
    payload_type = envelope.get("payloadType")
    encoded = envelope.get("payload")
    sigs = envelope.get("signatures")
    if not isinstance(payload_type, str) or not isinstance(encoded, str):
        return fail(Reason.MALFORMED, "the envelope has no payloadType or payload")
    if not isinstance(sigs, list) or not sigs:
        return fail(Reason.MALFORMED, "the envelope has no signatures")
    try:
        body = b64decode_strict(encoded)
    except ValueError as exc:
        return fail(Reason.TAMPERED, f"the envelope's payload is {exc}")
    message = pae(payload_type, body)
    outcome: VerifyKey | tuple[Reason, str] = (Reason.NO_SIGNATURE, "")
    for entry in sigs:
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            return fail(Reason.MALFORMED, "an envelope signature has no sig")
        keyid = entry.get("keyid")
        claimed = keyid if isinstance(keyid, str) and keyid else None
        try:
            signature = b64decode_strict(entry["sig"])
        except ValueError as exc:
            outcome = (Reason.TAMPERED, f"the signature is {exc}")
            continue
        outcome = _match_key(keys, claimed, signature, message)
        if isinstance(outcome, VerifyKey):
            break
    if isinstance(outcome, tuple):
        return fail(*outcome)
    if payload_type != DSSE_PAYLOAD_TYPE:
        return fail(Reason.MALFORMED, f"the envelope's payloadType is {payload_type!r}")
    try:
        statement = oci.parse_json_object(body, "DSSE payload")
    except ImageError as exc:
        return fail(Reason.MALFORMED, str(exc))
    if statement.get("_type") != provenance.STATEMENT_TYPE:
        return fail(Reason.MALFORMED, "the signed payload is not an in-toto statement")
    subjects = _statement_digests(statement)
    if digest not in subjects:
        signed = ", ".join(subjects) or "no subject"
        return ArtifactCheck(artifact, claimed, outcome, Reason.OTHER_DIGEST, f"it signs {signed}")
    return ArtifactCheck(artifact, claimed, outcome, None, "")


def _referrers(store: ImageStore, digest: Digest, artifact_type: str) -> list[Digest]:
    return [d.digest for d in store.referrers(digest) if d.artifact_type == artifact_type]


def verify_image(
    store: ImageStore, digest: Digest, public_keys: Sequence[Path | bytes | VerifyKey]
) -> VerificationResult:
    """Check image ``digest``'s signatures and signed provenance against ``public_keys``.

    Every artifact is checked and reported (a damaged or tampered one is a failure with its
    reason, never an exception): the result says which key verified, or why each failed.

    Raises:
        UsageError: when no key is given or a key cannot be loaded.
        NotFoundError: when the image is not in the store.
        ImageError: when the image manifest itself is damaged.
    """
    keys = _verify_keys(public_keys)
    store.image(digest)
    sigs = tuple(
        _check_signature(store, digest, a, keys)
        for a in _referrers(store, digest, SIGNATURE_ARTIFACT)
    )
    envelopes = tuple(
        _check_envelope(store, digest, a, keys) for a in _referrers(store, digest, DSSE)
    )
    has_provenance = bool(envelopes) or bool(_referrers(store, digest, oci.IN_TOTO))
    return VerificationResult(
        digest=digest,
        keyids=tuple(k.keyid for k in keys),
        signature=Check("signature", sigs, required=True),
        provenance=Check("provenance", envelopes, required=has_provenance),
    )


def require_signature(
    store: ImageStore, digest: Digest, public_keys: Sequence[Path | bytes | VerifyKey]
) -> VerificationResult:
    """The policy gate: return the verification of ``digest`` when it passes.

    Raises:
        PolicyRefusedError: (rule ``require_signature``) when no valid signature by one of
            ``public_keys`` exists for exactly this digest, or its provenance does not verify.
        UsageError, NotFoundError, ImageError: see :func:`verify_image`.
    """
    result = verify_image(store, digest, public_keys)
    if not result.ok:
        raise PolicyRefusedError(result.message(), rule="require_signature")
    return result


__all__ = [
    "ANN_KEYID",
    "ANN_SIGNATURE",
    "DSSE",
    "SIGNATURE_ARTIFACT",
    "SIMPLE_SIGNING",
    "ArtifactCheck",
    "Check",
    "EcdsaSigner",
    "KeyPair",
    "Reason",
    "SignResult",
    "Signer",
    "VerificationResult",
    "VerifyKey",
    "b64decode_strict",
    "docker_reference",
    "dsse_envelope",
    "generate_keypair",
    "keyid_of",
    "load_signer",
    "load_verify_key",
    "pae",
    "require_signature",
    "sign_image",
    "simple_signing_payload",
    "verify_image",
]
