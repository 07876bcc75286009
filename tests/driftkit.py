"""What the host agent reads back from a drift watch's check (``castiron drift ENV --json
[--fix]``), as a JSON Schema, and a checker for the keywords it uses: shared by the engine's
test of the output and the end-to-end test that runs a registered watch's command."""

from __future__ import annotations

from typing import Any

_FINDING = {
    "type": "object",
    "required": ["kind", "instance", "path", "expected", "actual"],
    "properties": {
        "kind": {"enum": ["image", "config", "filesystem", "membership"]},
        "instance": {"type": "string"},
        "path": {"type": "string"},
        "expected": {"type": ["string", "null"]},
        "actual": {"type": ["string", "null"]},
    },
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
CHECK_OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["findings", "environments"],
    "properties": {
        "findings": {"type": "array", "items": _FINDING},
        "environments": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["environment", "release", "findings"],
                "properties": {
                    "environment": {"type": "string"},
                    "release": {"type": ["string", "null"]},
                    "findings": {"type": "array", "items": _FINDING},
                    "fixed": {
                        "type": "object",
                        "required": [
                            "replaced",
                            "created",
                            "destroyed",
                            "strays_destroyed",
                            "route_reapplied",
                            "trees_renewed",
                            "deployment",
                        ],
                        "properties": {
                            "replaced": _STRINGS,
                            "created": _STRINGS,
                            "destroyed": _STRINGS,
                            "strays_destroyed": _STRINGS,
                            "route_reapplied": {"type": "boolean"},
                            "trees_renewed": _STRINGS,
                            "deployment": {"type": ["string", "null"]},
                        },
                    },
                },
            },
        },
    },
}
"""What the agent reads from ``castiron drift ENV --json [--fix]`` (a JSON Schema)."""

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
    "null": (type(None),),
}


def violations(value: object, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the JSON Schema keywords used above)."""
    if "enum" in schema:
        return [] if value in schema["enum"] else [f"{where}: {value!r} not in {schema['enum']}"]
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if not any(isinstance(value, _TYPES[k]) for k in kinds):
        return [f"{where}: {type(value).__name__} is not {' or '.join(kinds)}"]
    out: list[str] = []
    if isinstance(value, dict):
        out += [f"{where}: no {key!r}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                out += violations(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += violations(item, schema["items"], f"{where}[{i}]")
    return out
