"""Every rule of the spec loader, with the exact message a user sees."""

from __future__ import annotations

import pytest

from castiron.errors import SpecError
from castiron.spec.load import MAX_BYTES, load_spec_text


def _issues(text: str | bytes, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec_text(text, "castiron.yaml", environ or {})
    assert str(info.value) == "\n".join(str(i) for i in info.value.issues)
    return [str(i) for i in info.value.issues]


ENV_OK = "environments:\n  staging: {listen: 127.0.0.1:8080}\n"
ROUTER = "app: hello\nenvironments:\n  staging:\n    listen: 127.0.0.1:8080\n    router: "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "app: hello\nservice:\n  replica: 3\n",
            "castiron.yaml:3:3: service.replica: unknown key 'replica'; did you mean 'replicas'?",
            id="unknown-key-suggestion",
        ),
        pytest.param(
            "app: hello\nzzz: 1\n",
            "castiron.yaml:2:1: zzz: unknown key 'zzz' "
            "(expected one of: app, image, service, environments, terraform)",
            id="unknown-key-listed",
        ),
        pytest.param(
            "app: hello\nextensions: {a: 1}\n",
            "castiron.yaml:2:1: extensions: unknown key 'extensions' "
            "(expected one of: app, image, service, environments, terraform)",
            id="extensions-is-not-a-key",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  staging:\n    runtime: local\n",
            "castiron.yaml:4:5: environments.staging: missing required key 'listen'",
            id="missing-key-at-parent-mapping",
        ),
        pytest.param(
            "image: {}\n",
            "castiron.yaml:1:1: missing required key 'app'",
            id="missing-app",
        ),
        pytest.param(
            "app: hello\nservice:\n  port: eighty\n",
            "castiron.yaml:3:9: service.port: must be an integer",
            id="integer",
        ),
        pytest.param(
            "app: hello\nservice: {port: 70000}\n",
            "castiron.yaml:2:17: service.port: must be a port number from 1 to 65535",
            id="port-range",
        ),
        pytest.param(
            "app: hello\n"
            + ENV_OK
            + "  production:\n    listen: 127.0.0.1:8081\n    replicas: 0\n",
            "castiron.yaml:6:15: environments.production.replicas: must be at least 1",
            id="at-least",
        ),
        pytest.param(
            "app: hello\nservice: {replicas: 5000}\n",
            "castiron.yaml:2:21: service.replicas: must be at most 1000",
            id="at-most",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  production:\n    listen: 127.0.0.1:8081\n"
            "    policy:\n      checks: ['./smoke.sh']\n",
            "castiron.yaml:6:16: environments.production.policy.checks.0: must be a list",
            id="list-index-in-path",
        ),
        pytest.param(
            "app: hello\nservice: {health: {tcp: maybe}}\n",
            "castiron.yaml:2:25: service.health.tcp: must be true or false",
            id="boolean",
        ),
        pytest.param(
            "app: hello\nservice: {cpus: lots}\n",
            "castiron.yaml:2:17: service.cpus: must be a number",
            id="number",
        ),
        pytest.param(
            "app: hello\nimage:\n",
            "castiron.yaml:2:7: image: must be a mapping",
            id="section-null",
        ),
        pytest.param(
            "app: hello\nimage: {entrypoint: python3}\n",
            "castiron.yaml:2:21: image.entrypoint: must be a list",
            id="must-be-list",
        ),
        pytest.param(
            "app: Hello_World\n",
            "castiron.yaml:1:6: app: 'Hello_World' is not a valid name: use 1-63 lowercase "
            "letters, digits and '-', not starting or ending with '-'",
            id="name",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  Prod: {listen: 1}\n",
            "castiron.yaml:3:3: environments.Prod: 'Prod' is not a valid name: use 1-63 lowercase "
            "letters, digits and '-', not starting or ending with '-'",
            id="environment-name-at-key",
        ),
        pytest.param(
            "app: hello\nservice:\n  env: {1ST: x}\n",
            "castiron.yaml:3:9: service.env.1ST: '1ST' is not a valid environment variable name: "
            "use letters, digits and '_', not starting with a digit",
            id="env-name",
        ),
        pytest.param(
            "app: hello\nservice:\n  health: {interval: 3 seconds}\n",
            "castiron.yaml:3:22: service.health.interval: '3 seconds' is not a duration; "
            "use e.g. 500ms, 30s, 10m or 1h",
            id="duration",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s:\n    listen: 1\n    strategy:\n"
            "      steps: [{weight: 10, pause: soon}]\n",
            "castiron.yaml:6:35: environments.s.strategy.steps.0.pause: must be a duration "
            "such as 30s or 5m, or 'manual'",
            id="pause",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: 'example.com:80'}\n",
            "castiron.yaml:3:15: environments.s.listen: 'example.com' is not an IP address "
            "or 'localhost'",
            id="listen-host",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: '127.0.0.1:0'}\n",
            "castiron.yaml:3:15: environments.s.listen: port '0' must be a number from 1 to 65535",
            id="listen-port",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: '::1:80'}\n",
            "castiron.yaml:3:15: environments.s.listen: write IPv6 hosts in brackets: [::1]:80",
            id="listen-ipv6",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: 1, runtime: dokcer}\n",
            "castiron.yaml:3:27: environments.s.runtime: must be one of 'local', 'docker' or "
            "'kubernetes'; did you mean 'docker'?",
            id="choice",
        ),
        pytest.param(
            "app: hello\nimage: {workdir: app}\n",
            "castiron.yaml:2:18: image.workdir: must be an absolute path inside the image "
            "(starting with '/')",
            id="workdir",
        ),
        pytest.param(
            "app: hello\nservice: {health: {http: /h, tcp: true}}\n",
            "castiron.yaml:2:19: service.health: choose one of http, tcp or command "
            "(got http, tcp)",
            id="one-probe",
        ),
        pytest.param(
            "app: hello\nservice: {secrets: {DB: {}}}\n",
            "castiron.yaml:2:25: service.secrets.DB: give exactly one of env, file or tf",
            id="secret-source",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: 1, promote_from: t}\n",
            "castiron.yaml:3:32: environments.s.promote_from: no environment named 't'",
            id="promote-from-unknown",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: 1, promote_from: s}\n",
            "castiron.yaml:3:32: environments.s.promote_from: an environment cannot promote "
            "from itself",
            id="promote-from-self",
        ),
        pytest.param(
            "app: hello\nenvironments:\n  s: {listen: 1, promote_from: t}\n"
            "  t: {listen: 2, promote_from: s}\n",
            "castiron.yaml:3:32: environments.s.promote_from: promotion cycle s -> t -> s",
            id="promote-cycle",
        ),
        pytest.param(
            "app: hello\nservice:\n  replicas: 2\n  port: 80\n  replicas: 3\n",
            "castiron.yaml:5:3: service.replicas: duplicate key 'replicas' "
            "(first defined at line 3, column 3)",
            id="duplicate-key",
        ),
        pytest.param(
            "app: !!python/object/apply:os.system ['true']\n",
            "castiron.yaml:1:6: app: the YAML tag '!!python/object/apply:os.system' is not "
            "allowed; write plain YAML values",
            id="python-tag",
        ),
        pytest.param(
            "app: hello\nservice: !!set {a, b}\n",
            "castiron.yaml:2:10: service: the YAML tag '!!set' is not allowed; "
            "write plain YAML values",
            id="set-tag",
        ),
        pytest.param(
            "app: !custom hello\n",
            "castiron.yaml:1:6: app: the YAML tag '!custom' is not allowed; "
            "write plain YAML values",
            id="local-tag",
        ),
        pytest.param(
            "app: hello\nservice: {port: !!int eighty}\n",
            "castiron.yaml:2:17: service.port: 'eighty' is not a valid integer",
            id="bad-explicit-int",
        ),
        pytest.param(
            "app: hello\n1: one\n",
            "castiron.yaml:2:1: key '1' is not a string (YAML reads it as int); "
            "quote it if you mean the text",
            id="int-key",
        ),
        pytest.param(
            "app: hello\nservice:\n  yes: true\n",
            "castiron.yaml:3:3: service: key 'yes' is not a string (YAML reads it as bool); "
            "quote it if you mean the text",
            id="bool-key",
        ),
        pytest.param(
            "app: hello\n? [a, b]\n: c\n",
            "castiron.yaml:2:3: keys must be plain strings, not a list",
            id="list-key",
        ),
        pytest.param(
            "app: hello\nservice: {<<: 3}\n",
            "castiron.yaml:2:15: service: a merge key (<<) needs a mapping or a list of mappings",
            id="merge-not-mapping",
        ),
        pytest.param(
            ROUTER + "{max_body: 10MB}\n",
            "castiron.yaml:5:24: environments.staging.router.max_body: "
            "'10MB' is not a size; use e.g. 512KiB, 10MiB or 1GiB",
            id="router-size",
        ),
        pytest.param(
            ROUTER + "{body_timeout: 10ms}\n",
            "castiron.yaml:5:28: environments.staging.router.body_timeout: must be at least 100ms",
            id="router-body-timeout",
        ),
        pytest.param(
            ROUTER + "{max_connections: 0}\n",
            "castiron.yaml:5:31: environments.staging.router.max_connections: must be at least 1",
            id="router-max-connections",
        ),
        pytest.param(
            ROUTER + "nginx\n",
            "castiron.yaml:5:13: environments.staging.router: "
            "must be one of 'builtin' or 'haproxy'",
            id="router-short-form",
        ),
        pytest.param(
            ROUTER + "{acces_log: true}\n",
            "castiron.yaml:5:14: environments.staging.router.acces_log: "
            "unknown key 'acces_log'; did you mean 'access_log'?",
            id="router-unknown-key",
        ),
    ],
)
def test_validation_message(text: str, expected: str) -> None:
    assert _issues(text) == [expected]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param("", "castiron.yaml:1:1: the file is empty", id="empty"),
        pytest.param("  \n\n", "castiron.yaml:1:1: the file is empty", id="blank"),
        pytest.param("# only a comment\n", "castiron.yaml:1:1: the file is empty", id="comment"),
        pytest.param(
            "- app\n",
            "castiron.yaml:1:1: the spec must be a mapping of keys (app, image, service, "
            "environments), not a list",
            id="list-document",
        ),
        pytest.param(
            "hello\n",
            "castiron.yaml:1:1: the spec must be a mapping of keys (app, image, service, "
            "environments), not a string",
            id="string-document",
        ),
        pytest.param(
            "~\n",
            "castiron.yaml:1:1: the spec must be a mapping of keys (app, image, service, "
            "environments), not null (empty)",
            id="null-document",
        ),
        pytest.param(
            "app: a\n---\napp: b\n",
            "castiron.yaml:2:1: only one YAML document is allowed; found a second one",
            id="two-documents",
        ),
        pytest.param(
            "app: hello\n  service: x\n",
            "castiron.yaml:2:10: invalid YAML: mapping values are not allowed here",
            id="syntax-error",
        ),
        pytest.param(
            "app: hello\nimage: {entrypoint: [python3\n",
            "castiron.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence)",
            id="unclosed-flow",
        ),
        pytest.param(
            "app: *nowhere\n",
            "castiron.yaml:1:6: invalid YAML: found undefined alias 'nowhere'",
            id="undefined-alias",
        ),
        pytest.param(
            "app: &a hello\nx-b: &a hi\n",
            "castiron.yaml:2:6: duplicate anchor 'a' (first defined at line 1, column 6)",
            id="duplicate-anchor",
        ),
        pytest.param(
            "app: hello\x07\n",
            "castiron.yaml:1:11: character U+0007 is not allowed in YAML",
            id="control-character",
        ),
        pytest.param(
            b"app: hello\nimage: {base: caf\xe9}\n",
            "castiron.yaml:2:18: not valid UTF-8: byte 0xe9 at offset 28",
            id="not-utf8",
        ),
        pytest.param(
            b"#" * (MAX_BYTES + 1),
            "castiron.yaml:1:1: the file is larger than 1048576 bytes (1 MiB)",
            id="too-large",
        ),
        pytest.param(
            "app: hello\nx-deep: " + "[" * 80 + "]" * 80 + "\n",
            "castiron.yaml:2:72: nested too deeply (more than 64 levels)",
            id="too-deep",
        ),
        pytest.param(
            "app: hello\nx-loop: &loop [*loop]\n",
            "castiron.yaml:2:9: x-loop.0: recursive YAML alias: this node contains itself",
            id="recursive-alias",
        ),
        pytest.param(
            "app: hello\nx-loop: &loop {<<: *loop}\n",
            "castiron.yaml:2:9: x-loop: recursive YAML alias: this node contains itself",
            id="recursive-merge",
        ),
    ],
)
def test_refused_file(data: str | bytes, expected: str) -> None:
    assert _issues(data) == [expected]


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["app: hello", "x-0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"x-{level}: &a{level} [{refs}]")
    issues = _issues("\n".join(lines) + "\n")
    assert len(issues) == 1
    assert issues[0].endswith(
        "more than 100000 YAML nodes after expanding aliases; the file looks like an alias bomb"
    )


def test_all_errors_are_reported_in_file_order() -> None:
    text = (
        "app: hello\n"
        "service:\n"
        "  replica: 3\n"
        "  port: eighty\n"
        "environments:\n"
        "  staging: {runtime: dokcer}\n"
        "  production:\n"
        "    listen: 127.0.0.1:8081\n"
        "    replicas: 0\n"
        "    policy:\n"
        "      checks: ['./smoke.sh']\n"
    )
    assert _issues(text) == [
        "castiron.yaml:3:3: service.replica: unknown key 'replica'; did you mean 'replicas'?",
        "castiron.yaml:4:9: service.port: must be an integer",
        "castiron.yaml:6:12: environments.staging: missing required key 'listen'",
        "castiron.yaml:6:22: environments.staging.runtime: must be one of 'local', 'docker' or "
        "'kubernetes'; did you mean 'docker'?",
        "castiron.yaml:9:15: environments.production.replicas: must be at least 1",
        "castiron.yaml:11:16: environments.production.policy.checks.0: must be a list",
    ]


def test_duplicate_key_does_not_hide_other_errors() -> None:
    text = "app: hello\nenvironments:\n  s: {listen: 0}\n  s: {listen: 1}\n"
    assert _issues(text) == [
        "castiron.yaml:3:15: environments.s.listen: port '0' must be a number from 1 to 65535",
        "castiron.yaml:4:3: environments.s: duplicate key 's' (first defined at line 3, column 3)",
    ]
