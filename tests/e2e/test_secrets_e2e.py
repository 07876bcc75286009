"""A secret value never lands anywhere castiron keeps, and castiron's files stay private.

An app prints its ``DB_PASSWORD`` on stdout and stderr (in pieces, too) and once more when its
health check refuses; after a failing and a succeeding deploy the whole home — database, WAL,
audit head, instance logs, agent log and events, release cache — is searched for the value's
bytes, and so are the audit export, the logs command, history and every command's output.
The CLI runs with umask 0: every state file is still 0600 in 0700 directories.
"""

from __future__ import annotations

import os
import stat
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Project

pytestmark = pytest.mark.slow

SECRET = "hunter2-db-Pa55"

APP = textwrap.dedent(
    """
    import os, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    password = os.environ["DB_PASSWORD"]
    print("connecting with password", password, flush=True)
    sys.stdout.write("split: " + password[:5])
    sys.stdout.flush()
    sys.stdout.write(password[5:] + "\\n")
    sys.stdout.flush()
    print("stderr:", password, file=sys.stderr, flush=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if os.environ.get("HEALTHY", "1") == "0":
                print("refusing health with", password, flush=True)
                self.send_response(503)
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, fmt, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    server.serve_forever(poll_interval=0.1)
    """
)

SPEC = """
app: secrets
image:
  context: ./app
  entrypoint: ["python3", "app.py"]
service:
  port: 8000
  replicas: 1
  health: {{http: /healthz, interval: 200ms, timeout: 2s, start_period: 30s}}
  env:
    HEALTHY: ${{HEALTHY:-1}}
  secrets:
    DB_PASSWORD: {{env: E2E_DB_PASSWORD}}
environments:
  staging:
    listen: 127.0.0.1:{port}
    deploy_timeout: 3s
    drain_timeout: 1s
    keep_warm: 10m
    isolation: none
"""


def run(project: Project, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        project.argv(*args),
        cwd=project.root,
        env={**project.env, **extra},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        umask=0,
    )


def files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            if needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


def test_a_secret_value_is_never_stored_and_state_files_are_private(
    make_project: Callable[..., Project],
) -> None:
    project = make_project()
    (project.root / "app" / "app.py").write_text(APP)
    (project.root / "castiron.yaml").write_text(SPEC.format(port=project.port))
    outputs: list[str] = []

    def ok(*args: str, **extra: str) -> str:
        proc = run(project, *args, **extra)
        outputs.extend([proc.stdout, proc.stderr])
        assert proc.returncode == 0, f"castiron {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    ok("bake", "--tag", "v1")
    failed = run(project, "deploy", "staging", "--yes", E2E_DB_PASSWORD=SECRET, HEALTHY="0")
    outputs.extend([failed.stdout, failed.stderr])
    assert failed.returncode == 1, failed.stderr
    # The failure shows the instance's own output, with the value masked.
    assert "refusing health with ***" in failed.stderr
    ok("deploy", "staging", "--yes", E2E_DB_PASSWORD=SECRET)
    logs = ok("logs", "staging")
    assert "connecting with password ***" in logs
    assert "split: ***" in logs
    assert "stderr: ***" in logs
    ok("history", "staging", "--json")
    ok("status", "staging", "--json")
    ok("audit", "verify")
    export = project.root / "audit.jsonl"
    ok("audit", "export", "-o", str(export))
    ok("drift", "staging", E2E_DB_PASSWORD=SECRET)

    needle = SECRET.encode()
    assert files_holding(project.home, needle) == []
    assert needle not in export.read_bytes()
    for text in outputs:
        assert SECRET not in text

    # umask 0 all along, yet the state is private.
    home = project.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for name in ("state.db", "audit.key", "audit.head"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600, name
    wide = [
        f"{p.relative_to(home)} {stat.S_IMODE(p.lstat().st_mode):o}"
        for p in home.rglob("*")
        if p.parts[len(home.parts)] != "releases"
        and not p.is_symlink()
        and stat.S_IMODE(p.lstat().st_mode) & 0o077
    ]
    assert wide == [], "\n".join(wide)
    for sub in home.iterdir():
        if sub.is_dir():
            assert stat.S_IMODE(sub.stat().st_mode) == 0o700, sub.name
    logs_dir = home / "agent" / "logs"
    assert stat.S_IMODE(logs_dir.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in logs_dir.iterdir()} == {0o600}
