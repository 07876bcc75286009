"""The OpenAPI document names exactly the routes the API serves, with their methods."""

from __future__ import annotations

import json

from starlette.routing import Route

from castiron.api.app import api_routes
from castiron.api.openapi import document


def test_the_document_matches_the_routes() -> None:
    doc = document()
    served = {
        (route.path, method.lower())
        for route in api_routes()
        if isinstance(route, Route)
        for method in (route.methods or set())
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == served


def test_the_document_is_openapi_3_1_and_json() -> None:
    doc = json.loads(json.dumps(doc_ := document()))
    assert doc == doc_
    assert doc["openapi"] == "3.1.0"
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, item in doc["paths"].items():
        names = {p["name"] for op in item.values() for p in op.get("parameters", [])}
        for segment in path.split("/"):
            if segment.startswith("{"):
                assert segment.strip("{}") in names, path
        for op in item.values():
            assert op["summary"] and "200" in op["responses"], path
