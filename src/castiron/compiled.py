"""Which of castiron's modules run compiled, and the guard that keeps a stale build out.

The builtin router's per-request path (:mod:`castiron.httpcodec`,
:mod:`castiron.traffic.proxy` and its counters, :mod:`castiron.traffic.stats`) is typed
Python that the build also compiles to C extensions with mypyc when it can (``setup.py``).
Python would import such an extension in place of its source whenever both are there, even
once the source has changed; so the build records the SHA-256 of every source it compiled
(``castiron/compiled.json``), and :func:`install` puts a finder in front of the import system
that loads these modules from their source unless

- every one of them has an extension that was built from the source now on disk, and
- ``CASTIRON_COMPILED`` is not ``0`` (set it to compare, or to rule the extensions out).

The modules are compiled as one group, which calls between them directly, so they are used
all compiled or all from source, never mixed. :func:`status` says which, and why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import NamedTuple

# Imported by the package itself, so by every castiron process: only what Python has loaded
# at start-up, the rest (hashing, JSON, importlib.util) when a compiled module is imported.

__all__ = ["MODULES", "Status", "install", "status"]

MODULES = ("castiron.httpcodec", "castiron.traffic.proxy", "castiron.traffic.stats")
"""The modules the build compiles (``setup.py`` lists their sources)."""

MANIFEST = "compiled.json"
ENV = "CASTIRON_COMPILED"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


class Status(NamedTuple):
    """Whether :data:`MODULES` run compiled; ``reason`` says why not."""

    compiled: bool
    reason: str
    turned_off: bool = False
    """Ruled out by ``CASTIRON_COMPILED=0`` (not by the build)."""


def _source(module: str) -> str:
    return os.path.join(_PACKAGE, *module.split(".")[1:]) + ".py"


def _has_extension(module: str) -> bool:
    from importlib.machinery import EXTENSION_SUFFIXES

    stem = _source(module)[: -len(".py")]
    return any(os.path.exists(stem + suffix) for suffix in EXTENSION_SUFFIXES)


def _decide() -> Status:
    import hashlib
    import json

    if os.environ.get(ENV, "") == "0":
        return Status(False, f"{ENV}=0: running from source", turned_off=True)
    if not all(_has_extension(m) for m in MODULES):
        return Status(False, "not compiled (no C extensions were built for this install)")
    try:
        with open(os.path.join(_PACKAGE, MANIFEST), "rb") as f:
            recorded = json.load(f)["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return Status(False, f"the build record {MANIFEST} is missing or unreadable")
    for module in MODULES:
        try:
            with open(_source(module), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return Status(False, f"{module}: its source is not readable: running from source")
        if not isinstance(recorded, dict) or recorded.get(module) != digest:
            return Status(False, f"{module} changed since it was compiled: running from source")
    return Status(True, "compiled with mypyc")


_decided: Status | None = None


def status() -> Status:
    """Whether the compiled modules are in use in this process (decided once, on first use)."""
    global _decided
    if _decided is None:
        _decided = _decide()
    return _decided


class _Finder:
    """A meta path finder: the source of :data:`MODULES` when the extensions may not be used."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name not in MODULES or status().compiled:
            return None  # the import system's own finders: the extension, or the only source
        from importlib.util import spec_from_file_location

        return spec_from_file_location(name, _source(name))


def install() -> None:
    """Put the guard in front of the import system (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
