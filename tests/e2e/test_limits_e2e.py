"""Declared limits through the real CLI and agent: an instance deployed with ``memory: 64m``
runs in its own control group with that limit, and when it allocates past it the kernel kills
it (the host is untouched), the agent records why and replaces it. Where this host cannot
enforce limits, the deploy says so instead."""

from __future__ import annotations

import http.client
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from castiron.agent import cgroups

from .conftest import APP, Project, wait_for

pytestmark = pytest.mark.slow

HOG_ROUTE = textwrap.dedent(
    """
    _get = Handler.do_GET

    def do_GET(self):
        if self.path == "/hog":
            chunks = []
            for i in range(100):
                chunks.append(bytearray(10 * 1024 * 1024))
                print(f"allocated {10 * (i + 1)} MiB", flush=True)
        _get(self)

    Handler.do_GET = do_GET
    """
)


def records(project: Project) -> list[dict[str, object]]:
    data = json.loads((project.home / "agent" / "instances.json").read_text())
    return list(data["instances"])


def test_memory_limit_is_enforced_and_an_instance_past_it_is_contained(
    make_project: Callable[..., Project],
) -> None:
    project = make_project(replicas=1)
    app = APP.replace("server = ThreadingHTTPServer", HOG_ROUTE + "\nserver = ThreadingHTTPServer")
    (project.root / "app" / "app.py").write_text(app)
    spec = project.root / "castiron.yaml"
    spec.write_text(spec.read_text().replace("  replicas: 1\n", "  replicas: 1\n  memory: 64m\n"))
    host = cgroups.probe(cgroups.find_host())
    project.bake("v1")
    proc = project.run("deploy", "staging", "--image", "v1", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if host.problem is not None:
        assert f"the limits declared (memory 64m) are not enforced: {host.problem}" in proc.stderr
        return
    assert "not enforced" not in proc.stderr
    (first,) = records(project)
    assert first["limits"] == f"memory 64 MiB (cgroup {host.version})"
    groups = [Path(str(g)) for g in first["cgroups"]]  # type: ignore[union-attr]
    own = Path(f"/proc/{first['pid']}/cgroup").read_text()
    assert f"/castiron.{first['id']}" in own
    limit_file = "memory.max" if host.version == "v2" else "memory.limit_in_bytes"
    assert (groups[0] / limit_file).read_text().strip() == str(64 << 20)

    conn = http.client.HTTPConnection("127.0.0.1", project.port, timeout=30)
    try:
        conn.request("GET", "/hog")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        conn.close()
    assert status != 200  # it never got to answer

    def exited() -> dict[str, object] | None:
        return next(
            (r for r in records(project) if r["id"] == first["id"] and r["state"] == "exited"), None
        )

    wait_for(lambda: exited() is not None, what="the instance to be killed")
    gone = exited()
    assert gone is not None and gone["exit_code"] == -9
    log = Path(str(gone["log_path"])).read_text()
    assert "allocated 60 MiB" not in log
    events = project.home / "agent" / "events.jsonl"
    wait_for(
        lambda: "out of memory: killed at its limit (memory 64 MiB" in events.read_text(),
        timeout=10,
        what="the agent's event saying why",
    )
    wait_for(lambda: project.served() == "v1", what="the replacement to serve")
