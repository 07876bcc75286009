"""Baking: turn the spec's ``image:`` section and a context directory into an image in the store.

Owns the bake pipeline: resolve the base (``scratch``, ``oci:DIR[:TAG]``, ``oci-archive:FILE``,
``docker-archive:FILE``, ``docker:REF``), run ``build`` commands in a clean temporary copy of
the context, scan the result, refuse secret-looking files, split files into layers by the
``layers`` globs, write (or reuse from the cache) each layer, and write the config, the file
manifest, the image manifest, the tags and the provenance. The result depends only on the
inputs (``SOURCE_DATE_EPOCH`` defaults to the commit time of the context's git HEAD, else 0).

Takes model values (:class:`castiron.spec.schema.ImageSection` is duck-typed through
:class:`ImageRecipe`), not files; never reads ``os.environ`` (callers pass ``environ``), and
knows no runtime. Docker-backed bases and Dockerfile builds come in through the
:data:`ArchiveFetcher` callables, so this module never imports a Docker SDK.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from castiron.errors import CastironError, ImageError
from castiron.images import manifest as files_manifest
from castiron.images import oci, provenance
from castiron.images.archive import import_archive, import_layout
from castiron.images.cache import CACHE_VERSION, BuildCache, layer_key
from castiron.images.context import SourceFile, scan, secret_files, walk
from castiron.images.layer import LayerBlob, LayerEntry, compressor_id, with_parents, write_layer
from castiron.images.pattern import PatternSet
from castiron.images.registry.reference import looks_like_reference
from castiron.images.store import ImageStore, check_tag, reachable_blobs, write_atomic
from castiron.model import Digest

_OUTPUT_LINES = 20


class ImageRecipe(Protocol):
    """The fields of the spec's ``image:`` section a bake reads."""

    @property
    def base(self) -> str: ...
    @property
    def context(self) -> str: ...
    @property
    def workdir(self) -> str: ...
    @property
    def exclude(self) -> tuple[str, ...]: ...
    @property
    def build(self) -> tuple[str, ...]: ...
    @property
    def layers(self) -> tuple[str, ...]: ...
    @property
    def entrypoint(self) -> tuple[str, ...]: ...
    @property
    def cmd(self) -> tuple[str, ...]: ...
    @property
    def env(self) -> dict[str, str]: ...
    @property
    def user(self) -> str | None: ...
    @property
    def labels(self) -> dict[str, str]: ...
    @property
    def dockerfile(self) -> str | None: ...
    @property
    def allow_secrets(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Recipe:
    """An ``image:`` section as plain data (see :func:`recipe_json`): what a cached deploy
    spec carries so ``deploy`` can find the image baked from it without validating again."""

    base: str
    context: str
    workdir: str
    exclude: tuple[str, ...]
    build: tuple[str, ...]
    layers: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: dict[str, str]
    user: str | None
    labels: dict[str, str]
    dockerfile: str | None
    allow_secrets: tuple[str, ...]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recipe:
        """Rebuild :func:`recipe_json` output.

        Raises:
            KeyError, TypeError, ValueError: when ``data`` is not such an object.
        """
        seqs = ("exclude", "build", "layers", "entrypoint", "cmd", "allow_secrets")
        fields = {name: data[name] for name in cls.__dataclass_fields__}
        for name in seqs:
            fields[name] = tuple(str(item) for item in fields[name])
        for name in ("env", "labels"):
            fields[name] = {str(k): str(v) for k, v in dict(fields[name]).items()}
        return cls(**fields)


ArchiveFetcher = Callable[[str, Path], Path]
"""Writes an image archive (docker-archive or OCI) into the given directory and returns its
path: for ``docker:REF`` bases it is called with REF; for Dockerfile builds with the path of
the Dockerfile. Provided by :mod:`castiron.images.dockerbuild` at the CLI edge."""


class BakeObserver(Protocol):
    """Receives progress messages (the CLI shows them on a terminal)."""

    def step(self, message: str) -> None: ...


class _Silent:
    def step(self, message: str) -> None:
        pass


@dataclass(frozen=True)
class BakeOptions:
    """Inputs of a bake besides the recipe."""

    context: Path
    """The context directory (already resolved against the spec's directory)."""
    base_dir: Path
    """The spec's directory: relative ``oci:``/archive bases resolve against it."""
    tags: tuple[str, ...] = ()
    source_date_epoch: int | None = None
    environ: Mapping[str, str] = field(default_factory=dict)
    """Environment for ``git`` and ``build`` commands (captured at the edge)."""
    app: str | None = None
    port: int | None = None
    spec_digest: str | None = None
    skip: tuple[Path, ...] = ()
    """Directories and files never part of the context (see :func:`default_skips`)."""
    workers: int = 2
    fetch_docker_base: ArchiveFetcher | None = None
    build_dockerfile: ArchiveFetcher | None = None


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a baked image."""

    name: str
    digest: Digest
    diff_id: Digest
    size: int
    entries: int
    reused: bool


@dataclass(frozen=True)
class BakeResult:
    """What a bake produced."""

    digest: Digest
    config_digest: Digest
    tags: tuple[str, ...]
    layers: tuple[LayerInfo, ...]
    source_date_epoch: int
    revision: str | None
    dirty: bool
    provenance: Digest | None
    files_hashed: int

    @property
    def layers_built(self) -> int:
        """Layers compressed by this bake."""
        return sum(1 for layer in self.layers if not layer.reused)

    @property
    def layers_reused(self) -> int:
        """Layers taken from the cache or the base image."""
        return sum(1 for layer in self.layers if layer.reused)


@dataclass(frozen=True)
class GitInfo:
    """What git says about the context."""

    commit: str
    short: str
    commit_time: int
    dirty: bool
    remote: str | None


def _git(args: list[str], cwd: Path, env: Mapping[str, str]) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(cwd), *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_info(
    context: Path,
    environ: Mapping[str, str],
    skip: tuple[Path, ...] = (),
    exclude: PatternSet | None = None,
) -> GitInfo | None:
    """Commit, commit time, clean flag and remote of the repository holding ``context``.

    The context is clean only when every file that goes into the image (``context`` minus
    ``exclude`` and ``skip``) is tracked by git and unmodified against HEAD, and no tracked
    file of it was deleted: an untracked or ignored file makes it dirty.

    Returns ``None`` when git is missing or ``context`` is not in a work tree.
    """
    env = {k: v for k, v in environ.items() if not k.startswith("GIT_")}
    env.setdefault("PATH", os.defpath)
    commit = _git(["rev-parse", "HEAD"], context, env)
    if not commit:
        return None
    short_sha = _git(["rev-parse", "--short", "HEAD"], context, env) or commit[:7]
    when = _git(["log", "-1", "--format=%ct", "HEAD"], context, env)
    remote = _git(["config", "--get", "remote.origin.url"], context, env)
    if remote:
        remote = re.sub(r"^(\w+://)[^/@]*@", r"\1", remote)
    return GitInfo(
        commit=commit,
        short=short_sha,
        commit_time=int(when) if when and when.isdigit() else 0,
        dirty=not _git_clean(context, env, skip, exclude or PatternSet.of(())),
        remote=remote or None,
    )


def _git_clean(
    context: Path, env: Mapping[str, str], skip: tuple[Path, ...], exclude: PatternSet
) -> bool:
    try:
        entries = walk(context, exclude, skip=skip)
    except ImageError:
        return False  # bake reports what it cannot read; a tag just says "not clean"
    files = {w.rel for w in entries if not stat.S_ISDIR(w.st.st_mode)}
    tracked = _git(["ls-files", "-z", "--", "."], context, env)
    changed = _git(
        ["diff", "--name-only", "--no-renames", "-z", "--relative", "HEAD", "--", "."],
        context,
        env,
    )
    if tracked is None or changed is None:
        return False
    if not files <= set(tracked.split("\0")):
        return False
    for rel in filter(None, changed.split("\0")):
        if rel in files:
            return False
        gone = not os.path.lexists(context / rel)
        if gone and not exclude.excluded(rel, False):
            return False
    return True


def default_skips(context: Path, spec_path: Path, home: Path) -> tuple[Path, ...]:
    """What is never part of a context by default: castiron's state directory (``home``, and
    a ``.castiron/`` beside the spec or in the context), the spec file itself and a
    ``castiron-quickstart/`` directory. Editing the spec (a port, a replica count) therefore
    never changes the image digest."""
    base = spec_path.parent
    return (
        home,
        spec_path,
        base / ".castiron",
        context / ".castiron",
        base / "castiron-quickstart",
        context / "castiron-quickstart",
    )


@dataclass(frozen=True)
class _Base:
    ref: str
    digest: Digest | None
    config: dict[str, Any]
    layers: tuple[oci.Descriptor, ...]
    diff_ids: tuple[Digest, ...]


_BASE_KINDS = frozenset({"oci", "oci-archive", "docker-archive", "docker"})


def _registry_base(ref: str, store: ImageStore, options: BakeOptions) -> _Base:
    """A base named by a registry reference: pulled (verified) into the store, and pinned by
    the digest it resolved to, which is what provenance records."""
    from castiron.images.registry import options_from, parse_reference, pull

    reference = parse_reference(ref)
    pulled = pull(store, reference, environ=options.environ, options=options_from(options.environ))
    return _base_of(store, f"{reference.name}@{pulled.digest}", pulled.digest)


def _base_of(store: ImageStore, ref: str, digest: Digest) -> _Base:
    image = store.image(digest)
    diff_ids = oci.config_diff_ids(image.config, f"base {ref}")
    if len(diff_ids) != len(image.layers):
        raise ImageError(
            f"image.base: {ref!r} has {len(image.layers)} layers but {len(diff_ids)} diff_ids"
        )
    return _Base(ref, digest, image.config, image.layers, tuple(diff_ids))


def _resolve_base(ref: str, store: ImageStore, options: BakeOptions, tmp: Path) -> _Base:
    if ref == "scratch":
        return _Base(ref, None, {}, (), ())
    kind, sep, rest = ref.partition(":")
    if kind not in _BASE_KINDS and looks_like_reference(ref):
        return _registry_base(ref, store, options)
    if not sep or not rest:
        raise ImageError(
            f"image.base: {ref!r} is not scratch, oci:DIR[:TAG], oci-archive:FILE, "
            "docker-archive:FILE or docker:REF"
        )
    if kind == "oci":
        path_s, tag = rest, None
        head, colon, tail = rest.rpartition(":")
        if colon and head and "/" not in tail:
            path_s, tag = head, tail
        path = (options.base_dir / path_s).resolve()
        digest = import_layout(store, path, tag).digest
    elif kind in ("oci-archive", "docker-archive"):
        path = (options.base_dir / rest).resolve()
        if not path.is_file():
            raise ImageError(f"image.base: {path} does not exist")
        digest = import_archive(store, path, register=False)[0].digest
    elif kind == "docker":
        if options.fetch_docker_base is None:
            raise ImageError(f"image.base: {ref!r} needs a running Docker engine")
        archive = options.fetch_docker_base(rest, tmp)
        digest = import_archive(store, archive, register=False)[0].digest
    else:
        raise ImageError(
            f"image.base: unknown kind {kind!r}; use scratch, oci:, oci-archive:, "
            "docker-archive: or docker:"
        )
    return _base_of(store, ref, digest)


def _copy_context(src: Path, dst: Path, exclude: PatternSet, skip: tuple[Path, ...]) -> None:
    dst.mkdir(parents=True)
    for w in walk(src, exclude, skip=skip):
        target = dst / w.rel
        if stat.S_ISDIR(w.st.st_mode):
            target.mkdir()
        elif stat.S_ISLNK(w.st.st_mode):
            os.symlink(os.readlink(w.path), target)
        else:
            shutil.copyfile(w.path, target, follow_symlinks=False)
            os.chmod(target, stat.S_IMODE(w.st.st_mode) | stat.S_IRUSR | stat.S_IWUSR)


def _run_build(
    commands: tuple[str, ...], cwd: Path, env: dict[str, str], observer: BakeObserver
) -> None:
    for i, command in enumerate(commands):
        observer.step(f"build[{i}]: {command}")
        try:
            proc = subprocess.run(
                ["sh", "-c", command],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                check=False,
            )
        except OSError as exc:
            raise ImageError(f"image.build[{i}]: cannot run {command!r}: {exc.strerror}") from None
        if proc.returncode != 0:
            lines = proc.stdout.decode("utf-8", "replace").rstrip().splitlines()[-_OUTPUT_LINES:]
            status = (
                f"killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exit status {proc.returncode}"
            )
            tail = "\n".join(lines) if lines else "(no output)"
            raise ImageError(
                f"image.build[{i}]: {command!r} failed with {status}; last output:\n{tail}"
            )


def _image_path(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _split(
    files: tuple[SourceFile, ...], patterns: PatternSet, prefix: str
) -> list[tuple[str, list[LayerEntry]]]:
    groups: list[list[SourceFile]] = [[] for _ in range(len(patterns.patterns) + 1)]
    for f in files:
        idx = patterns.first_covering(f.rel) if patterns else None
        groups[len(patterns.patterns) if idx is None else idx].append(f)
    out: list[tuple[str, list[LayerEntry]]] = []
    for i, group in enumerate(groups):
        is_app = i == len(groups) - 1
        if not group and not is_app:
            continue
        in_group = {f.rel for f in group}
        entries: list[LayerEntry] = []
        for f in group:
            kind = f.kind
            target = f.target
            if kind == "hardlink":
                if f.target in in_group:
                    target = _image_path(prefix, f.target or "")
                else:
                    kind, target = "file", None
            entries.append(
                LayerEntry(
                    path=_image_path(prefix, f.rel),
                    kind=kind,
                    mode=f.mode,
                    size=f.size if kind in ("file", "hardlink") else 0,
                    sha256=f.sha256 if kind in ("file", "hardlink") else None,
                    target=target,
                    source=f.source,
                )
            )
        if is_app and prefix:
            entries.append(LayerEntry(prefix, "dir", 0o755))
        name = "app" if is_app else f"layers[{i}] {patterns.patterns[i].text}"
        out.append((name, with_parents(entries)))
    return out


def _tar_entries(entries: list[LayerEntry]) -> list[LayerEntry]:
    # A hard link's bytes are a header only; its size stays 0 in the tar.
    return [
        LayerEntry(e.path, e.kind, e.mode, 0, None, e.target, None) if e.kind == "hardlink" else e
        for e in entries
    ]


def _merge_env(base: list[str], extra: Mapping[str, str]) -> list[str]:
    order: list[str] = []
    values: dict[str, str] = {}
    for item in base:
        key, _, value = item.partition("=")
        if key not in values:
            order.append(key)
        values[key] = value
    for key, value in extra.items():
        if key not in values:
            order.append(key)
        values[key] = value
    return [f"{k}={values[k]}" for k in order]


def _config(
    recipe: ImageRecipe,
    base: _Base,
    diff_ids: list[Digest],
    layer_names: list[str],
    epoch: int,
    port: int | None,
) -> dict[str, Any]:
    base_cfg = base.config.get("config")
    cfg: dict[str, Any] = dict(base_cfg) if isinstance(base_cfg, dict) else {}
    env = _merge_env([e for e in cfg.get("Env") or [] if isinstance(e, str)], recipe.env)
    if env:
        cfg["Env"] = env
    if recipe.entrypoint:
        cfg["Entrypoint"] = list(recipe.entrypoint)
        cfg.pop("Cmd", None)
    if recipe.cmd:
        cfg["Cmd"] = list(recipe.cmd)
    cfg["WorkingDir"] = recipe.workdir
    if recipe.user:
        cfg["User"] = recipe.user
    labels = {**(cfg.get("Labels") or {}), **recipe.labels}
    if labels:
        cfg["Labels"] = labels
    if port is not None:
        cfg["ExposedPorts"] = {**(cfg.get("ExposedPorts") or {}), f"{port}/tcp": {}}
    created = oci.rfc3339(epoch)
    history = [h for h in base.config.get("history") or [] if isinstance(h, dict)]
    history += [
        {"created": created, "created_by": f"castiron bake: {name}"} for name in layer_names
    ]
    host = oci.host_platform()
    config: dict[str, Any] = {
        "architecture": base.config.get("architecture") or host["architecture"],
        "os": base.config.get("os") or host["os"],
        "created": created,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [*base.diff_ids, *diff_ids]},
        "history": history,
    }
    if base.config.get("variant"):
        config["variant"] = base.config["variant"]
    return config


def _secret_error(found: list[str]) -> ImageError:
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    return ImageError(
        f"image.context: refusing to bake files that look like secrets: {shown} "
        "(exclude them, or list them in image.allow_secrets if they are safe)"
    )


def _layer_files(
    store: ImageStore, cache_dir: Path, layer: oci.Descriptor
) -> list[files_manifest.FileEntry]:
    cached = cache_dir / "files" / f"{layer.digest.split(':', 1)[1]}.json"
    try:
        return list(files_manifest.decode(cached.read_bytes(), str(cached)).values())
    except (OSError, ImageError):
        pass
    entries = files_manifest.layer_file_entries(store, layer)
    write_atomic(cached, files_manifest.encode({e.path: e for e in entries}))
    return entries


def bake(
    recipe: ImageRecipe,
    store: ImageStore,
    options: BakeOptions,
    *,
    observer: BakeObserver | None = None,
) -> BakeResult:
    """Build the image described by ``recipe`` into ``store`` and tag it.

    Raises:
        ImageError: for a bad base, a failing build command (naming it, its exit status and
            its last output lines), secret-looking files, unreadable or special files, or a
            bad pattern.
        TagConflictError: when a tag is already bound to another image.
        UsageError: for a malformed tag.
    """
    obs = observer or _Silent()
    for t in options.tags:
        check_tag(t)
    if recipe.dockerfile:
        return _bake_dockerfile(recipe, store, options, obs)
    exclude = PatternSet.of(recipe.exclude, "image.exclude")
    PatternSet.of(recipe.layers, "image.layers")  # report bad layer globs before any work
    allow = PatternSet.of(recipe.allow_secrets, "image.allow_secrets")
    context = options.context
    if not context.is_dir():
        raise ImageError(f"image.context: {context} is not a directory")
    git = git_info(context, options.environ, options.skip, exclude)
    epoch = options.source_date_epoch
    if epoch is None:
        epoch = git.commit_time if git else 0
    if epoch < 0:
        raise ImageError(f"SOURCE_DATE_EPOCH must not be negative (got {epoch})")
    store.ensure()
    cache = BuildCache(store)
    with (
        store.using(),
        ThreadPoolExecutor(max(1, options.workers), thread_name_prefix="castiron-bake") as pool,
        tempfile.TemporaryDirectory(prefix="castiron-bake-") as tmp_s,
    ):
        tmp = Path(tmp_s)
        prior_stats: dict[str, list[int | str]] = {}
        obs.step(f"base {recipe.base}")
        base = _resolve_base(recipe.base, store, options, tmp)
        if recipe.build:
            root = tmp / "context"
            obs.step("copying the context")
            _copy_context(context, root, exclude, options.skip)
            env = {**options.environ, "SOURCE_DATE_EPOCH": str(epoch)}
            env.setdefault("PATH", os.defpath)
            _run_build(recipe.build, root, env, obs)
            scanned = scan(root, exclude, pool=pool)
        else:
            obs.step("scanning the context")
            prior_stats = cache.stat_entries(context)
            scanned = scan(
                context,
                exclude,
                skip=options.skip,
                stat_cache=prior_stats,
                pool=pool,
            )
        found = secret_files(scanned.files, allow)
        if found:
            raise _secret_error(found)
        key = _bake_key(recipe, options, base, git, epoch, scanned.files)
        cached = cache.assembly(key)
        assembly = _Assembly.from_json(cached) if cached is not None else None
        if assembly is None or not _complete(store, assembly):
            assembly = _assemble(
                recipe, store, options, cache, base, scanned.files, git, epoch, pool, obs
            )
            cache.save_assembly(key, assembly.to_json())
        image, layers, input_digests = assembly.image, list(assembly.layers), assembly.input_digests
        config_digest = assembly.config_digest
        tags = options.tags or (_default_tag(git, image.digest),)
        store.tag(image, tags, {})
        record = provenance.BuildRecord(
            app=options.app,
            spec_digest=options.spec_digest,
            image_section=_recipe_json(recipe),
            build_commands=tuple(recipe.build),
            source_date_epoch=epoch,
            base=base.ref,
            base_digest=base.digest,
            context_digests=input_digests,
            revision=git.commit if git else None,
            source=git.remote if git else None,
            dirty=bool(git and git.dirty),
        )
        sources = scanned.files
        if recipe.build:
            sources = scan(context, exclude, skip=options.skip, pool=pool).files
        cache.save_baked(source_key(recipe, options, git, sources), image.digest)
        name = f"{options.app}:{tags[0]}" if options.app else tags[0]
        prov = provenance.attach(store, image, provenance.statement(image.digest, name, record))
        if not recipe.build and scanned.stats != prior_stats:
            cache.save_stat_entries(context, scanned.stats)
    base_infos = [
        LayerInfo(f"base {i}", d.digest, diff, d.size, 0, True)
        for i, (d, diff) in enumerate(zip(base.layers, base.diff_ids, strict=True))
    ]
    return BakeResult(
        digest=image.digest,
        config_digest=config_digest,
        tags=tuple(tags),
        layers=(*base_infos, *layers),
        source_date_epoch=epoch,
        revision=git.commit if git else None,
        dirty=bool(git and git.dirty),
        provenance=prov,
        files_hashed=scanned.hashed,
    )


@dataclass(frozen=True)
class _Assembly:
    image: oci.Descriptor
    config_digest: Digest
    layers: tuple[LayerInfo, ...]
    input_digests: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image.to_json(),
            "config_digest": self.config_digest,
            "layers": [[li.name, li.digest, li.diff_id, li.size, li.entries] for li in self.layers],
            "inputs": self.input_digests,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> _Assembly:
        return cls(
            image=oci.Descriptor.from_json(obj["image"], "bake cache"),
            config_digest=Digest(str(obj["config_digest"])),
            layers=tuple(
                LayerInfo(str(n), Digest(d), Digest(i), int(z), int(e), True)
                for n, d, i, z, e in obj["layers"]
            ),
            input_digests={str(k): str(v) for k, v in obj["inputs"].items()},
        )


def _assemble(
    recipe: ImageRecipe,
    store: ImageStore,
    options: BakeOptions,
    cache: BuildCache,
    base: _Base,
    files: tuple[SourceFile, ...],
    git: GitInfo | None,
    epoch: int,
    pool: ThreadPoolExecutor,
    obs: BakeObserver,
) -> _Assembly:
    layer_patterns = PatternSet.of(recipe.layers, "image.layers")
    prefix = recipe.workdir.strip("/")
    layers: list[LayerInfo] = []
    blobs: list[LayerBlob] = []
    own_files: list[list[LayerEntry]] = []
    input_digests: dict[str, str] = {}
    for name, entries in _split(files, layer_patterns, prefix):
        key = layer_key(entries, epoch)
        input_digests[name] = key
        blob = cache.layer(key)
        reused = blob is not None
        if blob is None:
            obs.step(f"layer {name}: compressing {len(entries)} entries")
            blob = write_layer(store, _tar_entries(entries), epoch, pool)
            cache.save_layer(key, blob)
        blobs.append(blob)
        own_files.append(entries)
        layers.append(
            LayerInfo(
                name,
                blob.descriptor.digest,
                blob.diff_id,
                blob.descriptor.size,
                len(entries),
                reused,
            )
        )
    obs.step("writing the manifest")
    base_files = [_layer_files(store, store.cache_dir, layer) for layer in base.layers]
    tree = files_manifest.merge(
        [*base_files, *(files_manifest.from_layer_entries(e) for e in own_files)]
    )
    files_blob = files_manifest.encode(tree)
    files_digest = store.put_bytes(files_blob)
    config = _config(
        recipe,
        base,
        [b.diff_id for b in blobs],
        [li.name for li in layers],
        epoch,
        options.port,
    )
    config_bytes = oci.canonical_json(config)
    config_desc = oci.Descriptor(oci.CONFIG, store.put_bytes(config_bytes), len(config_bytes))
    annotations = {
        oci.ANN_CREATED: oci.rfc3339(epoch),
        oci.ANN_FILES: files_digest,
        oci.ANN_COMPRESSOR: compressor_id(),
    }
    if git:
        annotations[oci.ANN_REVISION] = git.commit
        if git.remote:
            annotations[oci.ANN_SOURCE] = git.remote
    if options.app:
        annotations[oci.ANN_TITLE] = options.app
    if base.digest:
        annotations[oci.ANN_BASE_DIGEST] = base.digest
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in base.layers] + [b.descriptor.to_json() for b in blobs],
        "annotations": annotations,
    }
    manifest_bytes = oci.canonical_json(manifest)
    image = oci.Descriptor(oci.MANIFEST, store.put_bytes(manifest_bytes), len(manifest_bytes))
    return _Assembly(image, config_desc.digest, tuple(layers), input_digests)


def _bake_key(
    recipe: ImageRecipe,
    options: BakeOptions,
    base: _Base,
    git: GitInfo | None,
    epoch: int,
    files: tuple[SourceFile, ...],
) -> str:
    doc = {
        "v": CACHE_VERSION,
        "recipe": _recipe_json(recipe),
        "base": base.digest,
        "epoch": epoch,
        "app": options.app,
        "port": options.port,
        "git": [git.commit, git.remote] if git else None,
        "compressor": compressor_id(),
        "files": [[f.rel, f.kind, f.mode, f.size, f.sha256, f.target] for f in files],
    }
    return hashlib.sha256(oci.canonical_json(doc)).hexdigest()


def source_key(
    recipe: ImageRecipe,
    options: BakeOptions,
    git: GitInfo | None,
    files: tuple[SourceFile, ...],
) -> str:
    """What a bake is made from, as one hash: the image section of the spec, the app's name
    and port, the git commit and the context's files (before any ``build`` command). It names
    "the current spec and context" so a deploy can find the image baked from them."""
    doc = {
        "v": CACHE_VERSION,
        "recipe": _recipe_json(recipe),
        "app": options.app,
        "port": options.port,
        "git": [git.commit, git.remote] if git else None,
        "files": [[f.rel, f.kind, f.mode, f.size, f.sha256, f.target] for f in files],
    }
    return hashlib.sha256(oci.canonical_json(doc)).hexdigest()


def baked_image(recipe: ImageRecipe, store: ImageStore, options: BakeOptions) -> Digest | None:
    """The image last baked from the current recipe and context (``None`` when the current
    sources were never baked, or their image left the store). Reads files, never builds.

    Raises:
        ImageError: for an unreadable context or a bad pattern.
    """
    context = options.context
    if not context.is_dir():
        raise ImageError(f"image.context: {context} is not a directory")
    exclude = PatternSet.of(() if recipe.dockerfile else recipe.exclude, "image.exclude")
    git = git_info(context, options.environ, options.skip, exclude)
    cache = BuildCache(store)
    stats = cache.stat_entries(context) if not (recipe.build or recipe.dockerfile) else None
    files = scan(context, exclude, skip=options.skip, stat_cache=stats).files
    digest = cache.baked(source_key(recipe, options, git, files))
    if digest is None or not store.has_blob(digest):
        return None
    return digest


def _complete(store: ImageStore, assembly: _Assembly) -> bool:
    try:
        needed = reachable_blobs(store, assembly.image.digest)
    except CastironError:
        return False
    return store.has_blob(assembly.image.digest, assembly.image.size) and all(
        store.has_blob(d) for d in needed
    )


def _default_tag(git: GitInfo | None, image: Digest) -> str:
    """The git short sha when the context is clean; otherwise a name derived from the image
    manifest's digest, so two different images never get the same default tag (and baking
    the same image again binds the same tag, which is not an error)."""
    if git is None:
        return "sha-" + oci.short(image)
    if git.dirty:
        return f"{git.short}-dirty-{oci.short(image)}"
    return git.short


def recipe_json(recipe: ImageRecipe) -> dict[str, Any]:
    """``recipe`` as plain JSON (the form bake keys and provenance record)."""
    return _recipe_json(recipe)


def _recipe_json(recipe: ImageRecipe) -> dict[str, Any]:
    return {
        "base": recipe.base,
        "context": recipe.context,
        "workdir": recipe.workdir,
        "exclude": list(recipe.exclude),
        "build": list(recipe.build),
        "layers": list(recipe.layers),
        "entrypoint": list(recipe.entrypoint),
        "cmd": list(recipe.cmd),
        "env": dict(recipe.env),
        "user": recipe.user,
        "labels": dict(recipe.labels),
        "dockerfile": recipe.dockerfile,
        "allow_secrets": list(recipe.allow_secrets),
    }


def _bake_dockerfile(
    recipe: ImageRecipe, store: ImageStore, options: BakeOptions, obs: BakeObserver
) -> BakeResult:
    if options.build_dockerfile is None:
        raise ImageError("image.dockerfile: building a Dockerfile needs a running Docker engine")
    dockerfile = (options.context / (recipe.dockerfile or "Dockerfile")).resolve()
    with tempfile.TemporaryDirectory(prefix="castiron-bake-") as tmp:
        obs.step(f"docker build {dockerfile}")
        archive = options.build_dockerfile(str(dockerfile), Path(tmp))
        imported = import_archive(store, archive, register=False)[0]
        image = store.image(imported.digest)
        git = git_info(options.context, options.environ, options.skip)
        tags = options.tags or (_default_tag(git, imported.digest),)
        store.tag(image.descriptor(), tags, {})
        sources = scan(options.context, PatternSet.of(()), skip=options.skip).files
        BuildCache(store).save_baked(source_key(recipe, options, git, sources), imported.digest)
    return BakeResult(
        digest=imported.digest,
        config_digest=imported.config_digest,
        tags=tuple(tags),
        layers=tuple(
            LayerInfo(f"layer {i}", d.digest, Digest(""), d.size, 0, True)
            for i, d in enumerate(image.layers)
        ),
        source_date_epoch=options.source_date_epoch or 0,
        revision=git.commit if git else None,
        dirty=bool(git and git.dirty),
        provenance=None,
        files_hashed=0,
    )


__all__ = [
    "ArchiveFetcher",
    "BakeObserver",
    "BakeOptions",
    "BakeResult",
    "GitInfo",
    "ImageRecipe",
    "LayerInfo",
    "Recipe",
    "bake",
    "baked_image",
    "default_skips",
    "git_info",
    "recipe_json",
    "source_key",
]
