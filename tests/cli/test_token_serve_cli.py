"""``castiron token`` and the option checks of ``castiron serve`` (the server itself is
tested over real HTTP in tests/e2e/test_serve_e2e.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest


def test_token_create_list_revoke(run_cli: Any) -> None:
    made = run_cli("token", "create", "ci", "--role", "deployer")
    assert made.exit_code == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("cit_")
    assert made.stderr == (
        "created API token ci (role deployer); keep the secret above: it is not stored and "
        "cannot be shown again\n"
    )
    listed = json.loads(run_cli("token", "list", "--json").stdout)
    assert [(t["name"], t["role"], t["revoked"]) for t in listed["tokens"]] == [
        ("ci", "deployer", None)
    ]
    assert secret not in json.dumps(listed)
    revoked = run_cli("token", "revoke", "ci")
    assert (revoked.exit_code, revoked.stdout) == (0, "revoked API token ci\n")
    assert json.loads(run_cli("token", "list", "--json").stdout)["tokens"][0]["revoked"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("token", "create", "ci", "--role", "root"),
            "error: unknown role 'root' (known: viewer, deployer, approver, admin)\n",
        ),
        (
            ("token", "create", "Bad!", "--role", "viewer"),
            "error: bad token name 'Bad!': use 1-63 characters a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit\n",
        ),
        (("token", "revoke", "nobody"), "error: no API token named 'nobody'\n"),
        (
            ("serve", "--listen", "nowhere"),
            "error: --listen: 'nowhere' is not HOST:PORT (e.g. 127.0.0.1:8700)\n",
        ),
        (
            ("serve", "--webhook", "ftp://example.test/"),
            "error: --webhook: 'ftp://example.test/' is not an http(s) URL\n",
        ),
        (
            ("serve", "--webhook", "Bad=http://127.0.0.1:9/"),
            "error: --webhook: 'Bad' is not an environment name\n",
        ),
        (
            ("serve", "--webhook-secret-env", "CASTIRON_TEST_UNSET_SECRET"),
            "error: --webhook-secret-env: $CASTIRON_TEST_UNSET_SECRET is not set or empty\n",
        ),
    ],
)
def test_bad_input_is_one_error_line(run_cli: Any, args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.exit_code == 2, result.stderr
    assert result.stderr == message


def test_a_second_token_with_the_same_name_is_refused(run_cli: Any) -> None:
    assert run_cli("token", "create", "ci", "--role", "viewer").exit_code == 0
    again = run_cli("token", "create", "ci", "--role", "admin")
    assert (again.exit_code, again.stderr) == (2, "error: a token named 'ci' already exists\n")
