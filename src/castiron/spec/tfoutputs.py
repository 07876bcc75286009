"""Terraform outputs as spec values: reading a state file or a ``terraform output -json`` file.

Owns what ``${tf:NAME}`` and a ``{tf: NAME}`` secret read: the outputs of the file the spec
names in ``terraform.outputs``, either a Terraform state file (version 4: ``outputs`` with
``value``, ``type`` and ``sensitive``) or what ``terraform output -json`` prints
(``{NAME: {value, type, sensitive}}``). A value is text as the spec uses it: a string as is,
anything else as compact JSON. Whether an output is sensitive is kept: a sensitive value may
only be a secret, resolved at deploy time, never stored or printed.

It knows nothing of Terraform beyond these two file formats (it never runs it), and nothing
of the CLI or the engine. Every problem is a :class:`ValueError` with a message for users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_BYTES = 16 * 1024 * 1024
"""Largest outputs or state file read."""


@dataclass(frozen=True)
class TfOutput:
    """One Terraform output."""

    value: str
    """The value as spec text (strings as is, anything else as compact JSON)."""
    sensitive: bool

    def __repr__(self) -> str:  # a sensitive value never reaches a log through repr()
        shown = "***" if self.sensitive else repr(self.value)
        return f"TfOutput(value={shown}, sensitive={self.sensitive})"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_outputs(data: bytes, name: str) -> dict[str, TfOutput]:
    """The outputs in ``data`` (a state file or ``terraform output -json``); ``name`` names
    the file in messages.

    Raises:
        ValueError: when ``data`` is neither.
    """
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{name} is not a Terraform state or `terraform output -json` file")
    outputs: Any = doc
    if "terraform_version" in doc or ("version" in doc and "outputs" in doc):
        if doc.get("version") != 4:
            raise ValueError(
                f"{name}: Terraform state version {doc.get('version')!r} is not supported "
                "(version 4, written by Terraform 0.12 and later, is)"
            )
        outputs = doc.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise ValueError(f"{name}: outputs is not an object")
    result: dict[str, TfOutput] = {}
    for key, item in outputs.items():
        if not isinstance(item, dict) or "value" not in item:
            raise ValueError(f"{name}: output {key!r} has no value")
        result[str(key)] = TfOutput(_text(item["value"]), bool(item.get("sensitive", False)))
    return result


def read_outputs(path: Path) -> dict[str, TfOutput]:
    """The outputs of the file at ``path``.

    Raises:
        ValueError: when it cannot be read or is neither format.
    """
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ValueError(f"{path} is larger than 16 MiB")
    return parse_outputs(data, str(path))


def outputs_path(base_dir: Path, written: str) -> Path:
    """The outputs file as written in the spec, relative to the spec's directory."""
    path = Path(written)
    return path if path.is_absolute() else base_dir / path


def secret_value(base_dir: Path, written: str, output: str) -> str:
    """The value of ``output`` in the outputs file ``written`` (a ``tf:`` secret).

    Raises:
        ValueError: when the file cannot be read or has no such output.
    """
    path = outputs_path(base_dir, written)
    outputs = read_outputs(path)
    if output not in outputs:
        raise ValueError(f"terraform output {output!r} is not in {path}")
    return outputs[output].value


__all__ = ["TfOutput", "outputs_path", "parse_outputs", "read_outputs", "secret_value"]
