"""``castiron push`` and ``castiron pull``: thin edges over :mod:`castiron.images.registry`.

They resolve IMAGE in the store, parse REF, build transfer options from flags and the captured
environment (credentials are found by the library from the same captured environment), draw
per-layer progress on a terminal's stderr, and render the result.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.cli.render import emit_json
from castiron.images import oci
from castiron.images.registry import options_from, parse_reference, pull, push
from castiron.images.registry.transfer import BlobOutcome, TransferObserver, TransferOptions
from castiron.images.store import ImageStore
from castiron.model import Digest


class _RichProgress:
    """Per-blob progress (bytes, rate) drawn with rich on stderr."""

    def __init__(self, progress: Any) -> None:
        self._progress = progress
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def start(self, digest: Digest, size: int, what: str) -> None:
        with self._lock:
            self._tasks[digest] = self._progress.add_task(f"{what} {oci.short(digest)}", total=size)

    def advance(self, digest: Digest, n: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.advance(task, n)

    def finish(self, digest: Digest, outcome: BlobOutcome) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.update(task, description=f"{outcome} {oci.short(digest)}")


@contextlib.contextmanager
def transfer_progress(console: Any) -> Iterator[TransferObserver]:
    """Per-blob progress bars (bytes, rate) drawn on ``console`` (a rich console)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield _RichProgress(progress)


@contextlib.contextmanager
def _observer(cli: CliContext, as_json: bool) -> Iterator[TransferObserver | None]:
    if as_json or not sys.stderr.isatty():  # rich is imported only for a terminal
        yield None
        return
    with transfer_progress(cli.err_console) as observer:
        yield observer


def _options(cli: CliContext, insecure: bool, ca_file: Path | None, host: str) -> TransferOptions:
    return options_from(cli.settings.environ, insecure=[host] if insecure else [], ca_file=ca_file)


def _transport_flags(f: Any) -> Any:
    f = click.option(
        "--ca-file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        default=None,
        help="Trust this CA bundle for the registry (on top of the system CAs).",
    )(f)
    return click.option(
        "--insecure",
        is_flag=True,
        help="Allow plain HTTP or an unverified certificate for this registry.",
    )(f)


@click.command("push")
@click.argument("image")
@click.argument("ref")
@_transport_flags
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def push_cmd(
    cli: CliContext, image: str, ref: str, insecure: bool, ca_file: Path | None, as_json: bool
) -> None:
    """Push IMAGE (tag or digest in the store) to REF (host[:port]/repo[:tag]), with its
    signatures (cosign's .sig tag) and provenance (.att tag, OCI referrers)."""
    reference = parse_reference(ref)
    store = ImageStore(cli.settings.images_path)
    digest = store.resolve(image)
    options = _options(cli, insecure, ca_file, reference.registry)
    with _observer(cli, as_json) as observer:
        result = push(
            store,
            digest,
            reference,
            environ=cli.settings.environ,
            options=options,
            observer=observer,
        )
    if as_json:
        emit_json(
            {
                "reference": result.reference,
                "digest": result.digest,
                "tag": reference.tag,
                "bytes_sent": result.bytes_sent,
                "layers_skipped": result.skipped,
                "blobs": [
                    {"digest": b.digest, "size": b.size, "outcome": b.outcome} for b in result.blobs
                ],
                "referrers": list(result.referrers),
                "cosign_tags": list(result.cosign_tags),
                "requests": result.requests,
            }
        )
        return
    counts = {o: sum(1 for b in result.blobs if b.outcome == o) for o in ("uploaded", "mounted")}
    click.echo(f"pushed {result.reference}")
    if reference.tag:
        click.echo(f"  tag: {reference.name}:{reference.tag}")
    click.echo(
        f"  blobs: {counts['uploaded']} uploaded ({result.bytes_sent} bytes), "
        f"{counts['mounted']} mounted, {result.skipped} already there"
    )
    if result.referrers:
        click.echo(f"  signatures and provenance: {len(result.referrers)} artifact(s)")
    for tag in result.cosign_tags:
        click.echo(f"  cosign: {reference.name}:{tag}")


@click.command("pull")
@click.argument("ref")
@click.option(
    "--tag", metavar="TAG", default=None, help="Bind this tag to the pulled image in the store."
)
@click.option(
    "--verify",
    "verify_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="KEY",
    help="Keep the image only if a signature by this public key verifies (repeatable).",
)
@_transport_flags
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_cli
def pull_cmd(
    cli: CliContext,
    ref: str,
    tag: str | None,
    verify_keys: tuple[Path, ...],
    insecure: bool,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Pull REF (host[:port]/repo[:tag] or repo@sha256:…) into the store, with its signatures
    and provenance; every blob is checked against its digest and nothing is kept on failure."""
    reference = parse_reference(ref)
    store = ImageStore(cli.settings.images_path)
    options = _options(cli, insecure, ca_file, reference.registry)
    with _observer(cli, as_json) as observer:
        result = pull(
            store,
            reference,
            environ=cli.settings.environ,
            options=options,
            observer=observer,
            tag=tag,
            verify_keys=list(verify_keys),
        )
    if as_json:
        emit_json(
            {
                "reference": result.reference,
                "digest": result.digest,
                "config_digest": result.config_digest,
                "index_digest": result.index_digest,
                "tag": result.tag,
                "bytes_received": result.bytes_received,
                "layers_skipped": sum(1 for b in result.blobs if b.outcome == "present"),
                "referrers": list(result.referrers),
                "verified_by": result.verified_by,
            }
        )
        return
    click.echo(f"pulled {result.reference}")
    if result.tag:
        click.echo(f"  tag: {result.tag}")
    fetched = sum(1 for b in result.blobs if b.outcome == "downloaded")
    click.echo(
        f"  blobs: {fetched} downloaded ({result.bytes_received} bytes), "
        f"{len(result.blobs) - fetched} already in the store"
    )
    if result.referrers:
        click.echo(f"  signatures and provenance: {len(result.referrers)} artifact(s)")
    if result.verified_by:
        click.echo(f"  verified by {result.verified_by}")


commands: list[click.Command] = [push_cmd, pull_cmd]
