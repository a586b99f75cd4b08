"""One small function per endpoint of the key-value API: validate, call the store, answer.

The wire rules they apply (a key's limits, a cursor, a version tag, a time) are rules.py's;
the pages a browser opens (the docs page, the key browser) are pages.py's.
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote

import orjson
from aiohttp import hdrs, web

from . import rules
from .access import require
from .errors import JSON_CONTENT_TYPE, JSON_HEADERS, NO_SUCH_ENDPOINT, ApiError, error_response
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .models import (
    ListQuery,
    MdeleteRequest,
    MgetRequest,
    MsetRequest,
    SetRequest,
    TxnCompare,
    TxnGetOperation,
    TxnOperationRequest,
    TxnRequest,
    TxnSetOperation,
)
from .rules import EXPIRES_AT, REVISION, VERSION_TAG, rfc3339, version_tag
from .settings import Settings
from .state import INPUT_DB_KEY, METRICS_KEY, OPENAPI_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import (
    Compare,
    CompareExists,
    CompareValue,
    CompareVersion,
    Condition,
    DeletedKey,
    DeletedPrefix,
    Entry,
    GotKey,
    IfAbsent,
    IfExists,
    IfVersion,
    LeaseNotFound,
    PreconditionFailed,
    SetItem,
    StoreError,
    TxnDelete,
    TxnDeletePrefix,
    TxnGet,
    TxnOperation,
    TxnOutcome,
    TxnSet,
)
from .validation import Model, parse_body, parse_query

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, headers: Mapping[str, str] = JSON_HEADERS, status: int = 200) -> web.Response:
    # orjson writes UTF-8 bytes directly, and prebuilt headers skip web.json_response's
    # per-call content-type handling (bench/results.md has the figures).
    return web.Response(body=orjson.dumps(data), headers=headers, status=status)


def entry_headers(entry: Entry) -> dict[str, str]:
    """The JSON headers plus the key's ETag (its version) and, if it expires, KV-Expires-At.

    Written out as literals: merging JSON_HEADERS into a new dict costs more than the rest."""
    tag = version_tag(entry.version)
    if entry.expires_at is None:
        return {hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE, hdrs.ETAG: tag}
    return {
        hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE,
        hdrs.ETAG: tag,
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
            match = VERSION_TAG.fullmatch(tag)
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
        {hdrs.ETAG: version_tag(failed.current)},
    )


def check_lease(ttl: Optional[float], lease: Optional[str], where: str) -> None:
    """A set's ttl and lease: not both (422 invalid_request); a lease no store could have
    made is LeaseNotFound (404) at once, so that the store never sees it."""
    if lease is None:
        return
    if ttl is not None:
        raise _invalid_request(
            f"{where}Give ttl or lease, not both: a key with a lease lives as long as it."
        )
    if rules.names_no_lease(lease):
        raise LeaseNotFound(lease)


def check_text(
    settings: Settings,
    key: str,
    val: Optional[str] = None,
    where: str = "",
    key_field: str = "key",
    val_field: str = "val",
) -> None:
    """ApiError when the key or the value breaks a rule of rules.broken_rule: longer than the
    settings allow, or holding a NUL character; ``where`` names the item of a batch
    (``items[3].``), and the fields' names are those the body gave them."""
    broken = rules.broken_rule(settings, key, val)
    if broken is not None:
        raise _broken_rule_error(settings, broken, where, key_field, val_field)


# A key or a value over its limit: the answer's status and code, and how it names the field
# when it is not an item of a batch.
_TOO_LONG = {
    rules.KEY_TOO_LONG: (422, "key_too_long", "The key"),
    rules.VALUE_TOO_LARGE: (413, "value_too_large", "The value"),
}


def _broken_rule_error(
    settings: Settings, broken: str, where: str, key_field: str = "key", val_field: str = "val"
) -> ApiError:
    in_val = broken in (rules.VALUE_TOO_LARGE, rules.NUL_IN_VAL)
    field = val_field if in_val else key_field
    too_long = _TOO_LONG.get(broken)
    if too_long is not None:
        status, code, alone = too_long
        limit = settings.max_value_bytes if in_val else settings.max_key_bytes
        subject = f"{where}{field}:" if where else alone
        return ApiError(
            status, code, f"{subject} is longer than the limit of {limit} bytes of UTF-8."
        )
    subject = f"{where}{field}:" if where else f"Field '{field}'"
    if broken == rules.EMPTY_KEY:  # the models and the path refuse it first, alike
        return ApiError(422, "empty_key", f"{subject} must not be empty.")
    return ApiError(
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
    check_lease(body.ttl, body.lease, "")
    require(request, write=(body.key,))
    if isinstance(condition, _Unsatisfiable):
        raise await _unsatisfiable(request, body.key)
    try:
        # A LeaseNotFound is 404 lease_not_found (errors.py), with nothing written.
        entry = await request.app[STORE_KEY].set(
            body.key, body.val, body.ttl, condition, body.lease
        )
    except PreconditionFailed as failed:
        raise _precondition_failed(failed) from None
    return _json({"key": body.key, "val": body.val}, entry_headers(entry))


async def get_value(request: web.Request) -> web.Response:
    """GET (and HEAD) /get/<key>: the body is exactly key and val; metadata is in headers."""
    key = key_from_path(request, "/get/")
    require(request, read=(key,))
    entry = await request.app[STORE_KEY].get(key)
    if entry is None:
        raise ApiError(404, "key_not_found", "This key has no value; set it with POST /set.")
    return _json({"key": key, "val": entry.val}, entry_headers(entry))


async def delete_value(request: web.Request) -> web.Response:
    """DELETE /delete/<key>, with If-Match if the client wants it conditional."""
    key = key_from_path(request, "/delete/")
    condition = parse_condition(request, if_none_match=False)
    assert not isinstance(condition, _Unsatisfiable)  # If-None-Match is refused above
    require(request, write=(key,))
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
    after = None if query.cursor is None else _cursor_key(query.cursor, settings)
    require(request, read_prefixes=(query.prefix,))
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
    cursor = rules.encode_cursor(page.keys[-1].key) if page.more else None
    headers = {hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE, REVISION: str(page.revision)}
    return _json({"items": items, "cursor": cursor}, headers)


def _cursor_key(cursor: str, settings: Settings) -> str:
    """The key a cursor resumes after; 422 invalid_parameter when it is not one of ours."""
    after = rules.decode_cursor(cursor, settings)
    if after is None:
        raise ApiError(
            422,
            "invalid_parameter",
            "Query parameter 'cursor' must be the cursor of a previous page, as given.",
        )
    return after


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
    require(request, read=body.keys)
    found = await request.app[STORE_KEY].get_many(body.keys)
    return _json({"items": [{"key": key, "val": found.get(key)} for key in body.keys]})


async def set_many(request: web.Request) -> web.Response:
    """POST /mset: every item in one transaction, or none of them."""
    body = await read_model(request, MsetRequest)
    settings = request.app[SETTINGS_KEY]
    for index, item in enumerate(body.items):
        check_text(settings, item.key, item.val, where=f"items[{index}].")
    require(request, write=[item.key for item in body.items])
    items = [SetItem(item.key, item.val, item.ttl) for item in body.items]
    revision = await request.app[STORE_KEY].set_many(items)
    return _json({"count": len(items), "version": revision})


async def delete_many(request: web.Request) -> web.Response:
    """POST /mdelete: every key in one transaction; how many had a value."""
    body = await read_model(request, MdeleteRequest)
    settings = request.app[SETTINGS_KEY]
    for index, key in enumerate(body.keys):
        check_text(settings, key, where=f"keys[{index}].")
    require(request, write=body.keys)
    return _json({"deleted": await request.app[STORE_KEY].delete_many(body.keys)})


async def transact(request: web.Request) -> web.Response:
    """POST /txn: the compares, then one branch, in one transaction and one revision."""
    body = await read_model(request, TxnRequest)
    settings = request.app[SETTINGS_KEY]
    _check_count(settings, "compare", len(body.compare))
    compares = [_compare(settings, index, compare) for index, compare in enumerate(body.compare)]
    success = _branch(settings, "success", body.success)
    failure = _branch(settings, "failure", body.failure)
    # Both branches, whichever runs: the compares decide that, and refusing only one would
    # tell the client how they came out.
    require_txn(request, compares, (*success, *failure))
    result = await request.app[STORE_KEY].txn(compares, success, failure)
    metrics = request.app[METRICS_KEY]
    if metrics is not None:
        metrics.observe_txn(result.succeeded)
    return _json(
        {
            "succeeded": result.succeeded,
            "revision": result.revision,
            "failed": result.failed,
            "results": [_txn_outcome(outcome) for outcome in result.results],
        }
    )


def require_txn(
    request: web.Request, compares: Sequence[Compare], operations: Sequence[TxnOperation]
) -> None:
    """require() of a transaction: the compares' keys and gets read, sets and deletes write."""
    read = [compare.key for compare in compares]
    write: list[str] = []
    prefixes: list[str] = []
    for operation in operations:
        if isinstance(operation, TxnGet):
            read.append(operation.key)
        elif isinstance(operation, TxnDeletePrefix):
            prefixes.append(operation.prefix)
        else:
            write.append(operation.key)
    require(request, read=read, write=write, write_prefixes=prefixes)


def _invalid_request(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def _check_count(settings: Settings, field: str, count: int) -> None:
    if count > settings.max_txn_ops:
        raise ApiError(
            422,
            "invalid_batch",
            f"Field '{field}' must hold at most {settings.max_txn_ops} entries "
            f"(KV_MAX_TXN_OPS), not {count}.",
        )


# The operators each kind of compare takes (a version takes them all).
_VALUE_OPERATORS = ("=", "!=")


def _compare(settings: Settings, index: int, compare: TxnCompare) -> Compare:
    where = f"compare[{index}]."
    check_text(settings, compare.key, compare.value, where, val_field="value")
    given = [name for name in ("version", "value", "exists") if getattr(compare, name) is not None]
    if len(given) != 1:
        raise _invalid_request(
            f"compare[{index}]: give exactly one of 'version', 'value' and 'exists'."
        )
    if compare.version is not None:
        return CompareVersion(compare.key, compare.version, compare.cmp)
    if compare.value is not None:
        if compare.cmp not in _VALUE_OPERATORS:
            raise _invalid_request(
                f"compare[{index}].cmp: a value compares with = or != only, not {compare.cmp}."
            )
        return CompareValue(compare.key, compare.value, "=" if compare.cmp == "=" else "!=")
    assert compare.exists is not None
    if compare.cmp != "=":
        raise _invalid_request(
            f"compare[{index}].cmp: exists compares with = only, not {compare.cmp}."
        )
    return CompareExists(compare.key, compare.exists)


def _branch(
    settings: Settings, name: str, operations: Sequence[TxnOperationRequest]
) -> list[TxnOperation]:
    """The branch's operations, each checked as the endpoint of its kind checks it; 422
    invalid_request when it writes a key twice (see _written_twice)."""
    _check_count(settings, name, len(operations))
    branch: list[TxnOperation] = []
    keys: list[str] = []  # the keys it sets or deletes
    prefixes: list[str] = []  # the prefixes it deletes
    for index, operation in enumerate(operations):
        where = f"{name}[{index}]."
        if isinstance(operation, TxnGetOperation):
            check_text(settings, operation.key, where=where)
            branch.append(TxnGet(operation.key))
        elif isinstance(operation, TxnSetOperation):
            check_text(settings, operation.key, operation.val, where)
            branch.append(TxnSet(operation.key, operation.val, operation.ttl, operation.lease))
            keys.append(operation.key)
        elif (operation.key is None) == (operation.prefix is None):
            raise _invalid_request(
                f"{name}[{index}]: a delete takes exactly one of 'key' and 'prefix'."
            )
        elif operation.key is not None:
            check_text(settings, operation.key, where=where)
            branch.append(TxnDelete(operation.key))
            keys.append(operation.key)
        else:
            assert operation.prefix is not None
            if operation.prefix:  # the empty prefix is every key
                check_text(settings, operation.prefix, where=where, key_field="prefix")
            branch.append(TxnDeletePrefix(operation.prefix))
            prefixes.append(operation.prefix)
    twice = _written_twice(keys, prefixes)
    if twice is not None:
        raise _invalid_request(f"{name}: {twice}; a transaction writes each key once.")
    # After every 422 of the branch: a lease id that no store could have made is then 404, in
    # either branch, as every check of the request's shape is; a well-formed one that names no
    # live lease is the store's to find, in the branch that runs.
    sets = [
        (index, operation)
        for index, operation in enumerate(operations)
        if isinstance(operation, TxnSetOperation) and operation.lease is not None
    ]
    for index, operation in sets:
        if operation.ttl is not None:
            check_lease(operation.ttl, operation.lease, f"{name}[{index}]: ")
    for index, operation in sets:
        check_lease(None, operation.lease, f"{name}[{index}]: ")
    return branch


def _written_twice(keys: Sequence[str], prefixes: Sequence[str]) -> Optional[str]:
    """What writes a key twice among a branch's sets and deletes of ``keys`` and deletes of
    ``prefixes``, said in a sentence, or None: a key twice, a key under a deleted prefix, or
    two prefixes of which one starts with the other (as etcd refuses a put inside a deleted
    range). In sorted order the keys under a prefix follow it at once, so each check is a
    sort and a look at neighbours."""
    ordered = sorted(keys)
    for earlier, later in zip(ordered, ordered[1:]):
        if earlier == later:
            return f"the key {_shown(later)} is written twice"
    ordered_prefixes = sorted(prefixes)
    for earlier, later in zip(ordered_prefixes, ordered_prefixes[1:]):
        if later.startswith(earlier):
            return (
                f"the prefixes {_shown(earlier)} and {_shown(later)} both delete the keys "
                f"under {_shown(later)}"
            )
    for prefix in ordered_prefixes:
        position = bisect.bisect_left(ordered, prefix)
        if position < len(ordered) and ordered[position].startswith(prefix):
            return (
                f"the key {_shown(ordered[position])} is written twice, as the delete of the "
                f"prefix {_shown(prefix)} covers it"
            )
    return None


def _shown(text: str) -> str:
    """A key or prefix in a message, as JSON writes it (so that any character shows)."""
    return orjson.dumps(text).decode()


def _txn_outcome(outcome: TxnOutcome) -> dict[str, Any]:
    if isinstance(outcome, GotKey):
        return {"key": outcome.key, "val": outcome.val, "version": outcome.version}
    if isinstance(outcome, DeletedKey):
        return {"key": outcome.key, "deleted": outcome.deleted}
    if isinstance(outcome, DeletedPrefix):
        return {"prefix": outcome.prefix, "deleted": outcome.deleted}
    return {"key": outcome.key, "version": outcome.version}


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
    require(request, admin=True)
    view = request.app[SETTINGS_KEY].public_view()
    used = request.app[INPUT_DB_KEY]
    view["input_db_used"] = None if used is None else str(used)
    return _json(view)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format."""
    require(request, admin=True)
    recorded = request.app[METRICS_KEY]
    if recorded is None:
        raise ApiError(404, "not_found", "Metrics are off on this server (KV_METRICS=false).")
    store = request.app[STORE_KEY]
    body = recorded.render(await store.count(), await store.history(), await store.live_leases())
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the API document."""
    return web.Response(body=request.app[OPENAPI_KEY], headers=JSON_HEADERS)


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
    raise ApiError(404, "not_found", NO_SUCH_ENDPOINT)
