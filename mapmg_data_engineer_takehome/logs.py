"""structlog set-up and the middleware that gives each request an id (and, if asked, a log line).

Logs never carry values, and not keys either: a request is named by its route pattern.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Optional, TextIO

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from structlog.typing import Processor

from .settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
# A client-sent id is echoed only when it is short and printable, so that it cannot forge
# log lines or bloat them; anything else is replaced by a fresh id.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

access_log = structlog.get_logger("kv.access")


def configure_logging(settings: Settings, stream: Optional[TextIO] = None) -> None:
    """Route structlog and the standard library's logging to one renderer on ``stream``."""
    stream = stream or sys.stdout
    use_console = settings.log_format == "console" or (
        settings.log_format == "auto" and stream.isatty()
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    else:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    level = logging.getLevelName(settings.log_level.upper())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Tests reconfigure logging; the per-call cost only matters with access logs on.
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library: same renderer, same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Our own middleware writes access lines (when enabled); aiohttp's would log paths, i.e. keys.
    logging.getLogger("aiohttp.access").disabled = True


def route_name(request: web.Request) -> str:
    """The route pattern that matched (``/get/{key}``), never the concrete path with its key."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _new_request_id() -> str:
    return os.urandom(8).hex()


def make_request_context_middleware(with_access_log: bool) -> Any:
    """The outermost middleware: a request id in logs and response, and maybe an access line."""

    @web.middleware
    async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID_HEADER)
        if request_id is None or not _ACCEPTABLE_REQUEST_ID.fullmatch(request_id):
            request_id = _new_request_id()
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        try:
            response = await handler(request)
            response.headers[REQUEST_ID_HEADER] = request_id
            if with_access_log:
                access_log.info(
                    "request",
                    method=request.method,
                    route=route_name(request),
                    status=response.status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3),
                )
            return response
        finally:
            structlog.contextvars.reset_contextvars(**tokens)

    return request_context
