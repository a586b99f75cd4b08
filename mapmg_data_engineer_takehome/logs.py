"""structlog set-up: JSON lines (or a console format) on stdout for our logs and aiohttp's.

Logs never carry values, and not keys either: a request is named by its route pattern.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional, TextIO

import structlog
from structlog.typing import EventDict, Processor

from .settings import Settings


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
