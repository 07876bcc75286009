"""Fixtures for the runtime driver tests: the test image baked once per session."""

from __future__ import annotations

import pytest

from .localkit import LocalImage, bake_test_image


@pytest.fixture(scope="session")
def local_image(tmp_path_factory: pytest.TempPathFactory) -> LocalImage:
    """The scratch-based test image (a tiny HTTP server run by the host's python3)."""
    return bake_test_image(tmp_path_factory.mktemp("driver-image"))
