"""What every request goes through around its handler: a request id, the bearer token (when
one is set), errors as JSON, an access line (when asked for).

Not an aiohttp middleware, though it does a middleware's job: a wrapper put around each
handler when its route is registered (routes.py). With any middleware at all, aiohttp builds
a chain per request and adds a layer of its own, which costs more than this whole wrapper
(bench/results.md).
Routing failures, which no handler sees, go to one fallback route (handlers.no_route), wrapped
like the rest.

It binds no logging context: the request id travels as a local and is passed to the few log
calls that need it (errors, and access lines when they are on).
"""

from __future__ import annotations

import hmac
import itertools
import os
import re
import time
from collections.abc import Iterator
from typing import Callable, Optional

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .access import BOOTSTRAP, GRANT_KEY, Tokens
from .errors import response_for
from .metrics import Metrics
from .protocol import request_done
from .rules import REQUEST_ID
from .store.base import StoreCorrupt, StoreError, StoreUnavailable

# A client-sent id is echoed only when it is short and printable, so that it cannot forge
# log lines or bloat them; anything else is replaced by a fresh id.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

access_log = structlog.get_logger("kv.access")

# Wraps a handler for the route pattern it serves; ``public`` routes need no token.
Wrap = Callable[..., Handler]


def request_ids() -> Iterator[str]:
    """Ids unique across processes and restarts: a random prefix, then a counter."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}-{number:x}" for number in itertools.count(1))


def make_request_wrapper(
    with_access_log: bool,
    auth_token: Optional[str] = None,
    metrics: Optional[Metrics] = None,
    tokens: Optional[Tokens] = None,
) -> Wrap:
    """The wrapper for an app's handlers. Access lines are written only when asked for; with an
    ``auth_token`` every route but the public ones needs it, or a secret of ``tokens``, as a
    bearer token; with ``metrics``, every request is counted and timed."""
    assert auth_token is None or tokens is not None
    timed = with_access_log or metrics is not None
    next_id = request_ids().__next__
    expected = b"" if auth_token is None else f"Bearer {auth_token}".encode()

    def wrap(handler: Handler, route: str, public: bool = False) -> Handler:
        """``handler`` with the request id, the token check, errors as JSON and access lines;
        ``route`` is its pattern (``/get/{key}``), which logs name instead of the path."""
        check_token = auth_token is not None and not public

        async def handle(request: web.Request) -> web.StreamResponse:
            request_id = request.headers.get(REQUEST_ID)
            if request_id is None or not _ACCEPTABLE_REQUEST_ID.fullmatch(request_id):
                request_id = next_id()
            started = time.perf_counter() if timed else 0.0
            try:
                if check_token:
                    supplied = request.headers.get(hdrs.AUTHORIZATION, "")
                    # compare_digest takes as long whatever matches: no timing hints.
                    if hmac.compare_digest(supplied.encode("utf-8", "replace"), expected):
                        request[GRANT_KEY] = BOOTSTRAP
                    else:  # a token of the store's, or a 401
                        assert tokens is not None
                        grant = tokens.cached(supplied)
                        if grant is None:
                            grant = await tokens.grant(supplied)
                        request[GRANT_KEY] = grant
                if not request.body_exists:
                    # Arrived whole: a long-poll's wait or a stream is no slow request.
                    request_done(request)
                response = await handler(request)
            except Exception as error:
                if metrics is not None and isinstance(error, StoreError):
                    metrics.store_errors.labels(_error_kind(error)).inc()
                response = response_for(request, error, request_id, route)
            request_done(request)
            response.headers[REQUEST_ID] = request_id
            if timed:
                seconds = time.perf_counter() - started
                if metrics is not None:
                    metrics.observe_request(route, request.method, response.status, seconds)
                if with_access_log:
                    grant = request.get(GRANT_KEY)
                    access_log.info(
                        "request",
                        request_id=request_id,
                        token=None if grant is None else grant.name,
                        method=request.method,
                        route=route,
                        status=response.status,
                        duration_ms=round(seconds * 1000, 3),
                    )
            return response

        return handle

    return wrap


def _error_kind(error: StoreError) -> str:
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    return "corrupt" if isinstance(error, StoreCorrupt) else "error"
