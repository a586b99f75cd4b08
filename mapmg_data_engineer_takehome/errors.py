"""The error types, and how every failure is rendered as one JSON shape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import orjson
import structlog
from aiohttp import hdrs, web

from .store.base import LeaseNotFound, StoreError, StoreUnavailable

log = structlog.get_logger("kv.errors")

# Every answer is JSON; a prebuilt header dict is the cheapest way to say so.
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
JSON_HEADERS: dict[str, str] = {hdrs.CONTENT_TYPE: JSON_CONTENT_TYPE}


class StartupError(Exception):
    """The server cannot start; the message is one line naming the file or setting at fault."""


# Exceptions whose messages are built from paths, settings and the OS's or the store's own
# words, never from a request's data. Any other message (a KeyError's is the key itself, and
# a driver error escaping a store may quote a value) is withheld.
_SAFE_MESSAGE_TYPES = (StoreError, StartupError, OSError)
WITHHELD = "[message withheld: it may hold request data]"


def safe_message(error: BaseException) -> str:
    """The exception's message where it cannot hold request data, else WITHHELD.

    Even the messages kept are cut at their first quote, since a library quotes what it could
    not handle (SQLite's ``Could not decode to UTF-8 column 'val' with text '...'``).
    """
    if not isinstance(error, _SAFE_MESSAGE_TYPES):
        return WITHHELD
    message = str(error)
    for quote in ("'", '"'):
        message = message.split(quote, 1)[0]
    return message.rstrip()


class ApiError(Exception):
    """A failure a client caused or can act on, rendered as ``{"error", "message"}`` and
    ``details``, fields a client can act on (the compact revision of a 410)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Optional[Mapping[str, str]] = None,
        details: Optional[Mapping[str, object]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details


def error_response(
    status: int,
    code: str,
    message: str,
    headers: Optional[Mapping[str, str]] = None,
    details: Optional[Mapping[str, object]] = None,
) -> web.Response:
    """The one shape every non-2xx answer has."""
    body = orjson.dumps({"error": code, "message": message, **(details or {})})
    all_headers: dict[str, str] = {**JSON_HEADERS, **(headers or {})}
    return web.Response(body=body, status=status, headers=all_headers)


# A lease that was never granted, was revoked, or has expired (store.base.LeaseNotFound): the
# same answer wherever a request names one, and nothing was written.
LEASE_NOT_FOUND = (
    "lease_not_found",
    "No such lease: it was never granted, was revoked, or has expired; nothing was written. "
    "Grant a new one with POST /leases.",
)
# A path no route takes, whether aiohttp or the fallback route (handlers.no_route) answers.
NO_SUCH_ENDPOINT = "No such endpoint; see the README for the API."
# aiohttp raises these itself (routing, body size); each gets a code and a sentence to act on.
HTTP_ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", NO_SUCH_ENDPOINT),
    405: ("method_not_allowed", "This endpoint does not accept that method; see Allow."),
    413: ("body_too_large", "The request body is larger than the server accepts."),
}
# Headers of aiohttp's own error responses worth keeping (Allow on 405, for one).
_KEPT_HEADERS = (hdrs.ALLOW, hdrs.WWW_AUTHENTICATE, hdrs.RETRY_AFTER)


def _render_http_exception(error: web.HTTPException) -> web.Response:
    code, message = HTTP_ERRORS.get(
        error.status, (error.reason.lower().replace(" ", "_"), f"{error.reason}.")
    )
    headers = {str(name): error.headers[name] for name in _KEPT_HEADERS if name in error.headers}
    return error_response(error.status, code, message, headers)


def response_for(
    request: web.Request, error: Exception, request_id: str, route: str
) -> web.Response:
    """The JSON answer to an exception a handler raised; 500s hide internals, log the traceback.
    ``route`` is the handler's route pattern, which the log gives instead of the path (a key).

    Re-raises what is not a failure: aiohttp's redirects (HTTPException below 400).
    """
    if isinstance(error, ApiError):
        return error_response(error.status, error.code, error.message, error.headers, error.details)
    if isinstance(error, LeaseNotFound):
        return error_response(404, *LEASE_NOT_FOUND)
    if isinstance(error, web.HTTPException):
        if error.status < 400:
            raise error
        return _render_http_exception(error)
    if isinstance(error, StoreUnavailable):
        log.warning(
            "store_unavailable", route=route, reason=safe_message(error), request_id=request_id
        )
        return error_response(
            503,
            "store_unavailable",
            "The store cannot complete this request now (for example, the disk is full "
            "or read-only); retry later.",
            {hdrs.RETRY_AFTER: "1"},
        )
    event = "store_error" if isinstance(error, StoreError) else "unhandled_error"
    log.error(event, method=request.method, route=route, request_id=request_id, exc_info=error)
    return internal_error()


def internal_error() -> web.Response:
    return error_response(
        500,
        "internal_error",
        "The server failed to handle this request; the request id in X-Request-ID "
        "finds it in the logs.",
    )
