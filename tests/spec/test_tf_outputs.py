"""Terraform outputs in the spec: ``${tf:NAME}`` resolved like ``${VAR}`` from the state file
or ``terraform output -json`` file named in ``terraform.outputs``; a sensitive output only as
a ``{tf: NAME}`` secret, resolved at deploy time and never stored in the release."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from castiron.engine.release import canonical_json, resolve_release
from castiron.engine.secrets import resolve_secrets
from castiron.errors import SpecError, UsageError
from castiron.model import Digest
from castiron.redact import Redactor
from castiron.spec.load import load_spec
from castiron.spec.tfoutputs import TfOutput, parse_outputs

DIGEST = Digest("sha256:" + "7" * 64)

OUTPUT_JSON = {
    "db_host": {"sensitive": False, "type": "string", "value": "db.internal"},
    "db_port": {"sensitive": False, "type": "number", "value": 5432},
    "db_password": {"sensitive": True, "type": "string", "value": "hunter2"},
    "zones": {"sensitive": False, "type": ["list", "string"], "value": ["a", "b"]},
}

STATE = {
    "version": 4,
    "terraform_version": "1.15.5",
    "serial": 3,
    "lineage": "x",
    "outputs": OUTPUT_JSON,
    "resources": [],
}


def test_output_json_and_state_files_read_alike() -> None:
    from_output = parse_outputs(json.dumps(OUTPUT_JSON).encode(), "out.json")
    from_state = parse_outputs(json.dumps(STATE).encode(), "terraform.tfstate")
    assert (
        from_output
        == from_state
        == {
            "db_host": TfOutput("db.internal", False),
            "db_port": TfOutput("5432", False),
            "db_password": TfOutput("hunter2", True),
            "zones": TfOutput('["a","b"]', False),
        }
    )
    assert "hunter2" not in repr(from_state["db_password"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "f.json is not JSON"),
        (b"[]", "f.json is not a Terraform state or `terraform output -json` file"),
        (
            json.dumps({"version": 3, "outputs": {}}).encode(),
            "f.json: Terraform state version 3 is not supported (version 4, written by "
            "Terraform 0.12 and later, is)",
        ),
        (json.dumps({"x": {"type": "string"}}).encode(), "f.json: output 'x' has no value"),
    ],
)
def test_bad_outputs_files(data: bytes, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_outputs(data, "f.json")
    assert str(info.value).startswith(message)


def _project(tmp_path: Path, body: str, outputs: object = STATE) -> Path:
    (tmp_path / "infra").mkdir(exist_ok=True)
    (tmp_path / "infra" / "terraform.tfstate").write_text(json.dumps(outputs))
    spec = tmp_path / "castiron.yaml"
    spec.write_text(body)
    return spec


SPEC = """app: hello
terraform:
  outputs: infra/terraform.tfstate
service:
  env:
    DB_URL: postgres://${tf:db_host}:${tf:db_port}/app
  secrets:
    DB_PASSWORD: {tf: db_password}
environments:
  staging: {listen: "127.0.0.1:${tf:db_port}"}
"""


def test_tf_values_resolve_like_variables_and_sensitive_ones_stay_secret(
    tmp_path: Path,
) -> None:
    loaded = load_spec(_project(tmp_path, SPEC), {})
    assert loaded.spec.service.env["DB_URL"] == "postgres://db.internal:5432/app"
    assert loaded.spec.environments["staging"].listen == "127.0.0.1:5432"
    release = resolve_release(loaded.spec, "staging", DIGEST)
    assert dict(release.config.secrets) == {"DB_PASSWORD": "tf:infra/terraform.tfstate#db_password"}
    stored = canonical_json(release.config.to_json())
    assert b"hunter2" not in stored
    # Resolved at deploy time only, from the file as it is then.
    redactor = Redactor()
    assert resolve_secrets(release, {}, tmp_path, redactor) == {"DB_PASSWORD": "hunter2"}
    assert redactor.text("password hunter2") == "password ***"


def _issues(tmp_path: Path, body: str, outputs: object = STATE) -> list[str]:
    spec = _project(tmp_path, body, outputs)
    with pytest.raises(SpecError) as info:
        load_spec(spec, {})
    return [str(i) for i in info.value.issues]


def test_a_sensitive_output_is_refused_as_a_plain_value(tmp_path: Path) -> None:
    body = (
        "app: hello\nterraform: {outputs: infra/terraform.tfstate}\n"
        "service:\n  env:\n    PW: ${tf:db_password}\n"
    )
    issues = _issues(tmp_path, body)
    assert issues == [
        f"{tmp_path / 'castiron.yaml'}:5:9: service.env.PW: terraform output 'db_password' is "
        "sensitive: use it as a secret (service.secrets.NAME: {tf: db_password}), never as a "
        "plain value"
    ]
    assert "hunter2" not in "".join(issues)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "app: hello\nterraform: {outputs: infra/terraform.tfstate}\n"
            "service:\n  env:\n    X: ${tf:nope}\n",
            "5:8: service.env.X: terraform output 'nope' is not in infra/terraform.tfstate "
            "(outputs: db_host, db_password, db_port, zones)",
        ),
        (
            "app: hello\nservice:\n  env:\n    X: ${tf:db_host}\n",
            "4:8: service.env.X: ${tf:db_host} needs the Terraform outputs: name a state file "
            "or a `terraform output -json` file in terraform.outputs",
        ),
        (
            "app: hello\nterraform: {outputs: infra/missing.json}\n"
            "service:\n  env:\n    X: ${tf:db_host}\n",
            "5:8: service.env.X: terraform.outputs: cannot read {root}/infra/missing.json: "
            "No such file or directory",
        ),
        (
            "app: hello\nservice:\n  secrets:\n    PW: {tf: db_password}\n",
            "4:14: service.secrets.PW.tf: name the Terraform outputs file in terraform.outputs",
        ),
        (
            "app: hello\nterraform: {outputs: infra/terraform.tfstate}\n"
            "service:\n  env:\n    X: ${tf:bad name}\n",
            "5:8: service.env.X: '${tf:bad name}' is not a valid reference: write ${tf:OUTPUT}",
        ),
    ],
)
def test_tf_reference_errors_name_their_location(tmp_path: Path, body: str, message: str) -> None:
    spec = tmp_path / "castiron.yaml"
    assert _issues(tmp_path, body) == [f"{spec}:{message.replace('{root}', str(tmp_path))}"]


def test_a_tf_secret_whose_output_is_gone_names_it_at_deploy_time(tmp_path: Path) -> None:
    loaded = load_spec(_project(tmp_path, SPEC), {})
    release = resolve_release(loaded.spec, "staging", DIGEST)
    (tmp_path / "infra" / "terraform.tfstate").write_text(json.dumps({**STATE, "outputs": {}}))
    with pytest.raises(UsageError) as info:
        resolve_secrets(release, {}, tmp_path, Redactor())
    assert str(info.value) == (
        f"secret DB_PASSWORD: terraform output 'db_password' is not in "
        f"{tmp_path / 'infra' / 'terraform.tfstate'}"
    )
