"""Default tags: the git short sha only when every baked file is committed and unmodified;
otherwise a name derived from the image digest, so different images never share a tag and
baking the same image twice is not an error. Also: what is never part of a context, and the
source key that lets a deploy find the image baked from the current spec and context."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from castiron.images.build import BakeOptions, baked_image, default_skips
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, recipe, run_bake, write_tree


def _git(cwd: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_AUTHOR_DATE": "1650000000 +0000",
        "GIT_COMMITTER_DATE": "1650000000 +0000",
        "HOME": str(cwd),
    }
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def _repo(tmp_path: Path) -> tuple[Path, Path, str]:
    repo = tmp_path / "repo"
    ctx = write_tree(repo / "app", APP_FILES)
    (repo / ".gitignore").write_text("ignored.txt\n/app/cache/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    return repo, ctx, _git(repo, "rev-parse", "--short", "HEAD")


def _bake(tmp_path: Path, ctx: Path, **fields: object):  # type: ignore[no-untyped-def]
    return run_bake(tmp_path / "store", ctx, recipe(**fields), source_date_epoch=None)


def _content_tag(short: str, digest: str) -> str:
    return f"{short}-dirty-{digest.split(':')[1][:12]}"


def test_a_committed_context_is_tagged_with_the_short_sha(tmp_path: Path) -> None:
    _, ctx, short = _repo(tmp_path)
    result = _bake(tmp_path, ctx)
    assert (result.tags, result.dirty) == ((short,), False)


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ("ignored", {}),
        ("ignored-dir", {}),
        ("untracked", {}),
        ("modified", {}),
        ("staged", {}),
        ("deleted", {}),
    ],
)
def test_anything_not_committed_gives_a_content_tag(
    tmp_path: Path, change: str, fields: dict[str, object]
) -> None:
    repo, ctx, short = _repo(tmp_path)
    if change == "ignored":
        (ctx / "ignored.txt").write_text("not in git\n")
    elif change == "ignored-dir":
        write_tree(ctx, {"cache/data.bin": "x"})
    elif change == "untracked":
        (ctx / "new.py").write_text("new\n")
    elif change == "modified":
        (ctx / "server.py").write_text("print('changed')\n")
    elif change == "staged":
        (ctx / "server.py").write_text("print('staged')\n")
        _git(repo, "add", "-A")
    else:
        (ctx / "lib" / "util.py").unlink()
    result = _bake(tmp_path, ctx, **fields)
    assert result.dirty
    assert result.tags == (_content_tag(short, result.digest),)


def test_files_left_out_of_the_image_do_not_make_it_dirty(tmp_path: Path) -> None:
    _, ctx, short = _repo(tmp_path)
    (ctx / "debug.log").write_text("untracked, excluded\n")
    home = ctx / ".castiron"
    home.mkdir()
    (home / "state.db").write_text("x")
    result = run_bake(
        tmp_path / "store", ctx, recipe(exclude=["*.log"]), source_date_epoch=None, skip=(home,)
    )
    assert (result.tags, result.dirty) == ((short,), False)


def test_baking_the_same_dirty_tree_twice_binds_the_same_tag(tmp_path: Path) -> None:
    _, ctx, short = _repo(tmp_path)
    (ctx / "ignored.txt").write_text("v1\n")
    first = _bake(tmp_path, ctx)
    again = _bake(tmp_path, ctx)
    assert again.tags == first.tags == (_content_tag(short, first.digest),)
    (ctx / "ignored.txt").write_text("v2\n")
    second = _bake(tmp_path, ctx)
    assert second.digest != first.digest
    assert second.tags == (_content_tag(short, second.digest),)
    assert set(ImageStore(tmp_path / "store").tags()) == {first.tags[0], second.tags[0]}


def test_the_spec_state_and_quickstart_dirs_are_never_in_the_context(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "proj", APP_FILES)
    spec = root / "castiron.yaml"
    spec.write_text("app: a\n")
    write_tree(root, {".castiron/state.db": "s", "castiron-quickstart/castiron.yaml": "q"})
    skips = default_skips(root, spec, root / ".castiron")
    first = run_bake(tmp_path / "store", root, skip=skips)
    spec.write_text("app: a\n# listen port changed\n")
    (root / "castiron-quickstart" / "castiron.yaml").write_text("changed")
    assert run_bake(tmp_path / "store", root, skip=skips).digest == first.digest


def test_baked_image_finds_what_the_current_sources_baked(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    store = ImageStore(tmp_path / "store")
    section = recipe()
    options = BakeOptions(context=ctx, base_dir=tmp_path, app="hello", port=8000)
    assert baked_image(section, store, options) is None
    v1 = run_bake(tmp_path / "store", ctx, section, app="hello", port=8000)
    assert baked_image(section, store, options) == v1.digest
    (ctx / "server.py").write_text("print('v2')\n")
    assert baked_image(section, store, options) is None
    v2 = run_bake(tmp_path / "store", ctx, section, app="hello", port=8000)
    assert baked_image(section, store, options) == v2.digest
    (ctx / "server.py").write_text("print('hello')\n")  # back to v1's sources
    assert baked_image(section, store, options) == v1.digest
    assert baked_image(recipe(entrypoint=["x"]), store, options) is None
