"""What a valid spec points at on disk: the image context, a Dockerfile, a base image layout
or archive, and secret files. ``castiron validate`` reports each missing or unreadable one
located like any other spec problem (``castiron.yaml:5:12: image.context: ...``).

Owns only existence and readability checks: it never reads a secret file's content (so no
value can be printed) and never imports an image. It knows nothing of the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from castiron.errors import SpecIssue
from castiron.spec.load import LoadedSpec, issue_locator

ARCHIVE_KINDS = ("oci-archive", "docker-archive")


def _problem(path: Path, *, directory: bool = False) -> str | None:
    """Why ``path`` cannot be used (None when it can): missing, wrong kind, unreadable."""
    try:
        path.stat()
    except FileNotFoundError:
        return f"no such {'directory' if directory else 'file'} ({path})"
    except OSError as exc:
        return f"cannot be read ({path}: {exc.strerror or exc})"
    if directory and not path.is_dir():
        return f"is not a directory ({path})"
    if not directory and path.is_dir():
        return f"is a directory, not a file ({path})"
    mode = os.R_OK | (os.X_OK if directory else 0)
    if not os.access(path, mode):
        return f"is not readable ({path}: permission denied)"
    return None


def _base_problem(ref: str, base_dir: Path) -> str | None:
    if ref == "scratch":
        return None
    kind, sep, rest = ref.partition(":")
    if not sep or not rest or kind not in ("oci", "docker", *ARCHIVE_KINDS):
        return (
            f"{ref!r} is not scratch, oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE "
            "or docker:REF"
        )
    if kind == "docker":
        return None  # the Docker engine resolves it at bake time (`castiron doctor` checks it)
    if kind == "oci":
        head, colon, tail = rest.rpartition(":")
        directory = head if colon and head and "/" not in tail else rest
        layout = base_dir / directory
        problem = _problem(layout, directory=True)
        if problem is None and not (layout / "index.json").is_file():
            problem = f"is not an OCI image layout (no index.json in {layout})"
        return f"{directory}: {problem}" if problem else None
    problem = _problem(base_dir / rest)
    return f"{rest}: {problem}" if problem else None


def check_references(loaded: LoadedSpec, environ: Mapping[str, str]) -> list[SpecIssue]:
    """Every problem with what ``loaded`` points at, located in its file (empty: all good).

    Raises:
        SpecError: when the file cannot be read again.
    """
    at = issue_locator(loaded.path, environ)
    spec, base_dir = loaded.spec, loaded.base_dir
    issues: list[SpecIssue] = []
    image = spec.image
    context = base_dir / image.context
    problem = _problem(context, directory=True)
    if problem is not None:
        issues.append(at(("image", "context"), f"{image.context}: {problem}"))
    elif image.dockerfile is not None:
        problem = _problem(context / image.dockerfile)
        if problem is not None:
            issues.append(at(("image", "dockerfile"), f"{image.dockerfile}: {problem}"))
    problem = _base_problem(image.base, base_dir)
    if problem is not None:
        issues.append(at(("image", "base"), problem))
    for name, ref in sorted(spec.service.secrets.items()):
        if ref.file is None or "${" in ref.file:  # ${VAR} is resolved at deploy time
            continue
        problem = _problem(base_dir / ref.file)
        if problem is not None:
            issues.append(at(("service", "secrets", name, "file"), f"{ref.file}: {problem}"))
    issues.sort(key=lambda i: (i.line, i.column, i.path))
    return issues


__all__ = ["check_references"]
