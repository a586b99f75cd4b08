"""One small function per endpoint: validate, call the store, answer."""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import unquote

import orjson
from aiohttp import web

from .errors import JSON_HEADERS, ApiError, error_response
from .settings import Settings
from .state import INPUT_DB_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import StoreError

_SET_FIELDS = ("key", "val")
# Likely names for "val", each answered with a hint instead of a bare "unknown field".
_VAL_MISSPELLINGS = {"value", "values", "v", "data"}


def _json(data: dict[str, Any]) -> web.Response:
    # orjson writes UTF-8 bytes directly, ten times faster than json.dumps; with prebuilt
    # headers this answer costs a third of web.json_response.
    return web.Response(body=orjson.dumps(data), headers=JSON_HEADERS)


def _invalid(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)


def _loads(body: bytes) -> Any:
    """JSON by orjson, which refuses escaped lone surrogates; json then parses those too, so
    that a body that is valid JSON is judged by the field rules, not called malformed."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_set_body(body: bytes) -> tuple[str, str]:
    """The key and value of a /set body; ApiError (400 or 422) says what is wrong with it."""
    try:
        document = _loads(body)
    except json.JSONDecodeError as error:
        raise ApiError(
            400,
            "invalid_json",
            f"The request body is not valid JSON: {error.msg} at line {error.lineno} "
            f"column {error.colno} (character {error.pos}).",
        ) from None
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "The request body is not UTF-8 encoded JSON.") from None
    if not isinstance(document, dict):
        raise _invalid(
            "invalid_body",
            f"The request body must be a JSON object with string fields 'key' and 'val', "
            f"not {_json_type(document)}.",
        )
    for name in document:
        if name not in _SET_FIELDS:
            hint = " Did you mean 'val'?" if name.lower() in _VAL_MISSPELLINGS else ""
            raise _invalid(
                "unknown_field",
                f"Unknown field '{name}': the body takes only 'key' and 'val'.{hint}",
            )
    for name in _SET_FIELDS:
        if name not in document:
            raise _invalid("missing_field", f"Field '{name}' is required.")
        value = document[name]
        if not isinstance(value, str):
            raise _invalid(
                "invalid_type", f"Field '{name}' must be a string, not {_json_type(value)}."
            )
        if not _is_encodable(value):
            raise _invalid(
                "invalid_string",
                f"Field '{name}' contains an unpaired UTF-16 surrogate, which is not text.",
            )
    key, val = document["key"], document["val"]
    if not key:
        raise _invalid("empty_key", "Field 'key' must not be empty.")
    return key, val


def _is_encodable(text: str) -> bool:
    # JSON's \\ud800-style escapes can produce lone surrogates, which UTF-8 cannot carry.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def utf8_length_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes of UTF-8 (encoding only when it may)."""
    # A character is at most 4 bytes and at least 1: most texts are decided by their length.
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode("utf-8")) > limit


def check_lengths(settings: Settings, key: str, val: Optional[str] = None) -> None:
    """ApiError when the key or the value is longer than the settings allow."""
    if utf8_length_exceeds(key, settings.max_key_bytes):
        raise _invalid(
            "key_too_long",
            f"The key is longer than the limit of {settings.max_key_bytes} bytes of UTF-8.",
        )
    if val is not None and utf8_length_exceeds(val, settings.max_value_bytes):
        raise ApiError(
            413,
            "value_too_large",
            f"The value is longer than the limit of {settings.max_value_bytes} bytes of UTF-8.",
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
    check_lengths(request.app[SETTINGS_KEY], key)
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
    key, val = parse_set_body(await read_body(request, settings.max_body_bytes))
    check_lengths(settings, key, val)
    await request.app[STORE_KEY].set(key, val)
    return _json({"key": key, "val": val})


async def get_value(request: web.Request) -> web.Response:
    """GET (and HEAD) /get/<key>."""
    key = key_from_path(request, "/get/")
    val = await request.app[STORE_KEY].get(key)
    if val is None:
        raise ApiError(404, "key_not_found", "This key has no value; set it with POST /set.")
    return _json({"key": key, "val": val})


async def delete_value(request: web.Request) -> web.Response:
    """DELETE /delete/<key>."""
    key = key_from_path(request, "/delete/")
    if not await request.app[STORE_KEY].delete(key):
        raise ApiError(404, "key_not_found", "This key has no value; nothing was deleted.")
    return _json({"key": key, "deleted": True})


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
