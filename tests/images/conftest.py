"""Fixtures of the image tests: registries shared by the push/pull test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .registrykit import Registry, run_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A plain-HTTP docker-registry on 127.0.0.1 for the whole session."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A docker-registry with TLS (a test CA) and htpasswd Basic auth."""
    with run_registry(tmp_path_factory.mktemp("tls-registry"), tls=True) as reg:
        yield reg
