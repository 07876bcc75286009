"""The image commands end to end through the CLI: bake, images, inspect, export, import, prune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .bakekit import APP_FILES, write_tree

SPEC = """\
app: hello
image:
  context: ./app
  layers: ["deps/**"]
  entrypoint: ["python3", "server.py"]
  env: {MODE: prod}
service:
  port: 8080
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_tree(tmp_path / "proj" / "app", APP_FILES)
    spec = tmp_path / "proj" / "castiron.yaml"
    spec.write_text(SPEC)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return spec


def _json(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_bake_images_inspect(run_cli: Any, project: Path) -> None:
    baked = _json(run_cli("-f", str(project), "bake", "--tag", "v1", "--json"))
    assert baked["digest"].startswith("sha256:") and baked["tags"] == ["v1"]
    assert baked["config_digest"].startswith("sha256:")
    again = _json(run_cli("-f", str(project), "bake", "--tag", "v1", "--json"))
    assert again["digest"] == baked["digest"]
    assert all(layer["reused"] for layer in again["layers"])
    listing = _json(run_cli("-f", str(project), "images", "--json"))
    assert [i["tags"] for i in listing["images"]] == [["v1"]]
    text = run_cli("-f", str(project), "images")
    assert text.exit_code == 0 and "v1" in text.stdout and baked["digest"][7:19] in text.stdout
    for ref in ("v1", baked["digest"], baked["digest"][7:19]):
        info = _json(run_cli("-f", str(project), "inspect", ref, "--json"))
        assert info["digest"] == baked["digest"]
    assert info["config"]["config"]["ExposedPorts"] == {"8080/tcp": {}}
    assert len(info["layers"]) == 2 and all(x["size"] > 0 for x in info["layers"])
    assert info["annotations"]["org.opencontainers.image.title"] == "hello"
    assert info["provenance"][0]["predicateType"] == "https://slsa.dev/provenance/v1"
    human = run_cli("-f", str(project), "inspect", "v1")
    assert human.exit_code == 0 and "provenance 1 statement(s)" in human.stdout


def test_tag_conflict_and_unknown_ref_exit_codes(run_cli: Any, project: Path) -> None:
    assert run_cli("-f", str(project), "bake", "--tag", "v1").exit_code == 0
    (project.parent / "app" / "server.py").write_text("print('changed')\n")
    conflict = run_cli("-f", str(project), "bake", "--tag", "v1")
    assert conflict.exit_code == 2
    assert conflict.stderr.startswith("error: tag 'v1' is already bound to sha256:")
    missing = run_cli("-f", str(project), "inspect", "nope")
    assert missing.exit_code == 2 and "no image tagged 'nope'" in missing.stderr
    short = run_cli("-f", str(project), "inspect", "abc")
    assert short.exit_code == 2 and "at least 12 hex digits" in short.stderr


def test_secret_refusal_is_one_error_line(run_cli: Any, project: Path) -> None:
    (project.parent / "app" / ".env").write_text("TOKEN=x\n")
    result = run_cli("-f", str(project), "bake")
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "error: image.context: refusing to bake files that look like secrets: .env"
    )
    assert "Traceback" not in result.stderr


def test_export_import_and_prune(
    run_cli: Any, project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    baked = _json(run_cli("-f", str(project), "bake", "--tag", "v1", "--json"))
    out = tmp_path / "hello.tar"
    exported = _json(
        run_cli(
            "-f",
            str(project),
            "export",
            "v1",
            "--format",
            "docker-archive",
            "-o",
            str(out),
            "--json",
        )
    )
    assert exported["digest"] == baked["digest"] and out.is_file()
    monkeypatch.setenv("CASTIRON_HOME", str(tmp_path / "other-home"))
    imported = _json(run_cli("import", str(out), "--tag", "from-archive", "--json"))
    assert imported["images"] == [
        {
            "digest": baked["digest"],
            "config_digest": baked["config_digest"],
            "tags": ["from-archive"],
        }
    ]
    dry = _json(run_cli("images", "prune", "--json"))
    assert dry["dry_run"] is True and dry["removed_blobs"] == []
    assert dry["kept_images"] == [baked["digest"]]
    text = run_cli("images", "prune", "--yes")
    assert text.exit_code == 0 and text.stdout.startswith("removed 0 blob(s)")


def test_bad_archive_via_cli(run_cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\0" * 10)
    result = run_cli("import", str(bad))
    assert result.exit_code == 1 and result.stderr.startswith("error: ")


def test_bad_source_date_epoch(
    run_cli: Any, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    result = run_cli("-f", str(project), "bake")
    assert result.exit_code == 2 and "SOURCE_DATE_EPOCH='yesterday'" in result.stderr
    ok = run_cli("-f", str(project), "bake", "--source-date-epoch", "5", "--json")
    assert ok.exit_code == 0


def test_prune_keeps_the_image_of_a_recorded_release(
    run_cli: Any, project: Path, home: Path
) -> None:
    from datetime import UTC, datetime

    from castiron.images import oci
    from castiron.images.store import ImageStore
    from castiron.model import Digest, ReleaseId
    from castiron.settings import load_settings
    from castiron.state.base import AuditDraft, EnvironmentRow, ImageRow, ReleaseRow, StateTx
    from castiron.state.sqlite import open_state

    assert run_cli("-f", str(project), "bake", "--tag", "v1").exit_code == 0
    (project.parent / "app" / "server.py").write_text("print('two')\n")
    v2 = _json(run_cli("-f", str(project), "bake", "--tag", "v2", "--json"))
    digest = Digest(v2["digest"])
    store = ImageStore(home / "images")
    # v2 is now only a release's image: no tag names it any more.
    store.update_index(lambda ds: [d for d in ds if d.annotations.get(oci.ANN_REF_NAME) != "v2"])
    now = datetime.now(UTC)

    def record(tx: StateTx) -> None:
        tx.upsert_environment(EnvironmentRow("staging", "local", "127.0.0.1:8080"))
        tx.record_image(ImageRow(digest, 1, now))
        tx.create_release(ReleaseRow(ReleaseId("r-v2"), "staging", digest, {}, now))

    settings = load_settings({"CASTIRON_HOME": str(home)}, spec_path=project)
    with open_state(settings) as state:
        state.mutate(AuditDraft("release.create", environment="staging"), record)
    report = _json(run_cli("-f", str(project), "images", "prune", "--yes", "--json"))
    assert digest in report["kept_images"]
    image = store.image(digest)
    assert all(store.has_blob(layer.digest) for layer in image.layers)
