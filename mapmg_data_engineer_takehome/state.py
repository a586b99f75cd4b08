"""Typed keys for the application's state, shared by the app factory and the handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
