"""Whatever the bytes, the loader answers with a Spec or a SpecError, never anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from castiron.errors import SpecError
from castiron.spec.load import load_spec_text
from castiron.spec.schema import Spec

EXAMPLE = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "castiron"
    / "examples"
    / "hello"
    / "castiron.yaml"
).read_text(encoding="utf-8")
ENVIRON = {"APP_VERSION": "1.0", "PORT": "8000", "EMPTY": ""}
FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

YAML_PIECES = [
    "app: hello\n",
    "app:",
    "service:",
    "environments:",
    "  staging:",
    "    listen: ",
    "127.0.0.1:8080",
    "replicas: ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ",",
    ": ",
    "\n",
    "  ",
    "    ",
    "&a ",
    "*a",
    "<<: ",
    "!!python/object ",
    "!!str ",
    "!tag ",
    "---\n",
    "...\n",
    "? ",
    "|\n",
    ">\n",
    "'",
    '"',
    "#",
    "${X}",
    "${PORT}",
    "$${",
    "${",
    "x-k: ",
    "~",
    "null",
    "yes",
    "1.5",
    "0x1f",
    "-1",
    "1e9",
    "\t",
    "\ufeff",
    "\x00",
    "é",
    "port: ",
    "health:",
    "http: /h",
    "interval: 5s",
    "promote_from: ",
    "policy:",
    "checks: [[a]]",
]


def _check(data: str | bytes) -> None:
    try:
        result = load_spec_text(data, "castiron.yaml", ENVIRON)
    except SpecError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.line >= 1 and issue.column >= 1
            assert "\n" not in issue.message
    else:
        assert isinstance(result, Spec)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=60).map("".join))
def test_random_yaml_like_text(text: str) -> None:
    _check(text)


@st.composite
def mutations(draw: st.DrawFn) -> str:
    text = EXAMPLE
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["delete", "duplicate", "insert", "swap"]))
        if kind == "swap":
            lines = text.splitlines(keepends=True)
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "".join(lines)
            continue
        pos = draw(st.integers(0, len(text)))
        if kind == "delete":
            end = pos + draw(st.integers(1, 8))
            text = text[:pos] + text[end:]
        elif kind == "duplicate":
            end = pos + draw(st.integers(1, 40))
            text = text[:end] + text[pos:end] + text[end:]
        else:
            piece = draw(st.sampled_from(YAML_PIECES) | st.text(max_size=3))
            text = text[:pos] + piece + text[pos:]
    return text


@FUZZ
@given(mutations())
def test_mutations_of_the_example(text: str) -> None:
    _check(text)


def test_custom_tag_on_the_root_mapping_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="python/object"):
        load_spec_text("!!python/object \napp: hello\n", "castiron.yaml", {})
