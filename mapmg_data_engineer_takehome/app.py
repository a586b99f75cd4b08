"""The application factory: create_app builds the aiohttp application (its middleware-like
wrapper, routes, cleanup contexts and typed state), and the store's lifetime within it:
opened and seeded before the port opens, closed after the last request.

The process that runs it (one server, or a supervisor of workers) is workers.py's; the
background purge and trim are upkeep.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Optional

import structlog
from aiohttp import web

from .access import TOKENS_KEY, Tokens, tokens_context
from .errors import StartupError
from .feed import ChangeFeed
from .metrics import Metrics
from .middleware import make_request_wrapper
from .openapi import document_bytes
from .routes import setup_routes
from .seed import find_input_db, seed_store
from .settings import Settings
from .state import (
    CLOCK_KEY,
    FEED_KEY,
    INPUT_DB_KEY,
    METRICS_KEY,
    OPENAPI_KEY,
    SETTINGS_KEY,
    STORE_KEY,
)
from .store import Store, StoreError, open_store
from .store.base import Clock
from .upkeep import upkeep_context
from .watch import StreamPusher

log = structlog.get_logger("kv.app")

# With KV_WORKERS, how stale another worker's request counts may be in a scrape, in seconds.
METRICS_FLUSH_INTERVAL = 1.0


def _secret(settings: Settings) -> Optional[str]:
    return None if settings.auth_token is None else settings.auth_token.get_secret_value()


def create_app(
    settings: Settings, seed: bool = True, purge: bool = True, clock: Optional[Clock] = None
) -> web.Application:
    """Build the application; the store opens (and, unless told not to, seeds) on startup,
    and in the background expired keys are purged and the history trimmed (unless told not
    to).

    Workers pass ``seed=False``: their supervisor seeded the shared store before they started;
    and all but one pass ``purge=False``. ``clock`` replaces the store's own time, for
    expiry and the history's age (tests move it).
    """
    app = web.Application(
        # aiohttp stops reading a body past this bound, so a client streaming without end
        # costs at most this much memory; handlers.read_body enforces the exact limit.
        client_max_size=settings.max_body_bytes + 1,
    )
    metrics = Metrics() if settings.metrics else None
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics
    app[OPENAPI_KEY] = document_bytes()
    app[CLOCK_KEY] = clock or time.time
    app.cleanup_ctx.append(partial(store_context, seed=seed, clock=clock))
    tokens = None
    if settings.auth_token is not None:
        # Without KV_AUTH_TOKEN the server is open and the store's tokens unread.
        tokens = app[TOKENS_KEY] = Tokens(app[CLOCK_KEY], metrics)
        # After the store's context, so that it stops (and writes last uses) before the store
        # closes.
        app.cleanup_ctx.append(tokens_context)
    # After the store's context, so that they stop before the store closes.
    app.cleanup_ctx.append(feed_context)
    app.on_shutdown.append(stop_watching)
    if purge:
        app.cleanup_ctx.append(partial(upkeep_context, settings=settings))
    if metrics is not None and metrics.multiprocess:
        app.cleanup_ctx.append(partial(flush_context, metrics=metrics))
    wrapper = make_request_wrapper(settings.access_log, _secret(settings), metrics, tokens)
    setup_routes(app, wrapper)
    return app


async def flush_context(app: web.Application, metrics: Metrics) -> AsyncIterator[None]:
    """With workers, a scrape reads every worker's files: write this one's every second."""

    async def flush_forever() -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            metrics.flush()

    task = asyncio.ensure_future(flush_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    metrics.flush()


async def store_context(
    app: web.Application, seed: bool, clock: Optional[Clock]
) -> AsyncIterator[None]:
    """Open the store and seed it before the port opens; close it after the last request."""
    settings = app[SETTINGS_KEY]
    metrics = app[METRICS_KEY]
    input_db = find_input_db(settings.input_db)
    store = await open_store_or_fail(settings, clock)
    try:
        if seed:
            await seed_or_fail(store, input_db, metrics)
        if metrics is not None:
            store.on_commit = metrics.observe_commit
        app[INPUT_DB_KEY] = input_db
        app[STORE_KEY] = store
        yield
    finally:
        await store.close()
        log.info("store_closed", store=store.name)


async def feed_context(app: web.Application) -> AsyncIterator[None]:
    """The change feed, which starts with its first watcher."""
    settings = app[SETTINGS_KEY]
    pusher = StreamPusher(settings.changes_backlog, app[METRICS_KEY])
    feed = ChangeFeed(app[STORE_KEY], settings.changes_backlog, settings.changes_heartbeat, pusher)
    app[FEED_KEY] = feed
    yield
    await feed.close()


async def stop_watching(app: web.Application) -> None:
    """On shutdown, before in-flight requests are waited for: long-polls answer and streams
    end now, rather than holding the stop for its whole timeout."""
    await app[FEED_KEY].close()


async def open_store_or_fail(settings: Settings, clock: Optional[Clock] = None) -> Store:
    """The configured store, or a StartupError naming its file (or database) and the problem."""
    try:
        return await open_store(settings, clock)
    except StoreError as error:
        raise StartupError(str(error)) from None


async def prepare_store(settings: Settings) -> None:
    """Open the store, seed it and close it: what a supervisor does once for all workers."""
    store = await open_store_or_fail(settings)
    try:
        metrics = Metrics() if settings.metrics else None  # the workers' scrapes add it in
        await seed_or_fail(store, find_input_db(settings.input_db), metrics)
    finally:
        await store.close()


async def seed_or_fail(
    store: Store, input_db: Optional[Path], metrics: Optional[Metrics] = None
) -> None:
    """Seed, or a StartupError naming the data file and the problem (a full disk, say)."""
    try:
        report = await seed_store(store, input_db)
    except StoreError as error:  # its message names the data file
        raise StartupError(f"cannot apply the seed {input_db}: {error}") from None
    if metrics is not None and report.applied:
        metrics.observe_seed(report.rows_read, report.rows_applied, sum(report.skipped.values()))
