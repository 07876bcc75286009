"""``castiron quickstart``: the whole tour on the bundled example app, in under a minute.

Copies ``castiron/examples/hello`` into a working directory, bakes v1, deploys it to the local
``staging`` environment and fetches it, bakes v2 (a different file and ``APP_VERSION``),
deploys it with zero downtime while a small client load counts failed requests, rolls back,
and says what happened and what to try next. It needs nothing but the Python package: no
Docker, no root (instances run sandboxed when bubblewrap works, else as plain processes).
It can run again and again in the same directory, inside a git work tree or outside one (the
default tags are derived from the images, see :mod:`castiron.images.build`); its state goes
to the one state home every command uses (``--home``, ``$CASTIRON_HOME``, else
``DIR/.castiron``), and the commands it suggests work as printed.

The composition lives here, at the edge; the engine and the image library are imported
inside the command so CLI start-up stays fast.
"""

from __future__ import annotations

import http.client
import shlex
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.errors import CastironError, UsageError
from castiron.ports import free_port
from castiron.settings import Settings

DEFAULT_PORT = 8080
PORT_ENV = "CASTIRON_QUICKSTART_PORT"


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


def _listen_port(spec: Path) -> int | None:
    """The staging router's port in an existing quickstart spec."""
    in_staging = False
    for line in spec.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("staging:"):
            in_staging = True
        elif in_staging and stripped.startswith("listen:"):
            port = stripped.rpartition(":")[2]
            return int(port) if port.isdigit() else None
    return None


def choose_port(given: int | None, environ: dict[str, str], spec: Path, fresh: bool) -> int:
    """The staging router's port: ``--port``, else ``$CASTIRON_QUICKSTART_PORT``, else the
    port of a previous quickstart in the same directory, else 8080 when it is free, else a
    free port.

    Raises:
        UsageError: when ``$CASTIRON_QUICKSTART_PORT`` is not a port number.
    """
    if given is not None:
        return given
    env = environ.get(PORT_ENV, "")
    if env:
        if not env.isdigit() or not 1 <= int(env) <= 65535:
            raise UsageError(f"{PORT_ENV}={env!r} is not a port number (1-65535)")
        return int(env)
    previous = None if fresh else _listen_port(spec)
    if previous is not None:
        return previous
    return DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()


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
    help=(
        f"Port for the staging router (default: ${PORT_ENV}, else the previous run's port, "
        f"else {DEFAULT_PORT}, or a free one if it is taken)."
    ),
)
@pass_cli
@click.pass_context
def quickstart_cmd(ctx: click.Context, cli: CliContext, directory: Path, port: int | None) -> None:
    """Bake, deploy, update with zero downtime and roll back the bundled example app."""
    from castiron.compose import open_engine
    from castiron.engine.rollback import rollback
    from castiron.images.build import BakeOptions, bake, default_skips
    from castiron.images.store import ImageStore
    from castiron.spec.load import load_spec

    out = _Printer()
    began = time.monotonic()
    target_dir = directory.absolute()
    fresh = _copy_example(target_dir)
    spec_path = target_dir / "castiron.yaml"
    port = choose_port(port, dict(cli.settings.environ), spec_path, fresh)
    _set_listen(spec_path, port)
    out.say(
        f"1. {'copied' if fresh else 'reusing'} the example app in {target_dir}"
        " (castiron.yaml + app/server.py, standard library only)"
    )
    # One state home: --home or $CASTIRON_HOME when given, else .castiron/ beside the spec
    # (where every other command run in the quickstart directory looks).
    home_flag = ctx.find_root().params.get("home")
    explicit_home = home_flag is not None or bool(cli.settings.environ.get("CASTIRON_HOME"))
    home = cli.settings.home if explicit_home else target_dir / ".castiron"
    base: Settings = replace(cli.settings, home=home, spec_path=spec_path)

    def settings_for(version: str) -> Settings:
        return replace(base, environ={**base.environ, "APP_VERSION": version})

    def bake_version(version: str) -> str:
        (target_dir / "app" / "VERSION").write_text(version + "\n", encoding="utf-8")
        settings = settings_for(version)
        loaded = load_spec(spec_path, settings.environ)
        context = (loaded.base_dir / loaded.spec.image.context).resolve()
        result = bake(
            loaded.spec.image,
            ImageStore(settings.images_path),
            BakeOptions(
                context=context,
                base_dir=loaded.base_dir,
                source_date_epoch=0,
                environ=settings.environ,
                app=loaded.spec.app,
                port=loaded.spec.service.port,
                spec_digest=loaded.digest,
                skip=default_skips(context, spec_path, settings.home),
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
    out.say(f"2. bake v1 (reproducible OCI image in {base.images_path})")
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
        back = rollback(engine.context, "staging")
    out.say(f"   rolled back to {back.release} in {back.duration_s * 1000:.0f} ms")
    out.say(f"   $ curl {url}\n   {fetch(port)[1]}")
    took = time.monotonic() - began
    out.say("")
    out.say(f"Done in {took:.1f}s: two releases, zero failed requests, one instant rollback.")
    out.say(f"staging keeps serving {url} — try next:")
    out.say(f"  cd {target_dir}")
    program = invoked_as(sys.argv[0], shutil.which("castiron"))
    prefix = f"{program} --home {shlex.quote(str(home))}" if home_flag is not None else program
    for command, what in try_next(prefix):
        out.say(f"  {command:<38}  {what}")
    if load.failed:
        raise CastironError(f"{load.failed} request(s) failed during the deployment")


def invoked_as(argv0: str, on_path: str | None) -> str:
    """How to type this castiron again: ``castiron`` when that name on ``PATH`` is the script
    that is running, else the running script's absolute path (``.venv/bin/castiron`` of a
    virtualenv that is not activated). Run as ``python -m``, the name stays ``castiron``."""
    if Path(argv0).name != "castiron":
        return "castiron"
    running = Path(argv0).absolute()
    if on_path is not None and Path(on_path).absolute() == running:
        return "castiron"
    return shlex.quote(str(running))


def try_next(prefix: str = "castiron") -> list[tuple[str, str]]:
    """The commands quickstart suggests, in order (the last two tear everything down)."""
    return [
        (f"{prefix} status", "what runs, health, router counters"),
        (f"{prefix} history staging", "every deployment, who, when, outcome"),
        (f"{prefix} releases staging", "known-good and warm releases"),
        (f"{prefix} rollback staging", "flip back to v2"),
        (f"{prefix} audit verify", "the tamper-evident audit chain"),
        (f"{prefix} down staging --yes", "route removed, instances destroyed"),
        (f"{prefix} agent stop", "nothing of castiron left running"),
    ]


commands: list[click.Command] = [quickstart_cmd]
