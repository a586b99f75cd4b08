"""The API document (OpenAPI 3.1), built from the route table and the pydantic models.

Nothing here is written twice: the paths, methods and operations come from routes.ENDPOINTS,
the very table the server registers; the request schemas from the models that validate
requests (models.py), the response schemas from responses.py; the header names from
rules.py; the error codes of each status from the table too. A test fails when a route exists
that the document lacks, or the other way round.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import __version__
from .responses import ErrorBody
from .routes import ENDPOINTS, Endpoint, HeaderDoc
from .rules import ETAG, REQUEST_ID

_SCHEMAS = "#/components/schemas/{model}"
_STATUS_TEXT = {
    200: "Success.",
    302: "Redirect.",
    304: "Not modified.",
    400: "The request is malformed: bad HTTP, JSON or header.",
    401: "The bearer token is missing or wrong.",
    403: "The token does not cover a key or prefix of the request, or is not admin; nothing "
    "was read or written.",
    404: "No such key, or no such endpoint.",
    405: "This path takes other methods; see Allow.",
    408: "The body stopped arriving for KV_CLIENT_TIMEOUT; nothing was stored.",
    409: "The name is taken; nothing was written.",
    410: "The history no longer holds the changes asked for, or never had them; list again.",
    412: "The If-Match or If-None-Match condition does not hold; nothing was written.",
    413: "The body, or a value, is larger than the server accepts.",
    422: "The request is well-formed JSON but breaks a rule of the API.",
    500: "A bug; the request id finds it in the logs.",
    503: "The store cannot serve the request now (disk full, database gone); retry later.",
}
# Every operation can meet these, from the HTTP layer or the server itself.
_ALWAYS = {
    400: ("bad_request",),
    401: ("unauthorized",),
    500: ("internal_error",),
}


def _models() -> list[type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {ErrorBody.__name__: ErrorBody}
    for endpoint in ENDPOINTS:
        for model in (endpoint.body, endpoint.query, endpoint.response):
            if isinstance(model, type) and issubclass(model, BaseModel):
                found[model.__name__] = model
    return list(found.values())


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    """The document as the server sends it: built once per process, since nothing in it
    depends on the settings (building it is most of create_app's cost)."""
    return orjson.dumps(build_document())


def build_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, as JSON-ready data."""
    models = _models()
    _, definitions = models_json_schema(
        [(model, "validation") for model in models], ref_template=_SCHEMAS
    )
    schemas = dict(definitions.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        operations = paths.setdefault(endpoint.route, {})
        for method in endpoint.methods:
            operations[method.lower()] = _operation(endpoint, method)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mapmg_data_engineer_takehome key-value store",
            "version": __version__,
            "description": "A durable key-value store of strings over HTTP. Every error is "
            '`{"error": "<code>", "message": "<sentence>"}`; the codes of each status are '
            "listed with it. Any request may carry an X-Request-ID header: when it is 1 to "
            "128 printable characters (! to ~), the answer and the logs carry it back.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed on every route but /health when the server has "
                    "KV_AUTH_TOKEN; without it, ignored.",
                }
            },
        },
        "security": [{"bearerAuth": []}],
    }


def _operation(endpoint: Endpoint, method: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{endpoint.name}{'' if method == endpoint.methods[0] else method.title()}",
        "summary": endpoint.summary,
        "description": endpoint.description,
        "parameters": [*_path_parameters(endpoint), *_query_parameters(endpoint)]
        + [_header_parameter(header) for header in endpoint.request_headers],
        "responses": _responses(endpoint, method),
    }
    if endpoint.public:
        operation["security"] = []
    if endpoint.body is not None and endpoint.body_type != "application/json":
        # Lines of JSON: the body is text, each line of it one ``body`` (OpenAPI 3.1 has no
        # way to say so but words).
        operation["requestBody"] = {
            "required": True,
            "description": f"Lines, each one {endpoint.body.__name__}.",
            "content": {endpoint.body_type: {"schema": {"type": "string"}}},
        }
    elif endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": _SCHEMAS.format(model=endpoint.body.__name__)}
                }
            },
        }
        if endpoint.example is not None:
            operation["requestBody"]["content"]["application/json"]["example"] = endpoint.example
    return operation


# Each parameter a route's path may hold: what the document says of it, and its schema.
_PATH_PARAMETERS: dict[str, tuple[str, dict[str, Any]]] = {
    "key": (
        "The key, percent-encoded: everything after the prefix, decoded once. Encode '.' and "
        "'..' as %2E and %2E%2E.",
        {"type": "string", "minLength": 1},
    ),
    "id": ("The lease's id, as POST /leases gave it.", {"type": "string", "minLength": 1}),
    "name": ("The file's name.", {"type": "string"}),
}


def _path_parameters(endpoint: Endpoint) -> Iterable[dict[str, Any]]:
    for name, (description, schema) in _PATH_PARAMETERS.items():
        if f"{{{name}}}" in endpoint.route:
            yield {
                "name": name,
                "in": "path",
                "required": True,
                "description": description,
                "schema": schema,
            }


def _query_parameters(endpoint: Endpoint) -> Iterable[dict[str, Any]]:
    if endpoint.query is None:
        return
    schema = endpoint.query.model_json_schema()
    for name, field_schema in schema["properties"].items():
        description = field_schema.pop("description", "")
        field_schema.pop("title", None)
        # Optional[str]: a query parameter is absent, never null.
        choices = [choice for choice in field_schema.pop("anyOf", []) if choice != {"type": "null"}]
        if choices:
            field_schema.update(choices[0])
        if field_schema.get("default", "") is None:
            del field_schema["default"]
        yield {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": field_schema,
        }


def _header_parameter(header: HeaderDoc) -> dict[str, Any]:
    return {
        "name": header.name,
        "in": "header",
        "required": False,
        "description": header.description,
        "schema": {"type": "string", **({"pattern": header.pattern} if header.pattern else {})},
    }


# Every answer's; a request may send its own (see the document's description), which is not
# a parameter here: any value is taken (one that is not 1 to 128 printable characters is
# replaced), so no schema of it could be broken.
_REQUEST_ID_HEADER = {
    REQUEST_ID: {
        "description": "The request's id: the client's own X-Request-ID if it sent a short "
        "printable one, else one the server made. The logs carry it too.",
        "schema": {"type": "string"},
    }
}


def _responses(endpoint: Endpoint, method: str) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    success: dict[str, Any] = {
        "description": _STATUS_TEXT[200],
        "headers": {
            **_REQUEST_ID_HEADER,
            **{
                header.name: {"description": header.description, "schema": {"type": "string"}}
                for header in endpoint.response_headers
            },
        },
    }
    if method != "HEAD":
        if endpoint.response is not None:
            schema: dict[str, Any] = {"$ref": _SCHEMAS.format(model=endpoint.response.__name__)}
            success["content"] = {"application/json": {"schema": schema}}
            if endpoint.stream_type is not None:
                success["content"][endpoint.stream_type] = {"schema": {"type": "string"}}
        elif endpoint.content_type == "application/json":  # this document itself
            success["content"] = {endpoint.content_type: {"schema": {"type": "object"}}}
        elif endpoint.content_type is not None:
            success["content"] = {endpoint.content_type: {"schema": {"type": "string"}}}
    if endpoint.links:
        success["links"] = {
            name: {"operationId": operation, "parameters": dict(parameters)}
            for name, operation, parameters in endpoint.links
        }
    if endpoint.success == 302:
        success = {
            "description": "Redirect.",
            "headers": {
                **_REQUEST_ID_HEADER,
                "Location": {"description": "Where to go.", "schema": {"type": "string"}},
            },
        }
    responses[str(endpoint.success)] = success
    errors: dict[int, tuple[str, ...]] = dict(_ALWAYS)
    for status, codes in endpoint.errors:
        errors[status] = tuple(dict.fromkeys((*errors.get(status, ()), *codes)))
    if endpoint.public:
        errors.pop(401, None)
    for status in sorted(errors):
        error: dict[str, Any] = {
            "description": _STATUS_TEXT[status],
            "headers": dict(_REQUEST_ID_HEADER),
        }
        if status == 412:
            error["headers"][ETAG] = {
                "description": "The key's current version, when it exists.",
                "schema": {"type": "string"},
            }
        if method != "HEAD":
            error["content"] = {
                "application/json": {
                    "schema": {
                        "allOf": [{"$ref": _SCHEMAS.format(model="ErrorBody")}],
                        "properties": {"error": {"enum": list(errors[status])}},
                    }
                }
            }
        responses[str(status)] = error
    return responses
