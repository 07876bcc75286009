"""castiron's OCI Distribution client: push and pull images with their signatures and
provenance to and from any registry.

A small package: :mod:`.reference` (parsing), :mod:`.auth` (credentials and challenges),
:mod:`.transport` (HTTP, TLS, retries), :mod:`.client` (the distribution API) and
:mod:`.transfer` (push and pull between the store and a registry). It moves only verified
bytes and knows nothing of runtimes or the spec.
"""

from __future__ import annotations

from castiron.images.registry.reference import Reference, looks_like_reference, parse_reference
from castiron.images.registry.transfer import (
    PullResult,
    PushResult,
    TransferObserver,
    TransferOptions,
    options_from,
    pull,
    push,
    resolve,
)
from castiron.images.registry.transport import TransportOptions

__all__ = [
    "PullResult",
    "PushResult",
    "Reference",
    "TransferObserver",
    "TransferOptions",
    "TransportOptions",
    "looks_like_reference",
    "options_from",
    "parse_reference",
    "pull",
    "push",
    "resolve",
]
