"""The upkeep loop: while the server runs, expired leases (each with its keys, in one revision)
and expired keys' rows are purged and the history of changes trimmed, in the background, a
small transaction at a time.

One process of a server does it (with KV_WORKERS, worker 1): create_app adds upkeep_context
unless told not to.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from typing import Callable, Optional

import structlog
from aiohttp import web

from .errors import safe_message
from .metrics import Metrics
from .settings import Settings
from .state import METRICS_KEY, STORE_KEY
from .store import Store, StoreError

# The logger name these lines have always had.
log = structlog.get_logger("kv.app")

# Expired rows deleted per transaction, and the pause between two such transactions; the
# history is trimmed the same way, by as many rows at a time.
PURGE_BATCH = 50
PURGE_PAUSE = 0.005


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
            # Leases first: each takes all its keys in one revision, which the purge of keys
            # never splits (it leaves leased keys alone).
            expired = await in_batches(partial(store.expire_leases, PURGE_BATCH))
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
        if expired:
            log.info("expired_leases_removed", count=expired)
            if metrics is not None:
                metrics.leases.labels("expired").inc(expired)
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
