"""The application factory and the server loop around it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import structlog
from aiohttp import web

from .errors import StartupError, safe_message
from .feed import ChangeFeed
from .metrics import Metrics
from .middleware import make_request_wrapper
from .openapi import document_bytes
from .protocol import MAX_REQUEST_LINE_BYTES, ServerRunner, close_stalled_connections
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
from .watch import StreamPusher

log = structlog.get_logger("kv.app")

# Expired rows deleted per transaction, and the pause between two such transactions; the
# history is trimmed the same way, by as many rows at a time.
PURGE_BATCH = 50
PURGE_PAUSE = 0.005
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
    # After the store's context, so that they stop before the store closes.
    app.cleanup_ctx.append(feed_context)
    app.on_shutdown.append(stop_watching)
    if purge:
        app.cleanup_ctx.append(partial(upkeep_context, settings=settings))
    if metrics is not None and metrics.multiprocess:
        app.cleanup_ctx.append(partial(flush_context, metrics=metrics))
    setup_routes(app, make_request_wrapper(settings.access_log, _secret(settings), metrics))
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


async def upkeep_context(app: web.Application, settings: Settings) -> AsyncIterator[None]:
    """Purge expired keys' rows and trim the history in the background while the server
    runs."""
    task = asyncio.ensure_future(keep_up(app[STORE_KEY], settings, app[METRICS_KEY]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def keep_up(store: Store, settings: Settings, metrics: Optional[Metrics] = None) -> None:
    """Every KV_PURGE_INTERVAL seconds, delete expired rows, then trim the history, in small
    transactions with a pause after each: one transaction of PURGE_BATCH rows holds the event
    loop (and the write lock) for about a millisecond, so requests never wait behind it."""
    while True:
        await asyncio.sleep(settings.purge_interval)
        try:
            purged = await in_batches(partial(store.purge_expired, PURGE_BATCH))
            await in_batches(
                partial(
                    store.trim_history,
                    settings.changes_retention,
                    settings.changes_max,
                    PURGE_BATCH,
                )
            )
        except StoreError as error:  # a full disk, say: the next sweep tries again
            log.warning("upkeep_failed", reason=safe_message(error))
            continue
        except Exception as error:  # a bug: said, with its traceback; the purge must go on
            log.error("upkeep_failed", exc_info=error)
            continue
        if purged:
            log.info("expired_keys_purged", count=purged)
            if metrics is not None:
                metrics.purged.inc(purged)


async def in_batches(step: Callable[[], Awaitable[int]]) -> int:
    """Run ``step`` (one small transaction, answering how many rows it removed) until it
    removes fewer than PURGE_BATCH, pausing after each; how many it removed in all."""
    removed = 0
    while True:
        count = await step()
        removed += count
        if count < PURGE_BATCH:
            return removed
        await asyncio.sleep(PURGE_PAUSE)


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


def run_event_loop(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it halves the event loop's cost), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def listen_hosts(host: str) -> list[str]:
    """'localhost' means both loopback addresses, ::1 only where this machine can bind it."""
    if host != "localhost":
        return [host]
    hosts = ["127.0.0.1"]
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
            hosts.append("::1")
        except OSError:
            pass
    return hosts


@dataclass(frozen=True)
class Worker:
    """Who a worker process is: its number (from 1) and its supervisor's pid."""

    number: int
    supervisor_pid: int


async def serve(settings: Settings, worker: Optional[Worker] = None) -> None:
    """Start, serve until SIGTERM or SIGINT, then finish in-flight requests and close.

    A ``worker`` shares its port with its siblings, does not seed, and stops if its
    supervisor dies.
    """
    runner = ServerRunner(
        # Workers share a store seeded by their supervisor, and one of them purges it.
        create_app(settings, seed=worker is None, purge=worker is None or worker.number == 1),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
        max_line_size=MAX_REQUEST_LINE_BYTES,
        # Idle keep-alive connections close after this; close_stalled_connections covers
        # the time a request takes to arrive.
        keepalive_timeout=settings.client_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)
    loop.set_exception_handler(log_loop_error)
    if worker is None:
        log.info("starting", settings=settings.public_view())
    await runner.setup()  # opens the store and seeds: nothing is bound yet
    assert runner.server is not None
    sweeper = asyncio.ensure_future(
        close_stalled_connections(runner.server, settings.client_timeout)
    )
    try:
        addresses = []
        for host in listen_hosts(settings.host):
            # SO_REUSEPORT: the kernel spreads connections over every worker on the port.
            site = web.TCPSite(runner, host, settings.port, reuse_port=worker is not None)
            try:
                await site.start()
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {host}:{settings.port}: {error.strerror}"
                ) from None
            addresses.append(site.name)
        log.info("listening", addresses=addresses)
        if worker is not None:
            stop_when_orphaned(stop, worker.supervisor_pid)
        await stop.wait()
        log.info("shutting_down")
    finally:
        sweeper.cancel()
        await runner.cleanup()
    log.info("stopped")


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler logs the repr of the failing callback, arguments (a key, a
    value) included; this one logs asyncio's sentence up to that repr, and the exception."""
    message = str(context.get("message", "")).split("<", 1)[0].split("(", 1)[0].strip()
    log.error("event_loop_error", message=message, exc_info=context.get("exception"))


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT (Ctrl-C) set ``stop``.

    Windows' event loops have no add_signal_handler; there a plain signal handler, which runs
    between bytecodes of the main thread, hands the signal to the loop thread-safely.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))


def stop_when_orphaned(stop: asyncio.Event, supervisor: int, interval: float = 1.0) -> None:
    """Set ``stop`` once this worker's supervisor is gone (killed with -9, say), so that no
    worker outlives it holding the port. Its pid is passed in rather than read here: the
    supervisor may already be gone when a slow worker gets this far."""
    loop = asyncio.get_running_loop()

    def check() -> None:
        if os.getppid() != supervisor:
            log.warning("supervisor_gone", supervisor=supervisor)
            stop.set()
        else:
            loop.call_later(interval, check)

    loop.call_later(interval, check)
