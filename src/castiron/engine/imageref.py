"""Deploying from a registry: a ``--image`` that names a registry reference is resolved to a
digest once, before any plan is shown (invariant 2), and pulled (with its signatures and
provenance) so the store holds it; anything else is left for the store to resolve.

Owns only that decision; the protocol is :mod:`castiron.images.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping

from castiron.images.store import ImageStore


def resolve_image_reference(
    images: ImageStore, image: str | None, environ: Mapping[str, str]
) -> str | None:
    """The store digest to deploy for ``image``: for a registry reference
    (``host[:port]/repo[:tag|@sha256:…]``), the digest it names, pulled into ``images`` if
    missing; otherwise ``image`` unchanged (a tag, digest or prefix in the store, or None).

    Raises:
        UsageError: for a reference that does not parse.
        NotFoundError, DigestMismatchError, RegistryAuthError, RegistryError: when the
            registry has no such image, lies, refuses or fails (nothing is stored then).
    """
    from castiron.images.registry import looks_like_reference

    if image is None or not looks_like_reference(image):
        return image
    from castiron.images.registry import options_from, parse_reference, pull

    pulled = pull(images, parse_reference(image), environ=environ, options=options_from(environ))
    return pulled.digest


__all__ = ["resolve_image_reference"]
