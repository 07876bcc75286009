"""Build hook: compiles the builtin router's per-request path with mypyc where it can.

Everything else about the package is declared in ``pyproject.toml``. The modules named in
``castiron/compiled.py`` (the HTTP codec, the proxy and its counters) are plain, typed
Python; when mypyc and a C compiler are there, they are also compiled to C extensions, which
the router then runs (less CPU per proxied request). Nothing is lost without them: the same
source runs as Python. ``CASTIRON_COMPILE=0`` skips the compilation.

Next to the extensions the build writes ``castiron/compiled.json``, the SHA-256 of each source
it compiled: castiron imports an extension only while its source still has that digest, so an
edited source is never shadowed by a stale build (``./scripts/test`` rebuilds it).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
SOURCES = {
    "castiron.httpcodec": "src/castiron/httpcodec.py",
    "castiron.traffic.proxy": "src/castiron/traffic/proxy.py",
    "castiron.traffic.stats": "src/castiron/traffic/stats.py",
}
"""The compiled modules and their sources; ``castiron.compiled.MODULES`` names the same."""

MANIFEST = "compiled.json"


def _say(message: str) -> None:
    print(f"castiron build: {message}", file=sys.stderr)


def _extensions() -> list[Any]:
    if os.environ.get("CASTIRON_COMPILE", "1") == "0":
        _say("CASTIRON_COMPILE=0: the router runs as pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not installed: the router runs as pure Python")
        return []
    try:
        extensions = mypycify(
            [
                # the build may lack the runtime dependencies' packages: type them as Any
                "--ignore-missing-imports",
                "--follow-imports=silent",
                *SOURCES.values(),
            ],
            opt_level="3",
            group_name="castiron.router",
        )
    except (Exception, SystemExit) as exc:  # a type error mypyc cannot compile past
        _say(f"mypyc could not compile the router ({exc}): it runs as pure Python")
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: install the pure-Python package
    return list(extensions)


class BuildExt(build_ext):  # type: ignore[misc]
    """Builds the extensions, then records the digest of each source they came from."""

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        built = all(Path(self.get_ext_fullpath(e.name)).exists() for e in self.extensions)
        package = Path(self.get_ext_fullpath("castiron.httpcodec")).parent
        manifest = package / MANIFEST
        if not built:
            _say("the C compiler failed: the router runs as pure Python")
            manifest.unlink(missing_ok=True)
            return
        digests = {
            module: hashlib.sha256((HERE / path).read_bytes()).hexdigest()
            for module, path in SOURCES.items()
        }
        package.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, manifest)
        _say(f"compiled {', '.join(sorted(digests))}")


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
