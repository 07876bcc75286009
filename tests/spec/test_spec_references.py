"""``castiron validate`` checks what the spec points at — the context, a Dockerfile, a base
layout or archive, secret files — and locates each problem like any other spec error; and
``castiron init`` finds the app, its entrypoint and free ports."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from castiron.images.build import BakeOptions, bake, default_skips
from castiron.images.store import ImageStore
from castiron.spec.load import load_spec

POINTING = """\
app: shop
image:
  context: ./src
  base: oci-archive:base.tar
  dockerfile: Dockerfile
service:
  secrets:
    DB_PASSWORD: {file: secrets/db.txt}
    API_TOKEN: {file: secrets}
    FROM_ENV: {env: SHOP_TOKEN}
    LATER: {file: "${SECRETS_DIR}/x"}
environments:
  staging: {listen: 127.0.0.1:18080}
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    project = tmp_path / "shop"
    project.mkdir()
    monkeypatch.chdir(project)
    monkeypatch.delenv("CASTIRON_SPEC", raising=False)
    return project


def test_every_missing_or_unreadable_reference_is_located(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "castiron.yaml").write_text(POINTING)
    (workdir / "secrets").mkdir()
    result = run_cli("validate")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = [line.removeprefix("error: ").strip() for line in result.stderr.splitlines()]
    assert lines == [
        f"castiron.yaml:3:12: image.context: ./src: no such directory ({workdir}/src)",
        f"castiron.yaml:4:9: image.base: base.tar: no such file ({workdir}/base.tar)",
        f"castiron.yaml:8:25: service.secrets.DB_PASSWORD.file: secrets/db.txt: no such file "
        f"({workdir}/secrets/db.txt)",
        f"castiron.yaml:9:23: service.secrets.API_TOKEN.file: secrets: is a directory, not a "
        f"file ({workdir}/secrets)",
    ]
    body = json.loads(run_cli("validate", "--json").stdout)
    assert body["ok"] is False
    assert body["errors"][0] == {
        "file": "castiron.yaml",
        "line": 3,
        "column": 12,
        "path": "image.context",
        "message": f"./src: no such directory ({workdir}/src)",
    }


def test_a_dockerfile_and_an_oci_layout_are_checked_once_the_context_exists(
    run_cli, workdir: Path
) -> None:  # type: ignore[no-untyped-def]
    (workdir / "src").mkdir()
    (workdir / "layout").mkdir()
    text = POINTING.replace("oci-archive:base.tar", "oci:layout:v1")
    (workdir / "castiron.yaml").write_text(text.split("service:")[0] + "environments:\n"
                                           "  staging: {listen: 127.0.0.1:18080}\n")  # fmt: skip
    lines = run_cli("validate").stderr.splitlines()
    assert lines == [
        f"error: castiron.yaml:4:9: image.base: layout: is not an OCI image layout (no "
        f"index.json in {workdir}/layout)",
        f"  castiron.yaml:5:15: image.dockerfile: Dockerfile: no such file "
        f"({workdir}/src/Dockerfile)",
    ]


def test_readable_references_pass_and_a_secret_is_never_printed(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "src").mkdir()
    (workdir / "src" / "Dockerfile").write_text("FROM scratch\n")
    (workdir / "base.tar").write_bytes(b"")
    (workdir / "secrets").mkdir()
    (workdir / "secrets" / "db.txt").write_text("hunter2-secret\n")
    text = POINTING.replace("API_TOKEN: {file: secrets}", "API_TOKEN: {file: secrets/db.txt}")
    (workdir / "castiron.yaml").write_text(text)
    result = run_cli("validate")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "ok\n", "")


def test_a_listen_address_that_does_not_parse_is_located(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "app").mkdir()
    (workdir / "castiron.yaml").write_text(
        "app: shop\nenvironments:\n  staging: {listen: 'localhost:http'}\n"
    )
    result = run_cli("validate")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: castiron.yaml:3:21: environments.staging.listen: port 'http' must be a number "
        "from 1 to 65535\n"
    )


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_init_finds_the_app_in_app_dir_with_its_entrypoint_and_free_ports(
    run_cli, workdir: Path
) -> None:  # type: ignore[no-untyped-def]
    (workdir / "app").mkdir()
    (workdir / "app" / "main.py").write_text("print('hi')\n")
    result = run_cli("init")
    assert result.exit_code == 0, result.stderr
    loaded = load_spec(workdir / "castiron.yaml", {})
    assert loaded.spec.image.context == "./app"
    assert loaded.spec.image.entrypoint == ("python3", "main.py")
    staging = loaded.spec.environments["staging"].listen
    production = loaded.spec.environments["production"].listen
    ports = [int(staging.rpartition(":")[2]), int(production.rpartition(":")[2])]
    assert ports[0] != ports[1] and all(_bindable(p) for p in ports)
    assert result.stdout.splitlines()[1] == (
        f"  context ./app (entrypoint python3 main.py); staging on {staging}, production on "
        f"{production}"
    )
    assert run_cli("validate").stdout == "ok\n"


def test_init_in_the_app_dir_keeps_spec_and_state_out_of_the_image(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    (workdir / "app.py").write_text("print('hi')\n")
    assert run_cli("init", "--port", "18123").exit_code == 0
    spec = workdir / "castiron.yaml"
    loaded = load_spec(spec, {})
    assert (loaded.spec.image.context, loaded.spec.image.entrypoint) == (".", ("python3", "app.py"))
    assert loaded.spec.environments["staging"].listen == "127.0.0.1:18123"
    home = workdir / ".castiron"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "x").write_text("state\n")

    def digest() -> str:
        current = load_spec(spec, {})
        return bake(
            current.spec.image,
            ImageStore(home / "images"),
            BakeOptions(
                context=workdir,
                base_dir=workdir,
                source_date_epoch=0,
                app=current.spec.app,
                port=current.spec.service.port,
                skip=default_skips(workdir, spec, home),
            ),
        ).digest

    first = digest()
    spec.write_text(spec.read_text().replace("127.0.0.1:18123", "127.0.0.1:18124"))
    assert digest() == first  # editing a port never changes the image


def test_init_example_writes_the_bundled_app(run_cli, workdir: Path) -> None:  # type: ignore[no-untyped-def]
    result = run_cli("init", "--example", "--port", "18125")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"wrote {workdir}/castiron.yaml and {workdir}/app/ (the bundled example app 'hello')"
    )
    assert (workdir / "app" / "server.py").is_file()
    loaded = load_spec(workdir / "castiron.yaml", {})
    assert loaded.spec.environments["staging"].listen == "127.0.0.1:18125"
    assert run_cli("validate").stdout == "ok\n"
    again = run_cli("init", "--example")
    assert (again.exit_code, again.stderr) == (
        2,
        f"error: {workdir}/castiron.yaml already exists; not overwriting it\n",
    )
