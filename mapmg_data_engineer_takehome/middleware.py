"""The one middleware around every handler: a request id, the bearer token (when one is set),
errors as JSON, an access line (when asked for).

One layer rather than three, because each layer is a coroutine call on every request. It
binds no logging context: the request id travels as a local and is passed to the few log
calls that need it (errors, and access lines when they are on).
"""

from __future__ import annotations

import hmac
import itertools
import os
import re
import time
from collections.abc import Iterator
from typing import Any, Optional

import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .errors import ApiError, response_for, route_name
from .protocol import request_done

REQUEST_ID_HEADER = "X-Request-ID"
# A client-sent id is echoed only when it is short and printable, so that it cannot forge
# log lines or bloat them; anything else is replaced by a fresh id.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

access_log = structlog.get_logger("kv.access")


def request_ids() -> Iterator[str]:
    """Ids unique across processes and restarts: a random prefix, then a counter."""
    prefix = os.urandom(8).hex()
    return (f"{prefix}-{number:x}" for number in itertools.count(1))


UNAUTHENTICATED_PATHS = frozenset({"/health"})  # readiness probes carry no token


def make_request_middleware(with_access_log: bool, auth_token: Optional[str] = None) -> Any:
    """The middleware for an app; access lines are written only when asked for, and with an
    ``auth_token`` every request but /health must carry it as a bearer token."""
    next_id = request_ids().__next__
    expected = None if auth_token is None else f"Bearer {auth_token}".encode()

    @web.middleware
    async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is None or not _ACCEPTABLE_REQUEST_ID.fullmatch(request_id):
            request_id = next_id()
        started = time.perf_counter() if with_access_log else 0.0
        try:
            if expected is not None and request.path not in UNAUTHENTICATED_PATHS:
                supplied = request.headers.get(hdrs.AUTHORIZATION, "")
                # compare_digest takes as long whatever matches: no timing hints.
                if not hmac.compare_digest(supplied.encode("utf-8", "replace"), expected):
                    raise ApiError(
                        401,
                        "unauthorized",
                        "This server needs the header 'Authorization: Bearer <token>' with "
                        "its token.",
                        {hdrs.WWW_AUTHENTICATE: 'Bearer realm="kv"'},
                    )
            response = await handler(request)
        except Exception as error:
            response = response_for(request, error, request_id)
        request_done(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        if with_access_log:
            access_log.info(
                "request",
                request_id=request_id,
                method=request.method,
                route=route_name(request),
                status=response.status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        return response

    return request_middleware
