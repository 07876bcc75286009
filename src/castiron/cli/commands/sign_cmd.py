"""``castiron keys generate``, ``castiron sign`` and ``castiron verify``.

Thin edges over :mod:`castiron.images.sign`: they read passphrases from the environment
variable named by ``--passphrase-env`` (the library never reads the environment), resolve
REFs in the image store, and render results. A failed verification is exit 1 with every
reason on the ``error:`` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import ImageError, UsageError
from castiron.images.sign import (
    ArtifactCheck,
    Check,
    Signer,
    SignResult,
    docker_reference,
    generate_keypair,
    load_signer,
    sign_image,
    verify_image,
)
from castiron.images.store import ImageStore
from castiron.model import Digest

PASSPHRASE_HELP = "Read the key's passphrase from this environment variable."


def read_passphrase(cli: CliContext, variable: str | None) -> bytes | None:
    """The passphrase held by environment variable ``variable`` (None when not asked for).

    Raises:
        UsageError: when the variable is unset or empty.
    """
    if variable is None:
        return None
    value = cli.settings.environ.get(variable)
    if value is None:
        raise UsageError(f"--passphrase-env: environment variable {variable} is not set")
    if value == "":
        raise UsageError(f"--passphrase-env: environment variable {variable} is empty")
    return value.encode()


def bake_signer(cli: CliContext, key: Path | None, passphrase_env: str | None) -> Signer | None:
    """The signer for ``castiron bake --sign KEY``, loaded before anything is built.

    Raises:
        UsageError: for a bad key or passphrase, or ``--passphrase-env`` without ``--sign``.
    """
    if key is None:
        if passphrase_env is not None:
            raise UsageError("--passphrase-env needs --sign KEY")
        return None
    return load_signer(key, read_passphrase(cli, passphrase_env))


def sign_baked(store: ImageStore, digest: Digest, tag: str, signer: Signer) -> SignResult:
    """Sign a freshly baked image under its first tag (see :func:`sign_image`)."""
    return sign_image(store, digest, signer, reference=docker_reference(store, tag, digest))


def _store(cli: CliContext) -> ImageStore:
    return ImageStore(cli.settings.images_path)


@click.group("keys")
def keys_group() -> None:
    """Signing keys: ECDSA P-256 keypairs in PEM files."""


@keys_group.command("generate")
@click.option(
    "--out",
    "prefix",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("castiron"),
    show_default=True,
    help="Write PREFIX.key (private, mode 0600) and PREFIX.pub (public).",
)
@click.option("--passphrase-env", metavar="VAR", default=None, help=PASSPHRASE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def generate(cli: CliContext, prefix: Path, passphrase_env: str | None, as_json: bool) -> None:
    """Create a new signing keypair; never overwrites existing files.

    The private key is PKCS#8 PEM, encrypted when --passphrase-env names a variable holding
    a passphrase; the public key is a SubjectPublicKeyInfo PEM that `castiron verify` and
    `openssl` read.
    """
    pair = generate_keypair(prefix, read_passphrase(cli, passphrase_env))
    if as_json:
        emit_json(
            {
                "private_key": str(pair.private_path),
                "public_key": str(pair.public_path),
                "keyid": pair.keyid,
                "encrypted": pair.encrypted,
            }
        )
        return
    click.echo(f"wrote {pair.private_path} (private, keep it secret) and {pair.public_path}")
    click.echo(f"  key id: {pair.keyid}")
    if not pair.encrypted:
        click.echo("  the private key is not encrypted (use --passphrase-env to encrypt it)")


@click.command("sign")
@click.argument("ref")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Private key file (from `castiron keys generate`).",
)
@click.option("--passphrase-env", metavar="VAR", default=None, help=PASSPHRASE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def sign_cmd(
    cli: CliContext, ref: str, key_path: Path, passphrase_env: str | None, as_json: bool
) -> None:
    """Sign an image and its build provenance with a private key.

    REF is a tag, a sha256: digest, or a unique digest prefix. Stores a cosign-style
    signature and a DSSE envelope over each provenance statement, both referring to the image.
    """
    signer = load_signer(key_path, read_passphrase(cli, passphrase_env))
    store = _store(cli)
    digest = store.resolve(ref)
    result = sign_image(store, digest, signer, reference=docker_reference(store, ref, digest))
    if as_json:
        emit_json(
            {
                "digest": result.digest,
                "keyid": result.keyid,
                "reference": result.reference,
                "signature": result.signature,
                "provenance": list(result.provenance),
            }
        )
        return
    click.echo(f"signed {result.digest} as {result.reference}")
    click.echo(f"  key id: {result.keyid}")
    click.echo(f"  signature: {result.signature}")
    click.echo(f"  provenance envelopes: {len(result.provenance)}")


def _artifact_json(a: ArtifactCheck) -> dict[str, Any]:
    return {
        "artifact": a.artifact,
        "ok": a.ok,
        "keyid": a.claimed_keyid,
        "verified_by": a.verified_by.source if a.verified_by is not None else None,
        "reason": str(a.reason) if a.reason is not None else None,
        "detail": a.detail,
        "reference": a.reference,
    }


def _check_json(check: Check) -> dict[str, Any]:
    verified = check.verified
    return {
        "ok": check.ok,
        "required": check.required,
        "verified_by": verified.verified_by.source
        if verified and verified.verified_by is not None
        else None,
        "keyid": verified.verified_by.keyid
        if verified and verified.verified_by is not None
        else None,
        "reasons": [str(r) for r in check.reasons],
        "artifacts": [_artifact_json(a) for a in check.artifacts],
    }


@click.command("verify")
@click.argument("ref")
@click.option(
    "--key",
    "keys",
    type=click.Path(path_type=Path, dir_okay=False),
    multiple=True,
    required=True,
    help="Public key file to trust (repeatable: any one of them may have signed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def verify_cmd(cli: CliContext, ref: str, keys: tuple[Path, ...], as_json: bool) -> None:
    """Check that an image carries a valid signature by a given key for exactly its digest.

    Also checks the signed build provenance (DSSE) when the image has provenance. Exit 0 when
    both verify; exit 1 naming the reason otherwise: no signature, signed by another key,
    payload tampered, or signature for another digest.
    """
    store = _store(cli)
    digest = store.resolve(ref)
    result = verify_image(store, digest, list(keys))
    if as_json:
        emit_json(
            {
                "ok": result.ok,
                "digest": result.digest,
                "keyids": list(result.keyids),
                "signature": _check_json(result.signature),
                "provenance": _check_json(result.provenance),
            }
        )
    if not result.ok:
        raise ImageError(result.message())
    if not as_json:
        click.echo(f"verified {digest}")
        click.echo(f"  signature: {result.signature.summary()}")
        ref_signed = result.signature.verified.reference if result.signature.verified else None
        if ref_signed:
            click.echo(f"  signed reference: {ref_signed}")
        click.echo(f"  provenance: {result.provenance.summary()}")


commands: list[click.Command] = [keys_group, sign_cmd, verify_cmd]

__all__ = ["bake_signer", "commands", "read_passphrase", "sign_baked"]
