"""castiron.compiled: the router's C extensions are used only when built from the source on
disk, all of them or none, and never when ``CASTIRON_COMPILED=0``."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from castiron import compiled

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package directory holding each compiled module's source, extension and build record."""
    root = tmp_path / "castiron"
    digests = {}
    for module in compiled.MODULES:
        source = root.joinpath(*module.split(".")[1:]).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
        source.with_name(source.stem + SUFFIX).write_bytes(b"\x7fELF")
        digests[module] = hashlib.sha256(source.read_bytes()).hexdigest()
    (root / compiled.MANIFEST).write_text(json.dumps({"modules": digests}))
    monkeypatch.setattr(compiled, "_PACKAGE", root)
    monkeypatch.delenv(compiled.ENV, raising=False)
    return root


def test_extensions_built_from_the_sources_on_disk_are_used(package: Path) -> None:
    assert compiled._decide() == compiled.Status(True, "compiled with mypyc")


def test_an_edited_source_turns_every_extension_off(package: Path) -> None:
    (package / "traffic" / "proxy.py").write_text("NAME = 'edited'\n")
    status = compiled._decide()
    assert status == compiled.Status(
        False, "castiron.traffic.proxy changed since it was compiled: running from source"
    )


def test_a_missing_extension_or_record_means_source(package: Path) -> None:
    (package / compiled.MANIFEST).write_text("{not json")
    assert compiled._decide() == compiled.Status(
        False, f"the build record {compiled.MANIFEST} is missing or unreadable"
    )
    (package / f"httpcodec{SUFFIX}").unlink()
    assert not compiled._decide().compiled
    assert "no C extensions" in compiled._decide().reason


def test_the_environment_can_rule_them_out(package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(compiled.ENV, "0")
    assert compiled._decide() == compiled.Status(
        False, "CASTIRON_COMPILED=0: running from source", turned_off=True
    )


def test_the_finder_hands_out_the_source_only_when_the_extensions_are_off(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finder = compiled._Finder()
    monkeypatch.setattr(compiled, "_decided", compiled.Status(True, "compiled with mypyc"))
    assert finder.find_spec("castiron.traffic.proxy") is None  # the import system finds the .so
    monkeypatch.setattr(compiled, "_decided", compiled.Status(False, "off"))
    spec = finder.find_spec("castiron.traffic.proxy")
    assert spec is not None and spec.origin == str(package / "traffic" / "proxy.py")
    assert finder.find_spec("castiron.traffic.worker") is None  # never compiled: not its business


def _origins(env: dict[str, str]) -> list[str]:
    code = (
        "import castiron.httpcodec as h, castiron.traffic.proxy as p, castiron.compiled as c\n"
        "print(h.__file__); print(p.__file__); print(c.status().compiled)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    return out.split()


def test_this_install_imports_all_compiled_or_all_source() -> None:
    env = {k: v for k, v in os.environ.items() if k != compiled.ENV}
    codec, proxy, used = _origins(env)
    assert codec.endswith(".py") == proxy.endswith(".py")
    assert used == str(not proxy.endswith(".py"))
    if os.environ.get("CI") == "true":
        # the test command builds the extensions: CI tests what users install
        assert used == "True", "the router's C extensions were not built"
    codec, proxy, used = _origins({**env, compiled.ENV: "0"})
    assert codec.endswith("httpcodec.py") and proxy.endswith("proxy.py") and used == "False"
