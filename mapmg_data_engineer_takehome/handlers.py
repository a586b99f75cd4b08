"""One small function per endpoint: validate, call the store, answer."""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote

import orjson
from aiohttp import hdrs, web

from .errors import JSON_CONTENT_TYPE, JSON_HEADERS, ApiError, error_response
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .models import (
    ListQuery,
    MdeleteRequest,
    MgetRequest,
    Model,
    MsetRequest,
    SetRequest,
    parse_body,
    parse_query,
    rfc3339,
)
from .settings import Settings
from .state import INPUT_DB_KEY, METRICS_KEY, OPENAPI_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import (
    Condition,
    Entry,
    IfAbsent,
    IfExists,
    IfVersion,
    PreconditionFailed,
    SetItem,
    StoreError,
)

EXPIRES_AT = "KV-Expires-At"
# The store's revision a listing's page was read at: where a watcher of its keys starts.
REVISION = "KV-Revision"
# The docs page's files: Swagger UI 5 (see static/swagger-ui/VERSION) and its start script.
STATIC = Path(__file__).resolve().parent / "static"
DOCS_ASSETS = {
    "swagger-ui-bundle.js": STATIC / "swagger-ui" / "swagger-ui-bundle.js",
    "swagger-ui.css": STATIC / "swagger-ui" / "swagger-ui.css",
    "docs.js": STATIC / "docs.js",
    "LICENSE": STATIC / "swagger-ui" / "LICENSE",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_VERSION_TAG = re.compile(r'"([0-9]{1,18})"')


def _json(data: Any, headers: Mapping[str, str] = JSON_HEADERS, status: int = 200) -> web.Response:
    # orjson writes UTF-8 bytes directly, and prebuilt headers skip web.json_response's
    # per-call content-type handling (bench/results.md has the figures).
    return web.Response(body=orjson.dumps(data), headers=headers, status=status)


def entry_headers(entry: Entry) -> dict[str, str]:
    """The JSON headers plus the key's ETag (its version) and, if it expires, KV-Expires-At.

    Written out as literals: merging JSON_HEADERS into a new dict costs more than the rest."""
    if entry.expires_at is None:
        return {hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE, hdrs.ETAG: f'"{entry.version}"'}
    return {
        hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE,
        hdrs.ETAG: f'"{entry.version}"',
        EXPIRES_AT: rfc3339(entry.expires_at),
    }


class _Unsatisfiable:
    """If-Match and If-None-Match together: both must hold (RFC 9110), which a key that must
    exist and must not exist never does."""


UNSATISFIABLE = _Unsatisfiable()


def parse_condition(
    request: web.Request, if_none_match: bool = True
) -> Union[Condition, _Unsatisfiable, None]:
    """The write's precondition from If-Match or If-None-Match; 400 invalid_header if malformed."""
    if_match = request.headers.get(hdrs.IF_MATCH)
    unless = request.headers.get(hdrs.IF_NONE_MATCH)
    if if_match is None and unless is None:
        return None
    if unless is not None and not if_none_match:
        raise _invalid_header("This endpoint takes If-Match only.")
    condition: Optional[Condition] = None
    if if_match is not None:
        tag = if_match.strip()
        if tag == "*":
            condition = IfExists()
        else:
            match = _VERSION_TAG.fullmatch(tag)
            if match is None:
                raise _invalid_header(
                    'If-Match must be * or a version in double quotes, as ETag gives it ("12").'
                )
            condition = IfVersion(int(match.group(1)))
    if unless is not None:
        if unless.strip() != "*":
            raise _invalid_header(
                "If-None-Match on a write must be *: create the key only if absent."
            )
        return IfAbsent() if condition is None else UNSATISFIABLE
    return condition


async def _unsatisfiable(request: web.Request, key: str) -> ApiError:
    """The 412 of both conditions at once, with the key's ETag when it exists."""
    entry = await request.app[STORE_KEY].get(key)
    return _precondition_failed(PreconditionFailed(None if entry is None else entry.version))


def _invalid_header(message: str) -> ApiError:
    return ApiError(400, "invalid_header", message)


def _precondition_failed(failed: PreconditionFailed) -> ApiError:
    if failed.current is None:
        return ApiError(412, "precondition_failed", "The key does not exist; nothing was written.")
    return ApiError(
        412,
        "precondition_failed",
        f"The key is at version {failed.current}, which does not meet the precondition; "
        "nothing was written. Read it again, then retry.",
        {hdrs.ETAG: f'"{failed.current}"'},
    )


def encode_cursor(key: str) -> str:
    """An opaque cursor that resumes a listing after ``key``."""
    return base64.urlsafe_b64encode(key.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, settings: Settings) -> str:
    """The key a cursor resumes after; 422 invalid_parameter when it is not one of ours."""
    try:
        key = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        after = key.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        after = ""
    if not after or utf8_length_exceeds(after, settings.max_key_bytes):
        raise ApiError(
            422,
            "invalid_parameter",
            "Query parameter 'cursor' must be the cursor of a previous page, as given.",
        )
    return after


def utf8_length_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes of UTF-8 (encoding only when it may)."""
    # A character is at most 4 bytes and at least 1: most texts are decided by their length.
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode("utf-8")) > limit


def check_text(settings: Settings, key: str, val: Optional[str] = None, where: str = "") -> None:
    """ApiError when the key or the value is longer than the settings allow, or holds a NUL
    character; ``where`` names the item of a batch (``items[3].``)."""
    if utf8_length_exceeds(key, settings.max_key_bytes):
        subject = f"{where}key:" if where else "The key"
        raise ApiError(
            422,
            "key_too_long",
            f"{subject} is longer than the limit of {settings.max_key_bytes} bytes of UTF-8.",
        )
    if val is not None and utf8_length_exceeds(val, settings.max_value_bytes):
        subject = f"{where}val:" if where else "The value"
        raise ApiError(
            413,
            "value_too_large",
            f"{subject} is longer than the limit of {settings.max_value_bytes} bytes of UTF-8.",
        )
    # PostgreSQL's text cannot hold U+0000; every store refuses it, so that they answer alike.
    if "\x00" in key or (val is not None and "\x00" in val):
        field = "key" if "\x00" in key else "val"
        subject = f"{where}{field}:" if where else f"Field '{field}'"
        raise ApiError(
            422,
            "invalid_string",
            f"{subject} contains a NUL character (U+0000), which no store holds.",
        )


def key_from_path(request: web.Request, prefix: str) -> str:
    """The key: everything in the raw path after ``prefix``, percent-decoded once.

    The raw path is used rather than the router's match so that an encoded "/", "?" or "#"
    and sequences such as "." or "//" reach the store exactly as the client sent them.
    """
    raw = request.raw_path
    if not raw.startswith(prefix):  # absolute-form request target; trust the router
        return request.match_info["key"]
    raw = raw[len(prefix) :].split("?", 1)[0]
    try:
        key = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(
            400, "invalid_key", "The key in the path is not percent-encoded UTF-8."
        ) from None
    if not key:
        raise ApiError(404, "not_found", "No key in the path; use /get/<key>.")
    check_text(request.app[SETTINGS_KEY], key)
    return key


def _body_too_large(limit: int) -> ApiError:
    return ApiError(
        413, "body_too_large", f"The request body is larger than the limit of {limit} bytes."
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or a 413 once it is known to exceed ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise _body_too_large(limit)  # refused before reading a byte of it
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _body_too_large(limit) from None
    # aiohttp's own bound differs by one between versions (> or >=); this one is exact.
    if len(body) > limit:
        raise _body_too_large(limit)
    return body


async def set_value(request: web.Request) -> web.Response:
    """POST /set: store a value, whatever Content-Type the client claims."""
    settings = request.app[SETTINGS_KEY]
    condition = parse_condition(request)
    body = parse_body(SetRequest, await read_body(request, settings.max_body_bytes))
    check_text(settings, body.key, body.val)
    if isinstance(condition, _Unsatisfiable):
        raise await _unsatisfiable(request, body.key)
    try:
        entry = await request.app[STORE_KEY].set(body.key, body.val, body.ttl, condition)
    except PreconditionFailed as failed:
        raise _precondition_failed(failed) from None
    return _json({"key": body.key, "val": body.val}, entry_headers(entry))


async def get_value(request: web.Request) -> web.Response:
    """GET (and HEAD) /get/<key>: the body is exactly key and val; metadata is in headers."""
    key = key_from_path(request, "/get/")
    entry = await request.app[STORE_KEY].get(key)
    if entry is None:
        raise ApiError(404, "key_not_found", "This key has no value; set it with POST /set.")
    return _json({"key": key, "val": entry.val}, entry_headers(entry))


async def delete_value(request: web.Request) -> web.Response:
    """DELETE /delete/<key>, with If-Match if the client wants it conditional."""
    key = key_from_path(request, "/delete/")
    condition = parse_condition(request, if_none_match=False)
    assert not isinstance(condition, _Unsatisfiable)  # If-None-Match is refused above
    try:
        deleted = await request.app[STORE_KEY].delete(key, condition)
    except PreconditionFailed as failed:
        raise _precondition_failed(failed) from None
    if not deleted:
        raise ApiError(404, "key_not_found", "This key has no value; nothing was deleted.")
    return _json({"key": key, "deleted": True})


async def list_keys(request: web.Request) -> web.Response:
    """GET /keys: a page of the keys under a prefix, in UTF-8 byte order, with a cursor."""
    settings = request.app[SETTINGS_KEY]
    query = parse_query(ListQuery, request.query)
    after = None if query.cursor is None else decode_cursor(query.cursor, settings)
    page = await request.app[STORE_KEY].list_keys(query.prefix, after, query.limit, query.values)
    items = []
    for listed in page.keys:
        item: dict[str, Any] = {
            "key": listed.key,
            "version": listed.version,
            "expires_at": None if listed.expires_at is None else rfc3339(listed.expires_at),
        }
        if query.values:
            item["val"] = listed.val
        items.append(item)
    cursor = encode_cursor(page.keys[-1].key) if page.more else None
    headers = {hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE, REVISION: str(page.revision)}
    return _json({"items": items, "cursor": cursor}, headers)


async def read_model(request: web.Request, model: type[Model]) -> Model:
    """The request body validated as ``model``, within the body limit."""
    settings = request.app[SETTINGS_KEY]
    return parse_body(model, await read_body(request, settings.max_body_bytes))


async def get_many(request: web.Request) -> web.Response:
    """POST /mget: values in request order; null for a key without one."""
    body = await read_model(request, MgetRequest)
    settings = request.app[SETTINGS_KEY]
    for index, key in enumerate(body.keys):
        check_text(settings, key, where=f"keys[{index}].")
    found = await request.app[STORE_KEY].get_many(body.keys)
    return _json({"items": [{"key": key, "val": found.get(key)} for key in body.keys]})


async def set_many(request: web.Request) -> web.Response:
    """POST /mset: every item in one transaction, or none of them."""
    body = await read_model(request, MsetRequest)
    settings = request.app[SETTINGS_KEY]
    for index, item in enumerate(body.items):
        check_text(settings, item.key, item.val, where=f"items[{index}].")
    items = [SetItem(item.key, item.val, item.ttl) for item in body.items]
    revision = await request.app[STORE_KEY].set_many(items)
    return _json({"count": len(items), "version": revision})


async def delete_many(request: web.Request) -> web.Response:
    """POST /mdelete: every key in one transaction; how many had a value."""
    body = await read_model(request, MdeleteRequest)
    settings = request.app[SETTINGS_KEY]
    for index, key in enumerate(body.keys):
        check_text(settings, key, where=f"keys[{index}].")
    return _json({"deleted": await request.app[STORE_KEY].delete_many(body.keys)})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 once the store answers, 503 while it does not."""
    store = request.app[STORE_KEY]
    try:
        await store.ping()
    except StoreError:
        return error_response(503, "store_unavailable", "The store does not answer.")
    return _json({"status": "ok", "store": store.name})


async def config(request: web.Request) -> web.Response:
    """GET /config: the effective settings, and the input.db actually used."""
    view = request.app[SETTINGS_KEY].public_view()
    used = request.app[INPUT_DB_KEY]
    view["input_db_used"] = None if used is None else str(used)
    return _json(view)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format."""
    recorded = request.app[METRICS_KEY]
    if recorded is None:
        raise ApiError(404, "not_found", "Metrics are off on this server (KV_METRICS=false).")
    store = request.app[STORE_KEY]
    body = recorded.render(await store.count(), await store.history())
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the API document."""
    return web.Response(body=request.app[OPENAPI_KEY], headers=JSON_HEADERS)


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Key-value store API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/docs.js"></script>
</body>
</html>
"""
# Everything the page loads comes from this server: no CDN, no font or validator service.
DOCS_HEADERS = {
    hdrs.CONTENT_TYPE: "text/html; charset=utf-8",
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


async def docs(request: web.Request) -> web.Response:
    """GET /docs: Swagger UI on this server's document, working offline."""
    return web.Response(text=DOCS_PAGE, headers=DOCS_HEADERS)


def _asset(
    request: web.Request, assets: Mapping[str, Path], page: str, headers: Mapping[str, str]
) -> web.FileResponse:
    """The file of ``assets`` named in the path; only those, so no path reaches the disk."""
    path = assets.get(request.match_info["name"])
    if path is None:
        raise ApiError(404, "not_found", f"No such file of {page}.")
    return web.FileResponse(path, headers=headers)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    """GET /docs/assets/{name}: one of the docs page's files."""
    return _asset(
        request, DOCS_ASSETS, "the docs page", {hdrs.CACHE_CONTROL: "public, max-age=86400"}
    )


UI = STATIC / "ui"
UI_ASSETS = {"app.js": UI / "app.js", "style.css": UI / "style.css"}
# The key browser's page: its own scripts and styles only, talking to this server only.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    hdrs.CACHE_CONTROL: "no-cache",
}


async def ui_page(request: web.Request) -> web.StreamResponse:
    """GET /ui/: the key browser."""
    return web.FileResponse(UI / "index.html", headers=UI_HEADERS)


async def ui_asset(request: web.Request) -> web.StreamResponse:
    """GET /ui/{name}: the key browser's script and styles."""
    return _asset(request, UI_ASSETS, "the key browser", UI_HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={hdrs.LOCATION: location})


async def ui_redirect(request: web.Request) -> web.Response:
    """GET /ui: to /ui/, where the page's relative paths work."""
    return _redirect("/ui/")


async def root(request: web.Request) -> web.Response:
    """GET /: a browser (it asks for HTML) goes to the key browser; an API client gets the
    JSON 404 it always got."""
    if "text/html" in request.headers.get(hdrs.ACCEPT, ""):
        return _redirect("/ui/")
    raise ApiError(404, "not_found", "No such endpoint; see /docs for the API.")


async def no_route(request: web.Request) -> web.Response:
    """Every request no route takes: 405 with Allow when another method would be answered at
    this path, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical == "/{path}":  # this fallback, which takes every method
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise ApiError(
            405,
            "method_not_allowed",
            "This endpoint does not accept that method; see Allow.",
            {hdrs.ALLOW: ",".join(sorted(allowed))},
        )
    raise ApiError(404, "not_found", "No such endpoint; see the README for the API.")
