"""Helpers for the bake, store and archive tests: build contexts and recipes on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from castiron.images.build import BakeOptions, BakeResult, bake
from castiron.images.store import ImageStore
from castiron.spec.schema import ImageSection

BUSYBOX = Path("/bin/busybox")


def write_tree(
    root: Path, files: Mapping[str, bytes | str], order: Iterable[str] | None = None
) -> Path:
    """Create ``files`` (path → content; a path ending in ``/`` is a directory) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in order if order is not None else files:
        content = files[rel]
        path = root / rel
        if rel.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def recipe(**fields: Any) -> ImageSection:
    """An ``image:`` section (validated like the spec loader would)."""
    return ImageSection.model_validate(fields)


def run_bake(
    store_root: Path,
    context: Path,
    section: ImageSection | None = None,
    **options: Any,
) -> BakeResult:
    """Bake ``context`` into the store at ``store_root`` with a fixed epoch unless given."""
    options.setdefault("source_date_epoch", 1_700_000_000)
    options.setdefault("environ", {"PATH": os.environ.get("PATH", os.defpath)})
    opts = BakeOptions(context=context, base_dir=context.parent, **options)
    return bake(section or recipe(), ImageStore(store_root), opts)


APP_FILES: dict[str, bytes | str] = {
    "server.py": "print('hello')\n",
    "lib/util.py": "X = 1\n",
    "lib/data.bin": bytes(range(256)) * 64,
    "static/index.html": "<h1>hi</h1>\n",
    "empty/": "",
    "deps/pkg/__init__.py": "",
    "deps/pkg/mod.py": "Y = 2\n",
}
