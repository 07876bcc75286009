"""The package root's public surface is pinned."""

from __future__ import annotations

import castiron
from castiron import errors


def test_root_all_is_pinned() -> None:
    assert sorted(castiron.__all__) == ["CastironError", "ExitCode", "SpecError", "__version__"]


def test_every_error_is_a_castiron_error_with_an_exit_code() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, errors.CastironError)
            assert int(obj.exit_code) in {1, 2, 3, 4, 5}


def test_error_tree_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert name in doc, name
