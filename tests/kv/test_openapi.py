"""The API document: every route is in it and nothing else, it is valid OpenAPI 3.1, its
schemas are the request models' own, and the docs page works offline."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web
from openapi_spec_validator import validate

from mapmg_data_engineer_takehome.app import create_app
from mapmg_data_engineer_takehome.models import MsetRequest, SetRequest
from mapmg_data_engineer_takehome.openapi import build_document

from .conftest import Client, MakeSettings

FALLBACK = "/{path}"  # the route that answers 404 and 405 for what no other route takes


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the server registered, in the document's spelling."""
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or resource.canonical == FALLBACK:
            continue
        path = re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", resource.canonical)
        found.add((route.method.lower(), path))
    return found


def test_the_document_has_every_route_and_no_other(make_settings: MakeSettings) -> None:
    app = create_app(make_settings())
    document = build_document()
    documented = {
        (method, path) for path, operations in document["paths"].items() for method in operations
    }
    assert routes_of(app) == documented


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_the_schemas_are_the_request_models() -> None:
    schemas = build_document()["components"]["schemas"]
    for model in (SetRequest, MsetRequest):
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert schemas[model.__name__] == own


def test_every_error_status_lists_its_codes_and_the_token_is_declared() -> None:
    document = build_document()
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    set_responses = document["paths"]["/set"]["post"]["responses"]
    codes = {
        status: response["content"]["application/json"]["schema"]["properties"]["error"]["enum"]
        for status, response in set_responses.items()
        if status != "200"
    }
    assert "precondition_failed" in codes["412"]
    assert {"invalid_ttl", "invalid_type", "missing_field", "unknown_field"} <= set(codes["422"])
    assert "store_unavailable" in codes["503"]
    headers = set(document["paths"]["/get/{key}"]["get"]["responses"]["200"]["headers"])
    assert {"ETag", "KV-Expires-At", "X-Request-ID"} <= headers
    assert document["paths"]["/health"]["get"]["security"] == []
    names = {p["name"] for p in document["paths"]["/set"]["post"]["parameters"]}
    assert {"If-Match", "If-None-Match"} <= names
    assert "X-Request-ID" in document["info"]["description"]


async def test_the_document_and_the_docs_page_are_served(client: Client) -> None:
    answer = await client.get("/openapi.json")
    assert answer.status == 200 and (await answer.json())["openapi"].startswith("3.1")
    page = await client.get("/docs")
    html = await page.text()
    assert page.status == 200 and "swagger-ui" in html
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    # Everything the page loads is this server's: no CDN.
    sources = [
        source
        for source in re.findall(r'(?:src|href)="([^"]+)"', html)
        if not source.startswith("data:")  # no favicon to fetch
    ]
    assert sources and all(source.startswith("/docs/assets/") for source in sources)
    for source in sources:
        asset = await client.get(source)
        assert asset.status == 200, source
        assert len(await asset.read()) > 100
    missing = await client.get("/docs/assets/nothing.js")
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"


def operations(document: dict[str, Any]) -> int:
    return sum(len(methods) for methods in document["paths"].values())


def test_the_document_describes_every_operation_with_a_summary() -> None:
    document = build_document()
    assert operations(document) >= 14
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert operation["summary"], (method, path)
            assert operation["operationId"]


def test_the_change_feed_is_documented_with_both_media_types() -> None:
    operation = build_document()["paths"]["/changes"]["get"]
    success = operation["responses"]["200"]["content"]
    assert success["application/json"]["schema"] == {"$ref": "#/components/schemas/ChangesAnswer"}
    assert success["text/event-stream"]["schema"] == {"type": "string"}
    gone = operation["responses"]["410"]["content"]["application/json"]["schema"]
    assert gone["properties"]["error"]["enum"] == ["compacted", "unknown_revision"]
    parameters = {parameter["name"]: parameter for parameter in operation["parameters"]}
    assert set(parameters) == {"prefix", "since", "limit", "timeout", "Last-Event-ID"}
    assert parameters["timeout"]["schema"]["maximum"] == 60
    assert parameters["Last-Event-ID"]["in"] == "header"
    keys = build_document()["paths"]["/keys"]["get"]["responses"]["200"]
    assert "KV-Revision" in keys["headers"]
