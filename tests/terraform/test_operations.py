"""What the provider does, without Terraform: the ``castiron_image`` facts (signature and
provenance), the import id, and castiron's errors as they reach diagnostics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from castiron.errors import NotFoundError, SpecError, UsageError
from castiron.terraform import operations as ops
from images.test_sign import bake_tiny


def _settings(home: Path, tmp_path: Path) -> ops.Settings:
    return ops.settings_for(os.environ, str(tmp_path / "castiron.yaml"), str(home))


def test_image_facts_unsigned_then_signed_and_verified(
    run_cli: Any, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = bake_tiny(home / "images", tmp_path, "hello\n", "v1")
    settings = _settings(home, tmp_path)
    facts = ops.image_facts(settings, "v1", [])
    assert facts["digest"] == digest and facts["tags"] == ["v1"]
    assert (facts["signed"], facts["signature_keyids"], facts["verified"]) == (False, [], None)

    monkeypatch.setenv("KEY_PASS", "pw")
    keys = tmp_path / "release"
    made = run_cli("keys", "generate", "--out", str(keys), "--passphrase-env", "KEY_PASS")
    assert made.exit_code == 0, made.stderr
    signed = run_cli("sign", "v1", "--key", f"{keys}.key", "--passphrase-env", "KEY_PASS")
    assert signed.exit_code == 0, signed.stderr
    facts = ops.image_facts(settings, digest, [f"{keys}.pub"])
    assert facts["signed"] is True and facts["provenance"] is True
    assert len(facts["signature_keyids"]) == 1
    assert facts["signature_keyids"][0].startswith("sha256:")
    assert facts["verified"] is True
    assert facts["verification"].startswith(f"image {digest} verified: signature: ")


def test_image_facts_of_an_unknown_tag(home: Path, tmp_path: Path) -> None:
    bake_tiny(home / "images", tmp_path, "hello\n", "v1")
    with pytest.raises(NotFoundError):
        ops.image_facts(_settings(home, tmp_path), "nope", [])


def test_environment_facts_of_an_environment_never_deployed(home: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError) as info:
        ops.environment_facts(_settings(home, tmp_path), "staging")
    assert str(info.value) == "environment 'staging' was never deployed"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("castiron.yaml#staging", ("castiron.yaml", "staging")),
        ("dir/with#hash/castiron.yaml#prod", ("dir/with#hash/castiron.yaml", "prod")),
    ],
)
def test_import_id(text: str, expected: tuple[str, str]) -> None:
    assert ops.parse_import_id(text) == expected


@pytest.mark.parametrize("text", ["staging", "#staging", "castiron.yaml#"])
def test_bad_import_id(text: str) -> None:
    with pytest.raises(UsageError) as info:
        ops.parse_import_id(text)
    assert str(info.value) == (
        f"import id {text!r}: write SPEC#ENVIRONMENT (e.g. castiron.yaml#staging), "
        "SPEC as in the configuration"
    )


def test_plan_of_a_missing_spec_is_castirons_spec_error(home: Path, tmp_path: Path) -> None:
    args = ops.DeploymentArgs(spec=str(tmp_path / "castiron.yaml"), environment="staging")
    with pytest.raises(SpecError) as info:
        ops.plan(_settings(home, tmp_path), args)
    assert str(info.value) == f"{tmp_path / 'castiron.yaml'}:1:1: no such file"


def test_an_unknown_environment_names_the_known_ones(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "castiron.yaml"
    spec.write_text("app: hello\nenvironments:\n  staging: {listen: '127.0.0.1:8080'}\n")
    args = ops.DeploymentArgs(spec=str(spec), environment="prod", replicas=2)
    with pytest.raises(UsageError) as info:
        ops.plan(_settings(home, tmp_path), args)
    assert str(info.value) == f"no environment 'prod' in {spec} (known: staging)"


def test_the_provider_certificate_is_cached_until_its_last_day(tmp_path: Path) -> None:
    from cryptography import x509

    from castiron.terraform.provider import CERT_DAYS, certificate

    cache = tmp_path / "cache" / "cert.json"
    der, key_pem, cert_pem = certificate(cache, 1_000_000.0)
    assert cache.stat().st_mode & 0o777 == 0o600
    parsed = x509.load_der_x509_certificate(der)
    assert parsed.subject.rfc4514_string() == "CN=localhost"
    assert x509.load_pem_x509_certificate(cert_pem) == parsed
    assert b"PRIVATE KEY" in key_pem
    assert certificate(cache, 1_000_000.0 + 86400) == (der, key_pem, cert_pem)
    # Within a day of its end, or unreadable: a new one.
    assert certificate(cache, 1_000_000.0 + CERT_DAYS * 86400 - 86400)[0] != der
    cache.write_text("{not json")
    assert certificate(cache, 1_000_000.0)[0] != der


def test_values_not_known_yet_leave_the_plan_to_the_apply() -> None:
    from tf.types import Unknown

    from castiron.terraform.provider import _known

    assert _known({"A": "1", "B": ["x"]}) and _known(None) and _known("v1")
    assert not _known(Unknown)
    assert not _known({"A": Unknown})
    assert not _known(["x", Unknown])
