"""What the benchmark scripts under ``bench/`` say about the machine they ran on.

Owns reading the CPU model; each script composes its own line around it (nproc, kernel and
whatever versions it compares). Imported by the scripts as ``_machine`` (``python bench/X.py``
puts ``bench/`` first on the import path); knows nothing of castiron.
"""

from __future__ import annotations

from pathlib import Path


def cpu_model(unknown: str = "unknown CPU") -> str:
    """The ``model name`` of the first CPU in /proc/cpuinfo (``unknown`` when there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown
