"""structlog set-up: JSON lines (or a console format) on stdout for our logs and aiohttp's.

Logs never carry values, keys or secrets: a request is named by its route pattern, and an
exception is logged by its type, its frames (file, line, function) and a message only where
the message cannot hold request data (see safe_message). Frame locals, which hold the key,
the value and the Authorization header of the request at hand, are never rendered.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, Optional, TextIO

import structlog
from structlog.typing import EventDict, ExcInfo, Processor

from .errors import safe_message
from .settings import Settings

# How deep a chain of causes (raise ... from ...) is followed.
_MAX_CHAIN = 8


def configure_logging(
    settings: Settings, stream: Optional[TextIO] = None, worker: Optional[int] = None
) -> None:
    """Route structlog and the standard library's logging to one renderer on ``stream``.

    A ``worker`` number is added to every line, telling the processes of one server apart.
    """
    stream = stream or sys.stdout
    use_console = settings.log_format == "console" or (
        settings.log_format == "auto" and stream.isatty()
    )
    shared: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:
        shared.append(_add_worker(worker))
    shared.append(safe_exceptions(as_text=use_console))
    renderer: Processor
    if use_console:
        # The traceback is already text (safe_exceptions); plain_traceback says so, where
        # a pretty formatter (rich's, when installed) would render frame locals.
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    level = logging.getLevelName(settings.log_level.upper())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (print would make two), so that the lines of several worker
        # processes sharing stdout never interleave.
        logger_factory=structlog.WriteLoggerFactory(stream),
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


def _add_worker(worker: int) -> Processor:
    def add_worker(logger: Any, method: str, event: EventDict) -> EventDict:
        event.setdefault("worker", worker)
        return event

    return add_worker


def describe_exception(error: BaseException) -> list[dict[str, Any]]:
    """The exception and its causes, outermost last as in a traceback: for each, its type,
    its safe message and its frames (file, line, function), with no locals and no source."""
    chain: list[BaseException] = []
    current: Optional[BaseException] = error
    while current is not None and current not in chain and len(chain) < _MAX_CHAIN:
        chain.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return [
        {
            "exc_type": type(link).__qualname__,
            "exc_value": safe_message(link),
            "frames": [
                {"filename": frame.filename, "lineno": frame.lineno, "name": frame.name}
                for frame in traceback.extract_tb(link.__traceback__, limit=None)
            ],
        }
        for link in reversed(chain)
    ]


def format_exception(described: list[dict[str, Any]]) -> str:
    """describe_exception's result as a traceback for people (the console format)."""
    parts = []
    for link in described:
        parts.append("Traceback (most recent call last):")
        for frame in link["frames"]:
            parts.append(
                f'  File "{frame["filename"]}", line {frame["lineno"]}, in {frame["name"]}'
            )
        parts.append(f"{link['exc_type']}: {link['exc_value']}")
    return "\n".join(parts)


def _exception_of(exc_info: Any) -> Optional[BaseException]:
    if isinstance(exc_info, BaseException):
        return exc_info
    if exc_info is True:
        return sys.exc_info()[1]
    if isinstance(exc_info, tuple):
        return exc_info[1]  # type: ignore[no-any-return]
    return None


def safe_exceptions(as_text: bool) -> Processor:
    """A processor that turns ``exc_info`` into an ``exception`` field with no data in it,
    before any renderer (ours or the standard library's) could render frame locals."""

    def render(logger: Any, method: str, event: EventDict) -> EventDict:
        exc_info: Optional[ExcInfo] = event.pop("exc_info", None)
        error = _exception_of(exc_info)
        if error is not None:
            described = describe_exception(error)
            event["exception"] = format_exception(described) if as_text else described
        return event

    return render
