"""The JSON Schema that `castiron schema` prints accepts the bundled example and refuses mistakes.

jsonschema is not a dependency, so a small validator for the keywords the schema uses lives
here; it refuses any keyword it does not know, so the check cannot silently pass.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from castiron.spec.schema import spec_json_schema
from castiron.spec.starter import starter_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "src" / "castiron" / "examples" / "hello"
_ANNOTATIONS = {"title", "description", "default", "$schema", "$defs"}
_OBJECT_KEYWORDS = {"properties", "patternProperties", "additionalProperties"}


def _errors(schema: dict[str, Any], value: Any, root: dict[str, Any], at: str = "") -> list[str]:
    errors: list[str] = []
    for keyword, rule in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        if keyword == "$ref":
            name = rule.removeprefix("#/$defs/")
            errors += _errors(root["$defs"][name], value, root, at)
        elif keyword == "type":
            kinds = rule if isinstance(rule, list) else [rule]
            if not any(_is(kind, value) for kind in kinds):
                errors.append(f"{at}: not {rule}")
        elif keyword == "anyOf":
            if all(_errors(option, value, root, at) for option in rule):
                errors.append(f"{at}: matches no option")
        elif keyword in ("enum", "const"):
            allowed = rule if keyword == "enum" else [rule]
            if value not in allowed:
                errors.append(f"{at}: not one of {allowed}")
        elif keyword == "pattern":
            if isinstance(value, str) and not re.search(rule, value):
                errors.append(f"{at}: does not match {rule}")
        elif keyword in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            errors += _bound(keyword, rule, value, at)
        elif keyword == "required":
            if isinstance(value, dict):
                errors += [f"{at}: missing {k}" for k in rule if k not in value]
        elif keyword == "propertyNames":
            if isinstance(value, dict):
                for key in value:
                    errors += _errors(rule, key, root, f"{at}.{key}[key]")
        elif keyword in _OBJECT_KEYWORDS:
            continue  # checked together, below
        elif keyword == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    errors += _errors(rule, item, root, f"{at}.{i}")
        elif keyword == "maxItems" or keyword == "minItems":
            pass
        else:
            raise AssertionError(f"validator does not know keyword {keyword!r}")
    if isinstance(value, dict) and _OBJECT_KEYWORDS & schema.keys():
        errors += _object(schema, value, root, at)
    return errors


def _object(
    schema: dict[str, Any], value: dict[str, Any], root: dict[str, Any], at: str
) -> list[str]:
    errors: list[str] = []
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        where = f"{at}.{key}"
        matched = False
        if key in properties:
            matched = True
            errors += _errors(properties[key], item, root, where)
        for pattern, sub in patterns.items():
            if re.search(pattern, key):
                matched = True
                errors += _errors(sub, item, root, where)
        if not matched:
            if extra is False:
                errors.append(f"{where}: not allowed")
            elif isinstance(extra, dict):
                errors += _errors(extra, item, root, where)
    return errors


def _is(kind: str, value: Any) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
    }[kind]


def _bound(keyword: str, limit: float, value: Any, at: str) -> list[str]:
    if not _is("number", value):
        return []
    ok = {
        "minimum": value >= limit,
        "maximum": value <= limit,
        "exclusiveMinimum": value > limit,
        "exclusiveMaximum": value < limit,
    }[keyword]
    return [] if ok else [f"{at}: {keyword} {limit}"]


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return spec_json_schema()


def test_bundled_example_matches_the_schema(schema: dict[str, Any]) -> None:
    document = yaml.safe_load((EXAMPLE / "castiron.yaml").read_text(encoding="utf-8"))
    assert _errors(schema, document, schema) == []


def test_starter_matches_the_schema(schema: dict[str, Any]) -> None:
    document = yaml.safe_load(starter_spec("hello"))
    assert _errors(schema, document, schema) == []


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"app": "hello", "servise": {}}, ".servise: not allowed"),
        ({"app": "Hello"}, ".app: does not match"),
        ({"image": {}}, ": missing app"),
        ({"app": "a", "service": {"replicas": 0}}, ".service.replicas: minimum 1"),
        ({"app": "a", "service": {"health": {"interval": "soon"}}}, "matches no option"),
        ({"app": "a", "environments": {"s": {"listen": 1, "runtime": "vm"}}}, "not one of"),
        ({"app": "a", "service": {"env": {"1A": "x"}}}, ".service.env.1A[key]: does not match"),
    ],
)
def test_schema_refuses_mistakes(schema: dict[str, Any], document: Any, error: str) -> None:
    errors = _errors(schema, document, schema)
    assert any(error in e for e in errors), errors


def test_x_keys_are_allowed_on_every_mapping(schema: dict[str, Any]) -> None:
    document = {
        "app": "a",
        "x-top": {"anything": [1, 2]},
        "service": {"x-note": 1, "health": {"x-why": "because"}},
        "environments": {"s": {"listen": "127.0.0.1:1", "x-owner": "me"}},
    }
    assert _errors(schema, document, schema) == []


def test_schema_documents_every_field(schema: dict[str, Any]) -> None:
    undocumented = [
        f"{name}.{field}"
        for name, definition in schema["$defs"].items()
        for field, body in definition.get("properties", {}).items()
        if not body.get("description")
    ]
    undocumented += [f for f, body in schema["properties"].items() if not body.get("description")]
    assert undocumented == []
