"""Plain values shared by every layer: identifiers and small frozen records.

This module owns the vocabulary types (``Digest``, ``ReleaseId``, ...). It must not know the
spec format, the state schema, or any runtime; it imports only :mod:`castiron.errors`.
"""

from __future__ import annotations

import hashlib
import re
from typing import NewType

from castiron.errors import UsageError

Digest = NewType("Digest", str)
"""A content digest, ``sha256:<64 hex>``."""

ReleaseId = NewType("ReleaseId", str)
"""A release identifier: a hash of the image digest and the resolved runtime config."""

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def parse_digest(value: str) -> Digest:
    """Return ``value`` as a :data:`Digest`.

    Raises:
        UsageError: when ``value`` is not ``sha256:`` followed by 64 lowercase hex digits.
    """
    if not _DIGEST_RE.match(value):
        raise UsageError(f"not a sha256 digest: {value!r}")
    return Digest(value)


def is_digest(value: str) -> bool:
    """True when ``value`` is a well-formed ``sha256:`` digest."""
    return bool(_DIGEST_RE.match(value))


def sha256_digest(data: bytes) -> Digest:
    """The :data:`Digest` of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def is_name(value: str) -> bool:
    """True for a valid app or environment name: ``[a-z0-9-]{1,63}``, no leading/trailing dash."""
    return bool(_NAME_RE.match(value))


__all__ = ["Digest", "ReleaseId", "is_digest", "is_name", "parse_digest", "sha256_digest"]
