"""Secrets: references resolved at deploy time, never written anywhere castiron keeps.

Owns turning a release's secret references (``env:VAR``, ``file:PATH``, ``tf:FILE#OUTPUT``)
into values for the instances of one deployment. Values live only in memory and in the
instances' environment; each one is handed to the redactor (the state store's) before it is
used, so that whatever castiron captures afterwards (instance output, errors, events, journal,
audit details) has it masked as ``***``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from castiron.engine.release import Release
from castiron.errors import UsageError
from castiron.redact import Redactor

MAX_SECRET_BYTES = 64 * 1024


def resolve_secrets(
    release: Release, environ: Mapping[str, str], base_dir: Path, redactor: Redactor
) -> dict[str, str]:
    """Values of ``release``'s secrets, read from ``environ`` or files under ``base_dir``; each
    is added to ``redactor`` as soon as it is read.

    Raises:
        UsageError: naming the secret and its reference when a value cannot be read.
    """
    values: dict[str, str] = {}
    for name, ref in release.config.secrets:
        kind, _, target = ref.partition(":")
        if kind == "env":
            if target not in environ:
                raise UsageError(
                    f"secret {name}: environment variable {target} is not set "
                    f"(environment {release.environment})"
                )
            values[name] = environ[target]
        elif kind == "file":
            path = Path(target)
            if not path.is_absolute():
                path = base_dir / path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise UsageError(f"secret {name}: cannot read {path}: {exc.strerror}") from exc
            if len(data) > MAX_SECRET_BYTES:
                raise UsageError(f"secret {name}: {path} is larger than 64 KiB")
            try:
                values[name] = data.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError as exc:
                raise UsageError(f"secret {name}: {path} is not UTF-8 text") from exc
        elif kind == "tf":
            from castiron.spec.tfoutputs import secret_value

            outputs, _, output = target.rpartition("#")
            try:
                values[name] = secret_value(base_dir, outputs, output)
            except ValueError as exc:
                raise UsageError(f"secret {name}: {exc}") from exc
        else:
            raise UsageError(f"secret {name}: unknown reference {ref!r}")
        redactor.add([values[name]])
    return values
