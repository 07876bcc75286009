"""Baking: layers split, build commands, exclude globs, secrets, cache, config, tags,
provenance, the file manifest and base images."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from castiron.errors import ImageError
from castiron.images import oci, provenance
from castiron.images.archive import export_archive
from castiron.images.manifest import file_manifest
from castiron.images.pattern import PatternSet
from castiron.images.store import ImageStore

from .bakekit import APP_FILES, recipe, run_bake, write_tree


def _layer_names(store_root: Path, digest: str) -> list[list[str]]:
    store = ImageStore(store_root)
    out = []
    for layer in store.image(digest).layers:
        raw = gzip.decompress(store.blob_path(layer.digest).read_bytes())
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            out.append(tf.getnames())
    return out


@pytest.mark.parametrize(
    ("patterns", "path", "is_dir", "excluded"),
    [
        (["*.log"], "a.log", False, True),
        (["*.log"], "deep/dir/a.log", False, True),
        (["*.log", "!keep.log"], "x/keep.log", False, False),
        (["/build"], "build", True, True),
        (["/build"], "src/build", True, False),
        (["build/"], "build", False, False),
        (["build/"], "src/build", True, True),
        (["**/__pycache__"], "a/b/__pycache__", True, True),
        (["docs/**"], "docs/a/b.md", False, True),
        (["a/**/z"], "a/z", False, True),
        (["a/**/z"], "a/b/c/z", False, True),
        (["a/*/z"], "a/b/c/z", False, False),
        (["file?.txt"], "file1.txt", False, True),
        (["file[0-9].txt"], "filex.txt", False, False),
        (["node_modules"], "web/node_modules", True, True),
    ],
)
def test_exclude_glob_semantics(
    patterns: list[str], path: str, is_dir: bool, excluded: bool
) -> None:
    assert PatternSet.of(patterns).excluded(path, is_dir) is excluded


def test_exclude_applies_to_the_context(tmp_path: Path) -> None:
    files = {
        **APP_FILES,
        "build/out.o": "o",
        "src/build/keep.txt": "k",
        "a.log": "l",
        "keep.log": "k",
        "lib/__pycache__/x.pyc": "c",
        ".git/HEAD": "ref",
    }
    ctx = write_tree(tmp_path / "ctx", files)
    section = recipe(exclude=["/build", "*.log", "!keep.log", "**/__pycache__"])
    result = run_bake(tmp_path / "store", ctx, section)
    (names,) = _layer_names(tmp_path / "store", result.digest)
    assert "app/src/build/keep.txt" in names
    assert "app/keep.log" in names
    for gone in ("app/build", "app/build/out.o", "app/a.log", "app/lib/__pycache__", "app/.git"):
        assert gone not in names


def test_bad_pattern_names_its_place(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    with pytest.raises(ImageError, match=r"image.exclude\[1\]"):
        run_bake(tmp_path / "store", ctx, recipe(exclude=["ok", "/"]))


def test_layers_split_first_match_wins(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", {**APP_FILES, "deps/big.bin": "b", "static/app.js": "j"})
    section = recipe(layers=["deps/**", "static/", "**/*.js"])
    result = run_bake(tmp_path / "store", ctx, section)
    deps, static, app = _layer_names(tmp_path / "store", result.digest)
    assert [layer.name for layer in result.layers] == [
        "layers[0] deps/**",
        "layers[1] static/",
        "app",
    ]
    assert "app/deps/pkg/mod.py" in deps and "app/deps/big.bin" in deps
    assert "app/static/app.js" in static and "app/static/index.html" in static
    assert "app/server.py" in app and "app/lib/util.py" in app
    assert not any(n.startswith("app/deps/") for n in app)
    assert deps[:2] == ["app", "app/deps"]  # parents are explicit in every layer


def test_rebuild_only_rewrites_the_changed_layer(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    section = recipe(layers=["deps/**"])
    first = run_bake(tmp_path / "store", ctx, section)
    assert (first.layers_built, first.layers_reused) == (2, 0)
    (ctx / "server.py").write_text("print('v2')\n")
    second = run_bake(tmp_path / "store", ctx, section)
    assert (second.layers_built, second.layers_reused) == (1, 1)
    assert second.layers[0].digest == first.layers[0].digest
    assert second.digest != first.digest


def test_unchanged_rebuild_hits_the_cache_without_rehashing(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    old = 1_600_000_000
    for path in ctx.rglob("*"):
        os.utime(path, (old, old))
    first = run_bake(tmp_path / "store", ctx)
    assert first.files_hashed == 6
    second = run_bake(tmp_path / "store", ctx)
    assert second.layers_built == 0 and second.layers_reused == 1
    assert second.files_hashed == 0
    assert second.digest == first.digest


def test_cache_entry_for_a_vanished_blob_is_not_trusted(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    first = run_bake(tmp_path / "store", ctx)
    store = ImageStore(tmp_path / "store")
    store.blob_path(first.layers[-1].digest).unlink()
    second = run_bake(tmp_path / "store", ctx)
    assert second.layers_built == 1
    assert second.digest == first.digest
    assert store.has_blob(first.layers[-1].digest)


def test_build_commands_run_in_a_clean_copy(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", {"src.txt": "source\n", "junk.tmp": "x"})
    section = recipe(
        exclude=["*.tmp"],
        build=[
            "test ! -e junk.tmp",
            "mkdir -p out && cat src.txt > out/built.txt",
            'echo "$SOURCE_DATE_EPOCH" > out/epoch.txt',
        ],
    )
    result = run_bake(tmp_path / "store", ctx, section, source_date_epoch=42)
    assert not (ctx / "out").exists()
    files = file_manifest(ImageStore(tmp_path / "store"), result.digest)
    assert files["/app/out/built.txt"].size == len("source\n")
    assert files["/app/out/epoch.txt"].size == len("42\n")
    assert "/app/junk.tmp" not in files
    again = run_bake(tmp_path / "store", ctx, section, source_date_epoch=42)
    assert again.digest == result.digest and again.layers_built == 0


def test_failing_build_command_names_command_status_and_output(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", {"a": "a"})
    section = recipe(build=["true", "for i in 1 2 3; do echo line$i; done; echo oops >&2; exit 3"])
    with pytest.raises(ImageError) as err:
        run_bake(tmp_path / "store", ctx, section)
    message = str(err.value)
    assert message.startswith("image.build[1]: 'for i in 1 2 3;")
    assert "exit status 3" in message
    assert message.splitlines()[-4:] == ["line1", "line2", "line3", "oops"]


@pytest.mark.parametrize(
    "name",
    [
        ".env",
        "config/.env.production",
        "certs/server.pem",
        "tls.key",
        "id_rsa",
        "home/.ssh/id_ed25519",
        ".aws/credentials",
        ".netrc",
        "bundle.p12",
        "gcloud/application_default_credentials.json",
    ],
)
def test_secret_looking_files_are_refused(tmp_path: Path, name: str) -> None:
    ctx = write_tree(tmp_path / "ctx", {**APP_FILES, name: "secret"})
    with pytest.raises(ImageError, match="look like secrets: " + name.replace(".", r"\.")):
        run_bake(tmp_path / "store", ctx)
    assert run_bake(tmp_path / "store", ctx, recipe(allow_secrets=[name])).digest


def test_service_account_json_is_refused_by_content(tmp_path: Path) -> None:
    key = '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"}'
    ctx = write_tree(tmp_path / "ctx", {"sa.json": key, "ok.json": "{}", "id_rsa.pub": "pub"})
    with pytest.raises(ImageError, match=r"secrets: sa\.json \("):
        run_bake(tmp_path / "store", ctx)


def test_config_carries_the_recipe(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    section = recipe(
        entrypoint=["python3", "server.py"],
        cmd=["--port", "8000"],
        env={"PYTHONPATH": "/app/deps", "LOG": "info"},
        workdir="/srv/app",
        user="1000:1000",
        labels={"team": "web"},
    )
    result = run_bake(tmp_path / "store", ctx, section, port=8000, app="hello")
    image = ImageStore(tmp_path / "store").image(result.digest)
    assert image.config_digest == result.config_digest
    cfg = image.config["config"]
    assert cfg == {
        "Entrypoint": ["python3", "server.py"],
        "Cmd": ["--port", "8000"],
        "Env": ["PYTHONPATH=/app/deps", "LOG=info"],
        "WorkingDir": "/srv/app",
        "User": "1000:1000",
        "Labels": {"team": "web"},
        "ExposedPorts": {"8000/tcp": {}},
    }
    assert image.config["created"] == "2023-11-14T22:13:20Z"
    assert image.config["rootfs"]["diff_ids"] == [layer.diff_id for layer in result.layers]
    assert image.config["history"][0]["created_by"] == "castiron bake: app"
    assert image.annotations[oci.ANN_TITLE] == "hello"
    assert image.annotations[oci.ANN_COMPRESSOR].startswith("zlib ")


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


def test_git_context_gives_tag_epoch_revision_and_dirty(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ctx = write_tree(repo / "app", APP_FILES)
    _git(repo, "init", "-q")
    _git(repo, "remote", "add", "origin", "https://user:token@git.example.invalid/app.git")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    short, commit = _git(repo, "rev-parse", "--short", "HEAD"), _git(repo, "rev-parse", "HEAD")
    home = repo / "app" / ".castiron"
    clean = run_bake(home / "images", ctx, source_date_epoch=None, skip=(home,), app="hello")
    assert clean.tags == (short,)
    assert clean.source_date_epoch == 1650000000
    assert (clean.revision, clean.dirty) == (commit, False)
    store = ImageStore(home / "images")
    ann = store.image(clean.digest).annotations
    assert ann[oci.ANN_REVISION] == commit
    assert ann[oci.ANN_SOURCE] == "https://git.example.invalid/app.git"
    (ctx / "server.py").write_text("print('dirty')\n")
    dirty = run_bake(home / "images", ctx, source_date_epoch=None, skip=(home,))
    assert dirty.dirty
    assert dirty.tags == (f"{short}-dirty-{dirty.digest.split(':')[1][:12]}",)


def test_no_git_falls_back_to_the_image_digest(tmp_path: Path) -> None:
    result = run_bake(tmp_path / "store", write_tree(tmp_path / "ctx", APP_FILES))
    assert result.tags == ("sha-" + result.digest.split(":")[1][:12],)
    assert result.revision is None


def test_provenance_statement(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    section = recipe(build=["true"], layers=["deps/**"])
    result = run_bake(
        tmp_path / "store", ctx, section, app="hello", spec_digest="sha256:" + "a" * 64
    )
    store = ImageStore(tmp_path / "store")
    (doc,) = provenance.read(store, result.digest)
    assert doc["_type"] == "https://in-toto.io/Statement/v1"
    assert doc["predicateType"] == "https://slsa.dev/provenance/v1"
    assert doc["subject"] == [
        {"name": f"hello:{result.tags[0]}", "digest": {"sha256": result.digest.split(":")[1]}}
    ]
    build = doc["predicate"]["buildDefinition"]
    assert build["externalParameters"]["spec_digest"] == "sha256:" + "a" * 64
    assert build["internalParameters"]["build_commands"] == ["true"]
    assert build["internalParameters"]["dirty"] is False
    assert {d["name"] for d in build["resolvedDependencies"]} == {
        "layer:app",
        "layer:layers[0] deps/**",
    }
    assert doc["predicate"]["runDetails"]["builder"]["version"]["castiron"]
    # It is an OCI artifact referring to the image, listed in the index without a tag.
    (ref,) = store.referrers(result.digest)
    assert ref.artifact_type == oci.IN_TOTO and oci.ANN_REF_NAME not in ref.annotations
    art = store.read_json(ref.digest)
    assert art["subject"]["digest"] == result.digest
    assert art["artifactType"] == oci.IN_TOTO


def test_file_manifest(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    (ctx / "link").symlink_to("server.py")
    result = run_bake(tmp_path / "store", ctx)
    files = file_manifest(ImageStore(tmp_path / "store"), result.digest)
    entry = files["/app/server.py"]
    assert (entry.type, entry.mode, entry.size) == ("file", 0o644, len("print('hello')\n"))
    assert entry.sha256 == hashlib.sha256(b"print('hello')\n").hexdigest()
    assert files["/app/link"].type == "symlink" and files["/app/link"].target == "server.py"
    assert files["/app/empty"].type == "dir"
    assert files["/app"].type == "dir"


def test_special_files_are_refused(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    os.mkfifo(ctx / "pipe")
    with pytest.raises(ImageError, match="pipe: only files, directories and symlinks"):
        run_bake(tmp_path / "store", ctx)
    assert run_bake(tmp_path / "store", ctx, recipe(exclude=["pipe"])).digest


def test_bases_from_layout_and_archives(tmp_path: Path) -> None:
    base_ctx = write_tree(tmp_path / "basectx", {"bin/tool": "tool", "etc/conf": "base"})
    base = run_bake(
        tmp_path / "basestore",
        base_ctx,
        recipe(workdir="/", env={"PATH": "/bin", "FROM": "base"}, cmd=["tool"]),
        tags=("v1",),
    )
    store = ImageStore(tmp_path / "basestore")
    export_archive(store, base.digest, "oci-archive", tmp_path / "base-oci.tar")
    export_archive(store, base.digest, "docker-archive", tmp_path / "base-docker.tar")
    app_ctx = write_tree(tmp_path / "app", {"main.py": "m", "etc/conf": "app"})
    results = []
    for ref in (
        "oci:basestore:v1",
        "oci:basestore",
        "oci-archive:base-oci.tar",
        "docker-archive:base-docker.tar",
    ):
        section = recipe(base=ref, env={"FROM": "app"}, entrypoint=["python3"])
        results.append(run_bake(tmp_path / "appstore", app_ctx, section))
        image = ImageStore(tmp_path / "appstore").image(results[-1].digest)
        assert image.layers[0].digest == store.image(base.digest).layers[0].digest
        assert image.config["config"]["Env"] == ["PATH=/bin", "FROM=app"]
        assert "Cmd" not in image.config["config"]  # a new entrypoint resets the base's cmd
        assert image.annotations[oci.ANN_BASE_DIGEST] == base.digest
        files = file_manifest(ImageStore(tmp_path / "appstore"), results[-1].digest)
        assert files["/bin/tool"].size == 4 and files["/app/main.py"].size == 1
    assert len({r.config_digest for r in results}) == 1


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("ubuntu", "is not scratch"),
        ("oci:missing", "not an OCI image layout"),
        ("oci-archive:missing.tar", "does not exist"),
        ("ftp:x", "unknown kind 'ftp'"),
    ],
)
def test_bad_bases(tmp_path: Path, base: str, message: str) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    with pytest.raises(ImageError, match=message):
        run_bake(tmp_path / "store", ctx, recipe(base=base))


def test_docker_base_without_an_engine_is_explained(tmp_path: Path) -> None:
    ctx = write_tree(tmp_path / "ctx", APP_FILES)
    with pytest.raises(ImageError, match="needs a running Docker engine"):
        run_bake(tmp_path / "store", ctx, recipe(base="docker:busybox"))


def test_file_manifest_merge_applies_whiteouts() -> None:
    from castiron.images.manifest import FileEntry, merge

    lower = [
        FileEntry("/etc", "dir", 0o755),
        FileEntry("/etc/a", "file", 0o644, 1, "a"),
        FileEntry("/etc/b", "file", 0o644, 1, "b"),
        FileEntry("/var", "dir", 0o755),
        FileEntry("/var/x", "file", 0o644, 1, "x"),
        FileEntry("/opt", "dir", 0o755),
        FileEntry("/opt/old", "file", 0o644, 1, "o"),
    ]
    upper = [
        FileEntry("/etc/.wh.a", "file", 0o644),
        FileEntry("/var/.wh..wh..opq", "file", 0o644),
        FileEntry("/var/y", "file", 0o644, 1, "y"),
        FileEntry("/opt", "symlink", 0o777, target="/usr"),
    ]
    tree = merge([lower, upper])
    assert sorted(tree) == ["/etc", "/etc/b", "/opt", "/var", "/var/y"]
    assert tree["/opt"].type == "symlink"
