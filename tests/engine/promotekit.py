"""Shared by the promotion tests: a two-environment project whose production policy each test
writes, a fake runtime, keys, and ways to forge signatures as an attacker without the key would.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from castiron.images import oci
from castiron.images.sign import KeyPair, generate_keypair, load_signer, sign_image
from castiron.images.store import ImageStore
from castiron.model import Digest
from castiron.state.base import ManualClock

from .conftest import World, baked_world

SPEC = textwrap.dedent(
    """
    app: hello
    image:
      context: ./app
      entrypoint: ["python3", "server.py"]
    service:
      port: 8000
      replicas: 1
      health: {http: /healthz, interval: 100ms, start_period: 1s}
      secrets: {TOKEN: {env: HELLO_TOKEN}}
    environments:
      staging: {listen: 127.0.0.1:18080, keep_warm: 10m, drain_timeout: 1s}
      dev: {listen: 127.0.0.1:18082, keep_warm: 10m, drain_timeout: 1s}
      production:
        listen: 127.0.0.1:18081
        keep_warm: 10m
        drain_timeout: 1s
    """
)


def write_policy(
    world: World, policy: dict[str, Any] | None = None, promote_from: str | None = "staging"
) -> None:
    """Give production ``policy`` and ``promote_from``."""
    text = SPEC
    if promote_from is not None:
        text += f"    promote_from: {promote_from}\n"
    if policy:
        text += f"    policy: {json.dumps(policy)}\n"
    (world.root / "castiron.yaml").write_text(text)


def make_keys(world: World, name: str) -> KeyPair:
    """A key pair at ``keys/NAME.key`` / ``keys/NAME.pub`` beside the spec."""
    (world.root / "keys").mkdir(exist_ok=True)
    return generate_keypair(world.root / "keys" / name)


def sign(world: World, tag: str, keys: KeyPair) -> Digest:
    """Sign image ``tag`` with ``keys``; returns the signature artifact's digest."""
    digest = Digest(world.digests[tag])
    signer = load_signer(keys.private_path)
    return sign_image(world.images, digest, signer, reference=f"hello:{tag}").signature


def forge(
    store: ImageStore,
    artifact: Digest,
    *,
    payload: bytes | None = None,
    subject: Digest | None = None,
) -> None:
    """Rewrite a signature artifact consistently (new payload blob, new manifest, listed in
    the index) as someone without the key would: with another payload, or pointing at
    another image (``subject``)."""
    manifest = store.read_json(artifact)
    layer = manifest["layers"][0]
    if payload is not None:
        layer["digest"] = store.put_bytes(payload)
        layer["size"] = len(payload)
    if subject is not None:
        manifest["subject"] = store.image(subject).descriptor().to_json()
    raw = oci.canonical_json(manifest)
    entry = oci.Descriptor(
        oci.MANIFEST,
        store.put_bytes(raw),
        len(raw),
        annotations={oci.ANN_SUBJECT: manifest["subject"]["digest"]},
        artifact_type=manifest["artifactType"],
    )
    store.update_index(lambda current: [*(d for d in current if d.digest != artifact), entry])


def make_world(root: Path, clock: ManualClock) -> World:
    return baked_world(
        root, SPEC, clock, environ={"HELLO_TOKEN": "s3cret-value", "PATH": "/usr/bin:/bin"}
    )


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[World]:
    """The project with v1 and v2 baked, on a manual clock that starts at the real time (the
    CLI reads the real clock)."""
    world = make_world(tmp_path / "project", ManualClock(datetime.now(UTC)))
    try:
        yield world
    finally:
        world.store.close()
