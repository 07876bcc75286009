"""Secrets are resolved from the environment or files at deploy time only."""

from __future__ import annotations

from pathlib import Path

import pytest

from castiron.engine.release import resolve_release
from castiron.engine.secrets import resolve_secrets
from castiron.errors import UsageError
from castiron.model import Digest
from castiron.redact import Redactor
from castiron.spec.schema import Spec

DIGEST = Digest("sha256:" + "3" * 64)


def _release(secrets: dict[str, dict[str, str]]):  # type: ignore[no-untyped-def]
    spec = Spec.model_validate(
        {
            "app": "hello",
            "service": {"secrets": secrets},
            "environments": {"staging": {"listen": "127.0.0.1:8080"}},
        }
    )
    return resolve_release(spec, "staging", DIGEST)


def test_env_and_file_secrets(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    release = _release({"A": {"env": "HELLO_A"}, "B": {"file": "token"}})
    redactor = Redactor()
    assert resolve_secrets(release, {"HELLO_A": "x"}, tmp_path, redactor) == {
        "A": "x",
        "B": "s3cret",
    }
    assert redactor.values == {"s3cret"}  # "x" is too short to mask


def test_missing_env_secret_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="secret A: environment variable HELLO_A is not set"):
        resolve_secrets(_release({"A": {"env": "HELLO_A"}}), {}, tmp_path, Redactor())


def test_missing_file_secret_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="secret B: cannot read"):
        resolve_secrets(_release({"B": {"file": "nope"}}), {}, tmp_path, Redactor())
