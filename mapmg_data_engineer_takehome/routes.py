"""The URL map and each endpoint's contract: its handler, models, headers and error codes,
and the summary and description the API document serves.

ENDPOINTS is the one table both the server (setup_routes) and the API document (openapi.py)
are built from, so that neither can have a route the other lacks. The descriptions here are
the document's own words, served as written; the guide to the API is docs/api.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from aiohttp import hdrs, web
from pydantic import BaseModel

from . import bulk, handlers, leases, models, pages, responses, tokens, watch
from .middleware import Wrap
from .rules import ETAG, EXPIRES_AT, LAST_EVENT_ID, REVISION, REVISION_DIGITS


@dataclass(frozen=True)
class HeaderDoc:
    """A request or response header, as the API document describes it."""

    name: str
    description: str
    pattern: Optional[str] = None


@dataclass(frozen=True)
class Endpoint:
    """One route: how the server serves it and how the document describes it."""

    name: str  # the operation's id
    methods: tuple[str, ...]
    path: str  # aiohttp's pattern
    route: str  # the pattern the document and the logs name
    handler: handlers.Handler
    summary: str
    description: str = ""
    body: Optional[type[BaseModel]] = None
    body_type: str = "application/json"  # NDJSON: a body of lines, each one ``body``
    query: Optional[type[BaseModel]] = None
    response: Optional[type[BaseModel]] = None
    content_type: Optional[str] = None  # of a 200 that is not JSON
    stream_type: Optional[str] = None  # of a 200 that streams, when the request asks for it
    request_headers: tuple[HeaderDoc, ...] = ()
    response_headers: tuple[HeaderDoc, ...] = ()
    errors: tuple[tuple[int, tuple[str, ...]], ...] = ()  # (status, error codes)
    success: int = 200  # the status of its answer when all goes well
    public: bool = False  # needs no bearer token
    example: Optional[dict[str, Any]] = None
    # OpenAPI links from the 200 answer to operations that can follow it, for clients and
    # schemathesis' stateful phase: {link name: (operation id, {parameter: expression})}.
    links: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = ()


IF_MATCH_DOC = HeaderDoc(
    str(hdrs.IF_MATCH),
    'Write only if the key exists at this version ("12", as ETag gives it), or exists at all (*).',
    f'^(\\*|"{REVISION_DIGITS}")$',
)
IF_NONE_MATCH_DOC = HeaderDoc(
    str(hdrs.IF_NONE_MATCH), "*: write only if the key does not exist (create).", r"^\*$"
)
ETAG_DOC = HeaderDoc(ETAG, 'The key\'s version, in double quotes: "12".')
EXPIRES_AT_DOC = HeaderDoc(
    EXPIRES_AT, "When the key expires, RFC 3339 UTC with milliseconds; absent if never."
)
REVISION_DOC = HeaderDoc(
    REVISION,
    "The store's revision the page was read at: watch /changes from it (since) to follow "
    "these keys with nothing missed.",
)
LAST_EVENT_ID_DOC = HeaderDoc(
    LAST_EVENT_ID,
    "Resume a stream after this revision (an EventSource sends the last id it saw); wins "
    "over since.",
    f"^{REVISION_DIGITS}$",
)
BODY_ERRORS = (
    (400, ("invalid_json",)),
    (413, ("body_too_large",)),
    (422, ("invalid_body", "missing_field", "unknown_field", "invalid_type", "empty_key")),
)
KEY_ERRORS = ((422, ("key_too_long", "invalid_string")),)
UNAVAILABLE = ((503, ("store_unavailable",)),)
# A key or prefix the request's token does not cover (access.require), or an admin route
# asked by a token that is not admin.
FORBIDDEN = ((403, ("forbidden",)),)
# POST /mget and /mdelete: a body of 1 to a limit of keys.
KEYS_BATCH_ERRORS = (
    *BODY_ERRORS,
    *KEY_ERRORS,
    *UNAVAILABLE,
    *FORBIDDEN,
    (422, ("invalid_batch",)),
)

NOT_FOUND = ((404, ("not_found",)),)
LEASE_NOT_FOUND = ((404, ("lease_not_found",)),)
# The token endpoints: admin only, and refused on a server without KV_AUTH_TOKEN.
ADMIN_ONLY = ((403, ("forbidden",)),)
TOKEN_NOT_FOUND = ((404, ("token_not_found",)),)
TOKEN_BODY_ERRORS = (
    (400, ("invalid_json",)),
    (413, ("body_too_large",)),
    (422, ("invalid_body", "missing_field", "unknown_field", "invalid_type", "invalid_string")),
)
CREATE_TOKEN_ERRORS = (
    *TOKEN_BODY_ERRORS,
    (409, ("token_exists",)),
    (422, ("invalid_name", "invalid_rules", "invalid_seconds", "key_too_long")),
)


def _page(
    name: str,
    path: str,
    handler: handlers.Handler,
    summary: str,
    description: str = "",
    **contract: Any,
) -> Endpoint:
    """A GET a browser opens: the docs page, the key browser, and what they load. Public, as a
    browser cannot send a bearer token to open a page: each page asks for the token, if any,
    and sends it with its API requests."""
    return Endpoint(
        name, ("GET",), path, path, handler, summary, description, public=True, **contract
    )


def _files(name: str, path: str, handler: handlers.Handler, summary: str) -> Endpoint:
    """A page's files (scripts, styles), each named in the path; 404 for any other name."""
    return _page(
        name, path, handler, summary, content_type="application/octet-stream", errors=NOT_FOUND
    )


def _admin(
    name: str,
    method: str,
    path: str,
    handler: handlers.Handler,
    summary: str,
    description: str,
    errors: tuple[tuple[int, tuple[str, ...]], ...] = (),
    **contract: Any,
) -> Endpoint:
    """A token endpoint: admin only, and refused on a server without KV_AUTH_TOKEN (403)."""
    return Endpoint(
        name,
        (method,),
        path,
        path,
        handler,
        summary,
        f"Admin only. {description}".strip(),
        errors=(*ADMIN_ONLY, *UNAVAILABLE, *errors),
        **contract,
    )


def _keys_batch(
    name: str,
    handler: handlers.Handler,
    summary: str,
    description: str,
    body: type[BaseModel],
    response: type[BaseModel],
    example: dict[str, Any],
) -> Endpoint:
    """POST /<name> with a body of keys, 1 to the model's limit of them, in one transaction."""
    return Endpoint(
        name,
        ("POST",),
        f"/{name}",
        f"/{name}",
        handler,
        summary,
        description,
        body=body,
        response=response,
        errors=KEYS_BATCH_ERRORS,
        example=example,
    )


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "set",
        ("POST",),
        "/set",
        "/set",
        handlers.set_value,
        "Store a value under a key",
        "Overwrites any earlier value; without ttl, removes any earlier expiry. With lease "
        "(not with ttl), the key lives as long as that lease, and shows its expiry; without "
        "one, it leaves any lease it had. The body is read as JSON whatever Content-Type "
        "says.",
        body=models.SetRequest,
        response=responses.KeyValue,
        request_headers=(IF_MATCH_DOC, IF_NONE_MATCH_DOC),
        response_headers=(ETAG_DOC, EXPIRES_AT_DOC),
        errors=(
            *BODY_ERRORS,
            *KEY_ERRORS,
            *UNAVAILABLE,
            *FORBIDDEN,
            (400, ("invalid_header",)),
            *LEASE_NOT_FOUND,
            (412, ("precondition_failed",)),
            (413, ("value_too_large",)),
            (422, ("invalid_ttl", "invalid_request")),
        ),
        example={"key": "user:1", "val": "Ada", "ttl": 3600},
        links=(
            ("GetTheKey", "get", (("key", "$request.body#/key"),)),
            ("DeleteTheKey", "delete", (("key", "$request.body#/key"),)),
        ),
    ),
    Endpoint(
        "get",
        ("GET", "HEAD"),
        r"/get/{key:[\s\S]+}",
        "/get/{key}",
        handlers.get_value,
        "Read a key's value",
        "The body is exactly key and val; the version and expiry are in headers.",
        response=responses.KeyValue,
        response_headers=(ETAG_DOC, EXPIRES_AT_DOC),
        errors=(
            *KEY_ERRORS,
            *UNAVAILABLE,
            *FORBIDDEN,
            (400, ("invalid_key",)),
            (404, ("key_not_found",)),
        ),
    ),
    Endpoint(
        "delete",
        ("DELETE",),
        r"/delete/{key:[\s\S]+}",
        "/delete/{key}",
        handlers.delete_value,
        "Delete a key",
        request_headers=(IF_MATCH_DOC,),
        response=responses.Deleted,
        errors=(
            *KEY_ERRORS,
            *UNAVAILABLE,
            *FORBIDDEN,
            (400, ("invalid_key", "invalid_header")),
            (404, ("key_not_found",)),
            (412, ("precondition_failed",)),
        ),
    ),
    Endpoint(
        "list",
        ("GET",),
        "/keys",
        "/keys",
        handlers.list_keys,
        "List keys by prefix, a page at a time",
        "Keys in ascending order of their UTF-8 bytes; pass the answer's cursor for the next "
        "page. A page with values stops early once its values pass 4 Mi characters.",
        query=models.ListQuery,
        response=responses.ListPage,
        response_headers=(REVISION_DOC,),
        errors=(*UNAVAILABLE, *FORBIDDEN, (422, ("invalid_parameter",))),
    ),
    Endpoint(
        "changes",
        ("GET",),
        "/changes",
        "/changes",
        watch.changes,
        "Watch for changes: long-poll, or a stream of Server-Sent Events",
        "The changes to keys under prefix in revisions above since, in revision order. As "
        "JSON (a long-poll): at once when there are some, else when the first commits, or an "
        "answer without events after timeout; pass its next as since the next time. With "
        "Accept: text/event-stream, a stream: each change is an event named set, delete or "
        "expire with the same object as its data, and the last event of each revision has "
        "the revision as its id; when idle, a progress event every KV_CHANGES_HEARTBEAT "
        "seconds has the store's revision as its id. Resume from the last id seen "
        "(Last-Event-ID). A since the history no longer holds is 410 compacted (list again, "
        "then watch from the listing's KV-Revision); one above the store's revision is 410 "
        "unknown_revision.",
        query=models.ChangesQuery,
        response=responses.ChangesAnswer,
        stream_type=watch.EVENT_STREAM,
        request_headers=(LAST_EVENT_ID_DOC,),
        errors=(
            *UNAVAILABLE,
            *FORBIDDEN,
            (400, ("invalid_header",)),
            (410, ("compacted", "unknown_revision")),
            (422, ("invalid_parameter",)),
        ),
    ),
    Endpoint(
        "export",
        ("GET",),
        "/export",
        "/export",
        bulk.export,
        "Export every live key under a prefix, as one consistent snapshot",
        "NDJSON, one BulkLine a line, in ascending order of the keys' UTF-8 bytes, as of "
        "the revision in KV-Revision: a write is wholly in it or wholly out. Streamed as the "
        "client reads it; a client that reads nothing for KV_CLIENT_TIMEOUT is cut off. An "
        "error once the answer has begun closes the connection before the body's end, so "
        "that a cut export never looks whole. POST /import takes it back.",
        query=models.ExportQuery,
        content_type=bulk.NDJSON,
        response_headers=(
            HeaderDoc(
                REVISION,
                "The store's revision the export was read at: watch /changes from it.",
            ),
        ),
        errors=(*UNAVAILABLE, *FORBIDDEN, (422, ("invalid_parameter",))),
    ),
    Endpoint(
        "import",
        ("POST",),
        "/import",
        "/import",
        bulk.import_,
        "Import keys from NDJSON (an export), all or nothing, in one revision",
        "The body (up to KV_MAX_IMPORT_BYTES, streamed) is one BulkLine a line; each obeys "
        "the rules and limits of POST /set, and a line whose expires_at has passed is "
        "skipped. The last line for a key wins. The first bad line is a 422 invalid_line "
        "naming it, and nothing is stored. All the keys take one revision, which is a bulk "
        "load rather than events: watchers from before it get 410 compacted and list again.",
        body=models.BulkLine,
        body_type=bulk.NDJSON,
        query=models.ImportQuery,
        response=responses.ImportAnswer,
        errors=(
            *UNAVAILABLE,
            *FORBIDDEN,
            (408, ("request_timeout",)),
            (413, ("body_too_large",)),
            (422, ("invalid_parameter", "invalid_line")),
        ),
    ),
    _keys_batch(
        "mget",
        handlers.get_many,
        f"Read up to {models.MAX_MGET_KEYS} keys",
        "Answers in request order; null for a key without a value.",
        models.MgetRequest,
        responses.MgetAnswer,
        {"keys": ["user:1", "user:2"]},
    ),
    Endpoint(
        "mset",
        ("POST",),
        "/mset",
        "/mset",
        handlers.set_many,
        f"Write up to {models.MAX_BATCH_WRITES:,} items, all or none",
        "One transaction; the last item for a key wins, and all take one version.",
        body=models.MsetRequest,
        response=responses.MsetAnswer,
        errors=(
            *BODY_ERRORS,
            *KEY_ERRORS,
            *UNAVAILABLE,
            *FORBIDDEN,
            (413, ("value_too_large",)),
            (422, ("invalid_ttl", "invalid_batch")),
        ),
        example={"items": [{"key": "a", "val": "1"}, {"key": "b", "val": "2", "ttl": 60}]},
    ),
    Endpoint(
        "txn",
        ("POST",),
        "/txn",
        "/txn",
        handlers.transact,
        "Compare, then write several keys, in one transaction and one revision",
        "Every compare is evaluated in order; when all hold, success runs, else failure "
        "(failed is the index of the first that did not hold: a false compare is not an "
        "error). The operations of the branch run in order, each seeing what the earlier "
        "ones did, and every change they make takes one revision, one event each in the "
        "change feed; a branch that changes nothing takes none. A missing or expired key "
        "has version 0 and no value. A branch may write a key once (a delete of a prefix "
        "writes every key under it). At most KV_MAX_TXN_OPS compares, and as many "
        "operations per branch. A set of the branch that runs naming a lease that does not "
        "exist is 404 lease_not_found, and nothing is written.",
        body=models.TxnRequest,
        response=responses.TxnAnswer,
        errors=(
            *BODY_ERRORS,
            *KEY_ERRORS,
            *UNAVAILABLE,
            *FORBIDDEN,
            *LEASE_NOT_FOUND,
            (413, ("value_too_large",)),
            (422, ("invalid_ttl", "invalid_batch", "invalid_request")),
        ),
        example={
            "compare": [{"key": "cfg/mode", "value": "blue"}],
            "success": [{"op": "set", "key": "cfg/mode", "val": "green"}],
            "failure": [{"op": "get", "key": "cfg/mode"}],
        },
    ),
    Endpoint(
        "grant_lease",
        ("POST",),
        "/leases",
        "/leases",
        leases.grant,
        "Grant a lease: keys set with it live as long as it does",
        "The lease expires ttl seconds from now unless kept alive. Takes no revision.",
        body=models.LeaseRequest,
        response=responses.LeaseAnswer,
        errors=(
            (400, ("invalid_json",)),
            (413, ("body_too_large",)),
            *UNAVAILABLE,
            (
                422,
                ("invalid_body", "missing_field", "unknown_field", "invalid_type", "invalid_ttl"),
            ),
        ),
        example={"ttl": 30},
        links=(
            ("KeepTheLeaseAlive", "keepalive_lease", (("id", "$response.body#/id"),)),
            ("ReadTheLease", "get_lease", (("id", "$response.body#/id"),)),
            ("RevokeTheLease", "revoke_lease", (("id", "$response.body#/id"),)),
        ),
    ),
    Endpoint(
        "keepalive_lease",
        ("POST",),
        "/leases/{id}/keepalive",
        "/leases/{id}/keepalive",
        leases.keepalive,
        "Keep a lease alive: it and its keys expire ttl seconds from now",
        "Writes no revision and no change event. A lease that has expired or was revoked "
        "is 404 lease_not_found: grant a new one.",
        response=responses.LeaseAnswer,
        errors=(*UNAVAILABLE, *FORBIDDEN, *LEASE_NOT_FOUND),
    ),
    Endpoint(
        "keepalive_leases",
        ("POST",),
        "/leases/keepalive",
        "/leases/keepalive",
        leases.keepalive_many,
        "Keep many leases alive at once: each as its own keepalive would",
        "All in one transaction; writes no revision and no change event. The answer names "
        "the ids that are no live lease (expired, revoked or never granted), which is not "
        "an error.",
        body=models.KeepaliveRequest,
        response=responses.KeepaliveAnswer,
        errors=(
            (400, ("invalid_json",)),
            (413, ("body_too_large",)),
            *UNAVAILABLE,
            (
                422,
                ("invalid_body", "missing_field", "unknown_field", "invalid_type", "invalid_batch"),
            ),
        ),
        example={"ids": ["6f1c2a9e0b8d4f3a7c5e1d2b9a8f7e6d"]},
    ),
    Endpoint(
        "get_lease",
        ("GET",),
        "/leases/{id}",
        "/leases/{id}",
        leases.read,
        "Read a lease: its expiry and its keys",
        response=responses.LeaseKeysAnswer,
        errors=(*UNAVAILABLE, *FORBIDDEN, *LEASE_NOT_FOUND),
    ),
    Endpoint(
        "revoke_lease",
        ("DELETE",),
        "/leases/{id}",
        "/leases/{id}",
        leases.revoke,
        "Revoke a lease: its keys are deleted, in one revision",
        "Each key gets a delete event, all in one revision (none when it had no keys).",
        response=responses.LeaseRevoked,
        errors=(*UNAVAILABLE, *FORBIDDEN, *LEASE_NOT_FOUND),
    ),
    _admin(
        "create_token",
        "POST",
        "/tokens",
        tokens.create,
        "Create an access token: its secret is answered this once",
        "A request with the token may read or write only the keys and prefixes "
        "its rules cover (readwrite: both; read: reading); with admin, it may also manage "
        "tokens and read /config and /metrics. The server keeps the secret's SHA-256, never "
        "the secret. A server without KV_AUTH_TOKEN refuses every token endpoint with 403.",
        body=models.TokenRequest,
        response=responses.TokenSecret,
        errors=CREATE_TOKEN_ERRORS,
        example={
            "name": "billing",
            "rules": [
                {"prefix": "billing/", "access": "readwrite"},
                {"prefix": "cfg/", "access": "read"},
            ],
            "admin": False,
            "expires_in": 86400,
        },
        links=(
            ("RotateTheToken", "rotate_token", (("name", "$response.body#/name"),)),
            ("RevokeTheToken", "revoke_token", (("name", "$response.body#/name"),)),
        ),
    ),
    _admin(
        "list_tokens",
        "GET",
        "/tokens",
        tokens.list_,
        "List the access tokens: never a secret or its hash",
        "",
        response=responses.TokenList,
    ),
    Endpoint(
        "whoami",
        ("GET",),
        "/tokens/self",
        "/tokens/self",
        tokens.whoami,
        "What the calling token may do: its name, rules and admin flag",
        "Any token. On a server without KV_AUTH_TOKEN, every request may do everything: "
        'the name is null, and the one rule covers every key (prefix "") read and write.',
        response=responses.TokenSelf,
    ),
    _admin(
        "rotate_token",
        "POST",
        "/tokens/{name}/rotate",
        tokens.rotate,
        "Rotate a token's secret: the new one is answered this once",
        "The old secret stops at once, or keeps working for grace seconds (at "
        "most a day) while the new one is rolled out. An empty body is {}.",
        body=models.RotateRequest,
        response=responses.TokenSecret,
        errors=(*TOKEN_BODY_ERRORS, *TOKEN_NOT_FOUND, (422, ("invalid_seconds",))),
        example={"grace": 3600},
    ),
    _admin(
        "revoke_token",
        "DELETE",
        "/tokens/{name}",
        tokens.revoke,
        "Revoke a token: it stops working at once, on every server",
        "",
        response=responses.TokenRevoked,
        errors=TOKEN_NOT_FOUND,
    ),
    _keys_batch(
        "mdelete",
        handlers.delete_many,
        f"Delete up to {models.MAX_BATCH_WRITES:,} keys",
        "One transaction; counts the keys that had a value.",
        models.MdeleteRequest,
        responses.MdeleteAnswer,
        {"keys": ["a", "b"]},
    ),
    Endpoint(
        "health",
        ("GET",),
        "/health",
        "/health",
        handlers.health,
        "Readiness: 200 while the store answers",
        response=responses.Health,
        errors=UNAVAILABLE,
        public=True,  # readiness probes carry no token
    ),
    Endpoint(
        "config",
        ("GET",),
        "/config",
        "/config",
        handlers.config,
        "The effective settings",
        'Secrets (the token, the PostgreSQL URL) as "**********".',
        response=responses.ConfigView,
        errors=FORBIDDEN,
    ),
    Endpoint(
        "metrics",
        ("GET",),
        "/metrics",
        "/metrics",
        handlers.metrics,
        "Prometheus metrics",
        "The text exposition format; totals over every worker.",
        content_type="text/plain",
        errors=FORBIDDEN,
    ),
    Endpoint(
        "openapi",
        ("GET",),
        "/openapi.json",
        "/openapi.json",
        handlers.openapi,
        "This document",
        content_type="application/json",
        public=True,  # the API's shape is no secret, and the docs page loads it
    ),
    _page(
        "docs",
        "/docs",
        pages.docs,
        "Interactive documentation (Swagger UI), offline",
        "Public, as a browser cannot send a bearer token to open a page: its Authorize "
        "button takes the token for the requests it sends.",
        content_type="text/html",
    ),
    _files(
        "docs_asset", "/docs/assets/{name}", pages.docs_asset, "The docs page's scripts and styles"
    ),
    _page("ui", "/ui/", pages.ui_page, "The key browser", content_type="text/html"),
    _files("ui_asset", "/ui/{name}", pages.ui_asset, "The key browser's script and styles"),
    _page("ui_redirect", "/ui", pages.ui_redirect, "To /ui/", success=302),
    _page(
        "root",
        "/",
        pages.root,
        "To the key browser, for a browser",
        "302 to /ui/ when the request accepts text/html; otherwise 404, as for any path "
        "that is not an endpoint.",
        success=302,
        errors=NOT_FOUND,
    ),
)


def setup_routes(app: web.Application, wrap: Wrap) -> None:
    """Register every endpoint, each handler wrapped (see middleware.py)."""
    for endpoint in ENDPOINTS:
        wrapped = wrap(endpoint.handler, endpoint.route, public=endpoint.public)
        for method in endpoint.methods:
            if method == "GET":
                app.router.add_get(endpoint.path, wrapped, allow_head="HEAD" in endpoint.methods)
            elif method != "HEAD":  # add_get serves HEAD
                app.router.add_route(method, endpoint.path, wrapped)
    # Last: whatever no route above takes gets a JSON 404, or 405 with Allow.
    app.router.add_route("*", "/{path:.*}", wrap(handlers.no_route, "unmatched"))
