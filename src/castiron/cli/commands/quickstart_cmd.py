"""``castiron quickstart``: the whole tour on the bundled example app, in under a minute.

Copies ``castiron/examples/hello`` into a working directory, bakes v1, deploys it to the local
``staging`` environment and fetches it, bakes v2 (a different file and ``APP_VERSION``),
deploys it with zero downtime while a small client load counts failed requests, rolls back,
and says what happened and what to try next. It needs nothing but the Python package: no
Docker, no root (instances run sandboxed when bubblewrap works, else as plain processes).

The composition lives here, at the edge; the engine and the image library are imported
inside the command so CLI start-up stays fast.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.errors import CastironError, UsageError
from castiron.settings import Settings

DEFAULT_PORT = 8080


@dataclass
class _Load:
    """A small, bounded client load through the router, counting failed requests."""

    port: int
    max_requests: int = 5000
    max_seconds: float = 60.0
    ok: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        sent = 0
        while not self._stop.is_set() and sent < self.max_requests and time.monotonic() < deadline:
            sent += 1
            try:
                status, _ = fetch(self.port)
            except OSError:
                self.failed += 1
            else:
                if status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            time.sleep(0.01)

    def __enter__(self) -> _Load:
        self._thread = threading.Thread(target=self._run, name="quickstart-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def fetch(port: int, timeout: float = 5.0) -> tuple[int, str]:
    """GET / from 127.0.0.1:``port``: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace").strip()
    finally:
        conn.close()


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _copy_example(target: Path) -> bool:
    """Copy the example into ``target``; False when a previous quickstart is already there.

    Raises:
        UsageError: when ``target`` exists and holds something else.
    """
    if (target / "castiron.yaml").is_file():
        return False
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty; choose another --dir")
    source = resources.files("castiron") / "examples" / "hello"
    with resources.as_file(source) as path:
        shutil.copytree(
            path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    return True


def _set_listen(spec: Path, port: int) -> None:
    text = spec.read_text(encoding="utf-8")
    lines = []
    in_staging = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("staging:"):
            in_staging = True
        elif in_staging and stripped.startswith("listen:"):
            indent = line[: len(line) - len(line.lstrip())]
            line = f"{indent}listen: 127.0.0.1:{port}\n"
            in_staging = False
        lines.append(line)
    spec.write_text("".join(lines), encoding="utf-8")


class _Printer:
    """The tour's narration (stdout) and the engine's live progress (indented)."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def say(self, message: str = "") -> None:
        click.echo(message)

    def step(self, step: str, data: object) -> None:
        pass

    def progress(self, message: str) -> None:
        click.echo(f"    [{time.monotonic() - self.started:5.1f}s] {message}")


@click.command("quickstart")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("castiron-quickstart"),
    show_default=True,
    help="Working directory for the example app and its state.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help=f"Port for the staging router (default {DEFAULT_PORT}, or a free one if it is taken).",
)
@pass_cli
def quickstart_cmd(cli: CliContext, directory: Path, port: int | None) -> None:
    """Bake, deploy, update with zero downtime and roll back the bundled example app."""
    from castiron.engine.compose import open_engine
    from castiron.engine.rollback import rollback
    from castiron.images.build import BakeOptions, bake
    from castiron.images.store import ImageStore
    from castiron.spec.load import load_spec

    out = _Printer()
    began = time.monotonic()
    target_dir = directory.absolute()
    fresh = _copy_example(target_dir)
    spec_path = target_dir / "castiron.yaml"
    if port is None:
        port = DEFAULT_PORT if _port_free(DEFAULT_PORT) or not fresh else _free_port()
    _set_listen(spec_path, port)
    out.say(
        f"1. {'copied' if fresh else 'reusing'} the example app in {target_dir}"
        " (castiron.yaml + app/server.py, standard library only)"
    )
    base: Settings = replace(cli.settings, home=target_dir / ".castiron", spec_path=spec_path)

    def settings_for(version: str) -> Settings:
        return replace(base, environ={**base.environ, "APP_VERSION": version})

    def bake_version(version: str) -> str:
        (target_dir / "app" / "VERSION").write_text(version + "\n", encoding="utf-8")
        settings = settings_for(version)
        loaded = load_spec(spec_path, settings.environ)
        result = bake(
            loaded.spec.image,
            ImageStore(settings.images_path),
            BakeOptions(
                context=(loaded.base_dir / loaded.spec.image.context).resolve(),
                base_dir=loaded.base_dir,
                source_date_epoch=0,
                environ=settings.environ,
                app=loaded.spec.app,
                port=loaded.spec.service.port,
                spec_digest=loaded.digest,
                skip=(settings.home,),
            ),
        )
        out.say(f"   baked {result.digest[:19]}… tagged {', '.join(result.tags)}")
        return result.digest

    def deploy_version(version: str, digest: str) -> str:
        settings = settings_for(version)
        loaded = load_spec(spec_path, settings.environ)
        with open_engine(settings, observer=out) as engine:
            target = engine.resolve(loaded, "staging", digest)
            result = engine.deploy(target)
        out.say(f"   release {result.release} is live ({result.outcome}, {result.duration_s:.2f}s)")
        return result.release

    url = f"http://127.0.0.1:{port}/"
    out.say("2. bake v1 (reproducible OCI image in .castiron/images)")
    v1 = bake_version("1")
    out.say("3. deploy v1 to staging")
    deploy_version("1", v1)
    out.say(f"   $ curl {url}\n   {fetch(port)[1]}")
    out.say("4. bake v2 (a changed file and APP_VERSION=2)")
    v2 = bake_version("2")
    out.say("5. deploy v2 with zero downtime, under a small client load")
    with _Load(port) as load:
        while load.ok < 5 and time.monotonic() - began < 50:
            time.sleep(0.02)
        deploy_version("2", v2)
        ok_before = load.ok
        while load.ok < ok_before + 5 and time.monotonic() - began < 55:
            time.sleep(0.02)
    out.say(f"   load: {load.ok} requests answered, {load.failed} failed")
    out.say(f"   $ curl {url}\n   {fetch(port)[1]}")
    out.say("6. roll back (v1 is still warm: a pointer flip of the router)")
    with open_engine(settings_for("1"), observer=out) as engine:
        back = rollback(engine, "staging")
    out.say(f"   rolled back to {back.release} in {back.duration_s * 1000:.0f} ms")
    out.say(f"   $ curl {url}\n   {fetch(port)[1]}")
    took = time.monotonic() - began
    out.say("")
    out.say(f"Done in {took:.1f}s: two releases, zero failed requests, one instant rollback.")
    out.say(f"staging keeps serving {url} — try next (in {target_dir}):")
    out.say("  castiron status                 what runs, health, router counters")
    out.say("  castiron history staging        every deployment, who, when, outcome")
    out.say("  castiron releases staging       known-good and warm releases")
    out.say("  castiron rollback staging       flip back to v2")
    out.say("  castiron audit verify           the tamper-evident audit chain")
    out.say("  castiron down staging --yes     stop everything")
    if load.failed:
        raise CastironError(f"{load.failed} request(s) failed during the deployment")


commands: list[click.Command] = [quickstart_cmd]
