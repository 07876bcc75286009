"""Helpers for the runtime driver tests: the test image, a running agent, a local driver.

The image is built with castiron's own image library from a scratch base: its context holds a
small standard-library HTTP server (``server.py``) that the host's python3 runs on ``$PORT``.
Every process a test starts (agent, fd keeper, instances) is stopped or killed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from castiron.agent.client import AgentClient
from castiron.agent.lifecycle import ensure_agent, stop_agent
from castiron.agent.supervisor import kill_session, process_start_time
from castiron.drivers.local import LocalDriver, SandboxPolicy, find_bwrap, probe_bwrap
from castiron.images.build import BakeOptions, bake
from castiron.images.rootfs import unpack_release
from castiron.images.store import ImageStore
from castiron.model import ImageRef
from castiron.settings import Settings, load_settings
from castiron.spec.schema import ImageSection

SERVER = textwrap.dedent(
    """
    import json, os, signal, sys, tempfile, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    def probe_write(path):
        try:
            with open(path, "w") as fh:
                fh.write("x")
            return "ok"
        except OSError as exc:
            return type(exc).__name__

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/env":
                body = dict(os.environ)
            elif self.path == "/fs":
                marker = os.path.join(tempfile.gettempdir(), "marker-" + os.environ["PORT"])
                body = {
                    "cwd": os.getcwd(),
                    "tmpdir": tempfile.gettempdir(),
                    "write_app": probe_write(os.path.join(os.getcwd(), "new-file")),
                    "write_server": probe_write(os.path.abspath(__file__)),
                    "write_tmp": probe_write(marker),
                    "tmp": sorted(os.listdir(tempfile.gettempdir())),
                    "pid": os.getpid(),
                }
            else:
                body = {"greeting": os.environ.get("GREETING", ""), "path": self.path}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            print("request", fmt % args, flush=True)

    address = (os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"]))
    server = ThreadingHTTPServer(address, Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("listening on", os.environ["PORT"], flush=True)
    server.serve_forever(poll_interval=0.1)
    print("stopped", flush=True)
    """
)

HOST_PATH = os.environ.get("PATH", os.defpath)


@dataclass(frozen=True)
class LocalImage:
    """The baked test image and the command that runs it."""

    ref: ImageRef
    command: tuple[str, ...] = ("python3", "server.py")


def bake_test_image(root: Path) -> LocalImage:
    """Bake the scratch-based test image into its own OCI layout under ``root``."""
    context = root / "app"
    context.mkdir()
    (context / "server.py").write_text(SERVER)
    section = ImageSection.model_validate(
        {"base": "scratch", "workdir": "/app", "entrypoint": ["python3", "server.py"]}
    )
    store = ImageStore(root / "images")
    result = bake(
        section,
        store,
        BakeOptions(
            context=context,
            base_dir=root,
            source_date_epoch=1_700_000_000,
            environ={"PATH": HOST_PATH},
        ),
    )
    return LocalImage(ImageRef(result.digest, result.config_digest, store.root))


def unpack(image: ImageRef, rootfs: Path) -> None:
    """The unpacker the engine hands the local driver."""
    unpack_release(image.store, image.digest, rootfs)


def bwrap_problem() -> str | None:
    """Why the sandbox cannot be used here (None when it can)."""
    bwrap = find_bwrap(HOST_PATH)
    if bwrap is None:
        return "bubblewrap is not installed"
    return probe_bwrap(bwrap)


def reap(settings: Settings) -> None:
    """Stop the agent of ``settings.home`` and kill whatever instances it left."""
    with contextlib.suppress(Exception):
        stop_agent(settings, timeout=20.0)
    records_path = settings.agent_path / "instances.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        for record in json.loads(records_path.read_text())["instances"]:
            if process_start_time(record["pid"]) == record["start_time"]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(record["pid"], signal.SIGKILL)
                kill_session(record["pid"])


@contextlib.contextmanager
def running_agent(home: Path) -> Iterator[tuple[Settings, AgentClient]]:
    """An agent for ``home``, reaped on exit."""
    settings = load_settings({}, home=home)
    try:
        yield settings, ensure_agent(settings)
    finally:
        reap(settings)


def make_driver(settings: Settings, agent: AgentClient, **options: object) -> LocalDriver:
    """A local driver on ``settings.home`` with the host's bubblewrap (if any)."""
    return LocalDriver(
        agent=agent,
        releases_dir=settings.releases_path,
        unpack=unpack,
        sandbox=SandboxPolicy(find_bwrap(HOST_PATH)),
        **options,  # type: ignore[arg-type]
    )


def get_json(address: str, path: str = "/", timeout: float = 5.0) -> dict[str, object]:
    """GET ``path`` from ``address`` and decode its JSON answer."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as response:
        return dict(json.loads(response.read()))


def serving(address: str) -> bool:
    """True when the test server answers on ``address``."""
    try:
        get_json(address, timeout=2.0)
    except OSError:
        return False
    return True
