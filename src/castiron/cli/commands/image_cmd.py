"""``castiron bake``, ``images``, ``images prune``, ``inspect``, ``export`` and ``import``.

Thin edges over :mod:`castiron.images`: they read the spec and settings, call the library and
render the result. Docker-backed inputs (``docker:REF`` bases, Dockerfile builds) are wired
here from :mod:`castiron.images.dockerbuild`, imported only when such an input is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.errors import UsageError
from castiron.images import oci, provenance
from castiron.images.archive import ArchiveFormat, export_archive, import_archive
from castiron.images.build import BakeOptions, bake, default_skips
from castiron.images.store import ImageStore, prune
from castiron.model import Digest
from castiron.spec.load import load_spec


def _store(cli: CliContext) -> ImageStore:
    return ImageStore(cli.settings.images_path)


def _docker_engine(cli: CliContext) -> Any:
    from castiron.images.dockerbuild import DEFAULT_DOCKER_HOST, DockerEngine

    return DockerEngine(base_url=cli.settings.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class _Progress:
    """Shows bake steps on a terminal's stderr; silent otherwise."""

    def __init__(self, cli: CliContext, enabled: bool) -> None:
        self._console = cli.err_console
        self._enabled = enabled and cli.err_console.is_terminal
        self._status: Any = None

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if not self._enabled:
            yield self
            return
        with self._console.status("baking…") as status:
            self._status = status
            yield self

    def step(self, message: str) -> None:
        if self._status is not None:
            self._status.update(message)


def _epoch(cli: CliContext, given: int | None) -> int | None:
    if given is not None:
        if given < 0:
            raise UsageError("--source-date-epoch must not be negative")
        return given
    env = cli.settings.environ.get("SOURCE_DATE_EPOCH")
    if env is None or env == "":
        return None
    if not env.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={env!r} is not a whole number of seconds")
    return int(env)


@click.command("bake")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help=(
        "Tag to bind (repeatable; default: the git short sha when every file of the context "
        "is committed, else <sha>-dirty-<digest> or sha-<digest>)."
    ),
)
@click.option(
    "--source-date-epoch",
    type=int,
    default=None,
    metavar="N",
    help=(
        "Timestamp for every file and the config (default: $SOURCE_DATE_EPOCH, "
        "else the commit time of the context's git HEAD, else 0)."
    ),
)
@click.option(
    "--sign",
    "sign_key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="KEY",
    help="Sign the image and its provenance with this private key (see `castiron sign`).",
)
@click.option(
    "--passphrase-env",
    metavar="VAR",
    default=None,
    help="Read the --sign key's passphrase from this environment variable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def bake_cmd(
    cli: CliContext,
    tags: tuple[str, ...],
    source_date_epoch: int | None,
    sign_key: Path | None,
    passphrase_env: str | None,
    as_json: bool,
) -> None:
    """Build the spec's image reproducibly into the image store."""
    from castiron.cli.commands.sign_cmd import bake_signer, sign_baked

    signer = bake_signer(cli, sign_key, passphrase_env)  # a bad key fails before any work
    settings = cli.settings
    loaded = load_spec(settings.spec_path, settings.environ)
    section = loaded.spec.image
    context = (loaded.base_dir / section.context).resolve()

    def fetch_base(ref: str, tmp: Path) -> Path:
        from castiron.images.dockerbuild import save_image

        return save_image(ref, tmp / "base.tar", engine=_docker_engine(cli)).path

    def build_dockerfile(dockerfile: str, tmp: Path) -> Path:
        from castiron.images.dockerbuild import build_dockerfile as docker_build

        return docker_build(
            context,
            Path(dockerfile),
            tmp / "image.tar",
            tag_hint=f"castiron/{loaded.spec.app}:build",
            engine=_docker_engine(cli),
        ).path

    options = BakeOptions(
        context=context,
        base_dir=loaded.base_dir,
        tags=tags,
        source_date_epoch=_epoch(cli, source_date_epoch),
        environ=settings.environ,
        app=loaded.spec.app,
        port=loaded.spec.service.port,
        spec_digest=loaded.digest,
        skip=default_skips(context, settings.spec_path, settings.home),
        fetch_docker_base=fetch_base,
        build_dockerfile=build_dockerfile,
    )
    progress = _Progress(cli, enabled=not as_json)
    with progress.running():
        result = bake(section, _store(cli), options, observer=progress)
    signed = None
    if signer is not None:
        signed = sign_baked(_store(cli), result.digest, result.tags[0], signer)
    if as_json:
        emit_json(
            {
                "digest": result.digest,
                "config_digest": result.config_digest,
                "tags": list(result.tags),
                "layers": [
                    {"name": li.name, "digest": li.digest, "size": li.size, "reused": li.reused}
                    for li in result.layers
                ],
                "source_date_epoch": result.source_date_epoch,
                "revision": result.revision,
                "dirty": result.dirty,
                "signature": signed.signature if signed else None,
            }
        )
        return
    built, reused = result.layers_built, result.layers_reused
    click.echo(f"baked {result.digest}")
    click.echo(f"  tags: {', '.join(result.tags)}")
    click.echo(f"  config: {result.config_digest}")
    click.echo(f"  layers: {len(result.layers)} ({built} built, {reused} reused)")
    if signed:
        click.echo(f"  signed: {signed.signature} (key {signed.keyid})")


@click.group("images", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def images_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the images in the store with their tags and sizes."""
    if ctx.invoked_subcommand is not None:
        return
    cli = ctx.find_object(CliContext)
    assert cli is not None
    items = _store(cli).images()
    if as_json:
        emit_json(
            {
                "images": [
                    {
                        "digest": i.digest,
                        "config_digest": i.config_digest,
                        "tags": list(i.tags),
                        "created": i.created,
                        "size": i.size,
                        "layers": i.layers,
                    }
                    for i in items
                ]
            }
        )
        return
    if not items:
        click.echo("no images (run `castiron bake`)")
        return
    rows = [("TAG", "DIGEST", "CREATED", "SIZE", "LAYERS")]
    for i in items:
        for t in i.tags:
            rows.append((t, oci.short(i.digest), i.created or "-", _human(i.size), str(i.layers)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _retained_digests(cli: CliContext) -> set[Digest]:
    """Digests of every release in the state store.

    Any recorded release can become a rollback or promotion target, so its image stays.
    """
    if not cli.settings.state_present():
        return set()
    from castiron.state.store import open_state

    with open_state(cli.settings) as state:
        return {
            release.digest
            for environment in state.list_environments()
            for release in state.list_releases(environment.name)
        }


@images_cmd.command("prune")
@click.option("--yes", is_flag=True, help="Really remove (default: only show what would go).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def prune_cmd(cli: CliContext, yes: bool, as_json: bool) -> None:
    """Remove blobs no tagged image and no recorded release needs (a dry run unless --yes)."""
    report = prune(_store(cli), keep=_retained_digests(cli), dry_run=not yes)
    if as_json:
        emit_json(
            {
                "dry_run": report.dry_run,
                "removed_blobs": list(report.removed_blobs),
                "removed_bytes": report.removed_bytes,
                "kept_images": list(report.kept_images),
                "dropped_entries": list(report.dropped_entries),
            }
        )
        return
    verb = "would remove" if report.dry_run else "removed"
    click.echo(
        f"{verb} {len(report.removed_blobs)} blob(s), {_human(report.removed_bytes)}; "
        f"kept {len(report.kept_images)} image(s)"
    )
    if report.dry_run and report.removed_blobs:
        click.echo("run `castiron images prune --yes` to remove them")


@click.command("inspect")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def inspect_cmd(cli: CliContext, ref: str, as_json: bool) -> None:
    """Show an image's manifest, config, layers, annotations and provenance.

    REF is a tag, a sha256: digest, or a unique digest prefix of at least 12 hex digits.
    """
    store = _store(cli)
    digest = store.resolve(ref)
    image = store.image(digest)
    tags = sorted(t for t, d in store.tags().items() if d == digest)
    statements = provenance.read(store, digest)
    if as_json:
        emit_json(
            {
                "digest": digest,
                "config_digest": image.config_digest,
                "tags": tags,
                "manifest": image.manifest,
                "config": image.config,
                "layers": [
                    {"digest": layer.digest, "media_type": layer.media_type, "size": layer.size}
                    for layer in image.layers
                ],
                "annotations": image.annotations,
                "provenance": statements,
            }
        )
        return
    cfg = image.config.get("config") or {}
    click.echo(f"image   {digest}")
    click.echo(f"config  {image.config_digest}")
    click.echo(f"tags    {', '.join(tags) or '-'}")
    click.echo(f"created {image.config.get('created', '-')}")
    click.echo(f"platform {image.config.get('os', '?')}/{image.config.get('architecture', '?')}")
    for key in ("Entrypoint", "Cmd", "WorkingDir", "User", "Env", "ExposedPorts"):
        if cfg.get(key):
            click.echo(f"{key.lower():8} {cfg[key]}")
    click.echo(f"layers  {len(image.layers)} ({_human(sum(x.size for x in image.layers))})")
    for layer in image.layers:
        click.echo(f"  {layer.digest}  {_human(layer.size)}")
    for key, value in sorted(image.annotations.items()):
        click.echo(f"  {key}: {value}")
    click.echo(f"provenance {len(statements)} statement(s)")


@click.command("export")
@click.argument("ref")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["oci-archive", "docker-archive", "kubernetes"]),
    default="oci-archive",
    show_default=True,
    help="Archive format (docker-archive loads with `docker load`), or kubernetes: REF is "
    "an environment and its release's manifests are written.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File to write (required for archives; manifests go to stdout without it).",
)
@click.option(
    "--image",
    "image",
    metavar="REF",
    help="With --format kubernetes: the image of the release (default: the newest baked).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def export_cmd(
    cli: CliContext, ref: str, fmt: str, output: Path | None, image: str | None, as_json: bool
) -> None:
    """Write an image to an archive file (with its tags and provenance), or the Kubernetes
    manifests of an environment's release (``--format kubernetes``)."""
    if fmt == "kubernetes":
        _export_manifests(cli, ref, image, output, as_json)
        return
    if image is not None:
        raise UsageError("--image is only for --format kubernetes")
    if output is None:
        raise UsageError(f"--format {fmt} needs -o FILE")
    store = _store(cli)
    digest = store.resolve(ref)
    archive_fmt: ArchiveFormat = "docker-archive" if fmt == "docker-archive" else "oci-archive"
    result = export_archive(store, digest, archive_fmt, output)
    if as_json:
        emit_json(
            {
                "digest": result.digest,
                "config_digest": result.config_digest,
                "format": result.format,
                "path": str(result.path),
                "size": result.size,
                "repo_tags": list(result.repo_tags),
            }
        )
        return
    click.echo(f"wrote {result.path} ({result.format}, {_human(result.size)}) for {result.digest}")


def _export_manifests(
    cli: CliContext, environment: str, image: str | None, output: Path | None, as_json: bool
) -> None:
    from castiron.compose import open_engine, resolved_spec
    from castiron.engine.kubeexport import kubernetes_manifests

    settings = cli.settings
    with open_engine(settings, start_agent=False) as engine:
        release, text = kubernetes_manifests(engine, resolved_spec(settings), environment, image)
    if output is not None:
        _write_atomically(output, text.encode())
    if as_json:
        emit_json(
            {
                "environment": environment,
                "release": release.id,
                "digest": release.digest,
                "path": str(output) if output is not None else None,
                "manifests": None if output is not None else text,
            }
        )
    elif output is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {output} (release {release.id} of {environment})")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (temp file, fsync, rename)."""
    import os
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent or Path("."), prefix=f".{path.name}.")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


@click.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Tag to bind instead of the archive's own tags (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def import_cmd(cli: CliContext, file: Path, tags: tuple[str, ...], as_json: bool) -> None:
    """Bring an oci-archive or docker-archive into the store, verifying every blob."""
    imported = import_archive(_store(cli), file, tags=tags)
    if as_json:
        emit_json(
            {
                "images": [
                    {"digest": i.digest, "config_digest": i.config_digest, "tags": list(i.tags)}
                    for i in imported
                ]
            }
        )
        return
    for i in imported:
        click.echo(f"imported {i.digest} as {', '.join(i.tags)}")


commands: list[click.Command] = [bake_cmd, images_cmd, inspect_cmd, export_cmd, import_cmd]
