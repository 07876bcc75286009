"""Helpers for the first-hour tests: run documented shell commands as written, and find any
process a tour left behind."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sh_blocks(markdown: Path) -> list[str]:
    """The lines of every ```sh block of ``markdown``, in order."""
    return [
        line
        for block in re.findall(r"```sh\n(.*?)```", markdown.read_text(encoding="utf-8"), re.S)
        for line in block.splitlines()
    ]


def castiron_shim(bin_dir: Path) -> Path:
    """A ``castiron`` executable in ``bin_dir`` that runs this checkout's CLI."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "castiron"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m castiron.cli.main "$@"\n')
    shim.chmod(0o755)
    return bin_dir


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without castiron settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTIRON_")}
    env.pop("APP_VERSION", None)
    env.update({"NO_COLOR": "1", "CASTIRON_ACTOR": "e2e@test", **extra})
    return env


def processes_under(root: Path) -> list[str]:
    """Processes (other than this one) whose command line or working directory is under
    ``root``: what a tour must not leave running."""
    found = []
    me = os.getpid()
    prefix = str(root.resolve())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if prefix in cmdline or cwd.startswith(prefix):
            found.append(f"{entry.name}: {cmdline.strip()} (in {cwd})")
    return found
