"""``castiron keys generate``, ``castiron sign`` and ``castiron verify`` through the CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from castiron.images.sign import SIGNATURE_ARTIFACT
from castiron.images.store import ImageStore
from castiron.model import Digest

from .test_sign import bake_tiny, payload_layer, referrers, rewrite_artifact


def _json(result: Any, code: int = 0) -> dict[str, Any]:
    assert result.exit_code == code, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture
def images(home: Path, tmp_path: Path) -> tuple[Digest, Digest]:
    """Two tiny images in the CLI's store, tagged v1 and v2."""
    root = home / "images"
    return bake_tiny(root, tmp_path, "hello\n", "v1"), bake_tiny(root, tmp_path, "other\n", "v2")


@pytest.fixture
def keys(run_cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An encrypted keypair at ``tmp_path/release.{key,pub}``; passphrase in $KEY_PASS."""
    monkeypatch.setenv("KEY_PASS", "open sesame")
    out = _json(
        run_cli(
            "keys",
            "generate",
            "--out",
            str(tmp_path / "release"),
            "--passphrase-env",
            "KEY_PASS",
            "--json",
        )
    )
    assert out["encrypted"] is True and out["keyid"].startswith("sha256:")
    assert out["private_key"] == str(tmp_path / "release.key")
    return tmp_path / "release"


def test_keys_generate_refuses_to_overwrite(run_cli: Any, tmp_path: Path) -> None:
    first = run_cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert first.exit_code == 0, first.stderr
    assert "not encrypted" in first.stdout
    assert stat.S_IMODE((tmp_path / "k.key").stat().st_mode) == 0o600
    before = (tmp_path / "k.key").read_bytes()
    again = run_cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert again.exit_code == 2
    assert again.stderr == f"error: {tmp_path / 'k.key'} already exists; refusing to overwrite it\n"
    assert (tmp_path / "k.key").read_bytes() == before


@pytest.mark.parametrize(
    ("value", "message"),
    [(None, "environment variable NOPE is not set"), ("", "environment variable NOPE is empty")],
)
def test_passphrase_env_must_hold_a_value(
    run_cli: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    value: str | None,
    message: str,
) -> None:
    if value is not None:
        monkeypatch.setenv("NOPE", value)
    else:
        monkeypatch.delenv("NOPE", raising=False)
    result = run_cli("keys", "generate", "--out", str(tmp_path / "k"), "--passphrase-env", "NOPE")
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "k.key").exists()


def test_sign_then_verify(run_cli: Any, images: tuple[Digest, Digest], keys: Path) -> None:
    image, _ = images
    signed = _json(
        run_cli("sign", "v1", "--key", f"{keys}.key", "--passphrase-env", "KEY_PASS", "--json")
    )
    assert signed["digest"] == image and signed["reference"] == "castiron:v1"
    assert len(signed["provenance"]) == 1
    for ref in ("v1", image, image[7:19]):
        report = _json(run_cli("verify", ref, "--key", f"{keys}.pub", "--json"))
        assert report["ok"] is True and report["digest"] == image
        assert report["signature"]["verified_by"] == f"{keys}.pub"
        assert report["signature"]["keyid"] == signed["keyid"]
        assert report["provenance"]["ok"] is True
    text = run_cli("verify", "v1", "--key", f"{keys}.pub")
    assert text.exit_code == 0, text.stderr
    assert text.stdout.startswith(f"verified {image}\n")
    assert "signed reference: castiron:v1" in text.stdout


@pytest.mark.parametrize(
    ("passphrase", "code", "message"),
    [
        ("open sesame", 0, ""),
        ("wrong", 2, "cannot decrypt it (wrong passphrase?)"),
        (None, 2, "is encrypted and no passphrase was given"),
    ],
)
def test_sign_with_an_encrypted_key(
    run_cli: Any,
    images: tuple[Digest, Digest],
    keys: Path,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    passphrase: str | None,
    code: int,
    message: str,
) -> None:
    args = ["sign", "v1", "--key", f"{keys}.key"]
    if passphrase is not None:
        monkeypatch.setenv("OTHER_PASS", passphrase)
        args += ["--passphrase-env", "OTHER_PASS"]
    result = run_cli(*args)
    assert result.exit_code == code, result.stderr
    assert message in result.stderr
    store = ImageStore(home / "images")
    assert len(referrers(store, images[0], SIGNATURE_ARTIFACT)) == (1 if code == 0 else 0)


def _sign(run_cli: Any, keys: Path, ref: str = "v1") -> None:
    result = run_cli("sign", ref, "--key", f"{keys}.key", "--passphrase-env", "KEY_PASS")
    assert result.exit_code == 0, result.stderr


def test_verify_unsigned_image(run_cli: Any, images: tuple[Digest, Digest], keys: Path) -> None:
    result = run_cli("verify", "v1", "--key", f"{keys}.pub")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: image {images[0]} does not verify: ")
    assert "signature: no signature" in result.stderr
    report = _json(run_cli("verify", "v1", "--key", f"{keys}.pub", "--json"), code=1)
    assert report["ok"] is False and report["signature"]["reasons"] == ["no signature"]


def test_verify_with_another_key(
    run_cli: Any, images: tuple[Digest, Digest], keys: Path, tmp_path: Path
) -> None:
    _sign(run_cli, keys)
    assert run_cli("keys", "generate", "--out", str(tmp_path / "other")).exit_code == 0
    result = run_cli("verify", "v1", "--key", str(tmp_path / "other.pub"))
    assert result.exit_code == 1 and "signed by another key" in result.stderr
    both = run_cli("verify", "v1", "--key", str(tmp_path / "other.pub"), "--key", f"{keys}.pub")
    assert both.exit_code == 0, both.stderr


def test_verify_tampered_payload(
    run_cli: Any, images: tuple[Digest, Digest], keys: Path, home: Path
) -> None:
    _sign(run_cli, keys)
    store = ImageStore(home / "images")
    (artifact,) = referrers(store, images[0], SIGNATURE_ARTIFACT)
    payload = store.read_blob(payload_layer(store, artifact)["digest"])
    rewrite_artifact(store, artifact, layer_bytes=payload.replace(b"castiron:v1", b"castiron:v9"))
    result = run_cli("verify", "v1", "--key", f"{keys}.pub")
    assert result.exit_code == 1 and "payload tampered" in result.stderr
    report = _json(run_cli("verify", "v1", "--key", f"{keys}.pub", "--json"), code=1)
    assert report["signature"]["reasons"] == ["payload tampered"]
    assert report["provenance"]["ok"] is True


def test_verify_signature_for_another_digest(
    run_cli: Any, images: tuple[Digest, Digest], keys: Path, home: Path
) -> None:
    _sign(run_cli, keys)
    store = ImageStore(home / "images")
    (artifact,) = referrers(store, images[0], SIGNATURE_ARTIFACT)
    rewrite_artifact(store, artifact, subject=images[1])
    result = run_cli("verify", "v2", "--key", f"{keys}.pub")
    assert result.exit_code == 1
    assert f"signature for another digest: it signs {images[0]}" in result.stderr


def test_verify_refuses_a_private_key_and_unknown_refs(
    run_cli: Any, images: tuple[Digest, Digest], keys: Path
) -> None:
    wrong = run_cli("verify", "v1", "--key", f"{keys}.key")
    assert wrong.exit_code == 2 and "this is a private key" in wrong.stderr
    missing = run_cli("verify", "nope", "--key", f"{keys}.pub")
    assert missing.exit_code == 2 and "no image tagged 'nope'" in missing.stderr
    no_key = run_cli("sign", "v1", "--key", "/nonexistent/x.key")
    assert no_key.exit_code == 2 and "private key /nonexistent/x.key does not exist" in (
        no_key.stderr
    )


SPEC = """\
app: hello
image:
  context: ./app
service:
  port: 8080
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "proj" / "app").mkdir(parents=True)
    (tmp_path / "proj" / "app" / "hello.txt").write_text("hello\n")
    spec = tmp_path / "proj" / "castiron.yaml"
    spec.write_text(SPEC)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return spec


def test_bake_sign(run_cli: Any, project: Path, keys: Path, home: Path) -> None:
    spec = str(project)
    baked = _json(
        run_cli(
            "-f",
            spec,
            "bake",
            "--tag",
            "v1",
            "--sign",
            f"{keys}.key",
            "--passphrase-env",
            "KEY_PASS",
            "--json",
        )
    )
    assert baked["signature"] in referrers(
        ImageStore(home / "images"), baked["digest"], SIGNATURE_ARTIFACT
    )
    report = _json(run_cli("verify", "v1", "--key", f"{keys}.pub", "--json"))
    assert report["ok"] and report["signature"]["artifacts"][0]["reference"] == "hello:v1"
    assert report["provenance"]["ok"] and report["provenance"]["required"]
    text = run_cli(
        "-f", spec, "bake", "--tag", "v1", "--sign", f"{keys}.key", "--passphrase-env", "KEY_PASS"
    )
    assert text.exit_code == 0 and f"signed: {baked['signature']}" in text.stdout
    unsigned = _json(run_cli("-f", spec, "bake", "--tag", "v1", "--json"))
    assert unsigned["signature"] is None


def test_bake_sign_fails_before_baking_with_a_bad_passphrase(
    run_cli: Any, project: Path, keys: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAD_PASS", "nope")
    result = run_cli(
        "-f", str(project), "bake", "--sign", f"{keys}.key", "--passphrase-env", "BAD_PASS"
    )
    assert result.exit_code == 2 and "wrong passphrase" in result.stderr
    assert not (home / "images" / "index.json").exists()
    lone = run_cli("-f", str(project), "bake", "--passphrase-env", "KEY_PASS")
    assert lone.exit_code == 2 and "--passphrase-env needs --sign KEY" in lone.stderr
