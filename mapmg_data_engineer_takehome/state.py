"""Typed keys for the application's state, shared by the app factory and the handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from aiohttp import web

from .feed import ChangeFeed
from .metrics import Metrics
from .settings import Settings
from .store.base import Store

SETTINGS_KEY = web.AppKey("settings", Settings)
STORE_KEY = web.AppKey("store", Store)
# This process's change feed, which every watcher of /changes reads through.
FEED_KEY = web.AppKey("feed", ChangeFeed)
# The input.db seeding actually read, or None when there was none.
INPUT_DB_KEY: web.AppKey[Optional[Path]] = web.AppKey("input_db")
# The server's metrics, or None when KV_METRICS is off.
METRICS_KEY: web.AppKey[Optional[Metrics]] = web.AppKey("metrics")
# The API document, rendered once.
OPENAPI_KEY = web.AppKey("openapi", bytes)
# The time (seconds since the epoch) an import judges its lines' expiry by: the tests' clock
# when they pass one, else the machine's.
CLOCK_KEY: web.AppKey[Callable[[], float]] = web.AppKey("clock")
