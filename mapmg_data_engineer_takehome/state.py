"""Typed keys for the application's state, shared by the app factory and the handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from aiohttp import web

from .metrics import Metrics
from .settings import Settings
from .store.base import Store

SETTINGS_KEY = web.AppKey("settings", Settings)
STORE_KEY = web.AppKey("store", Store)
# The input.db seeding actually read, or None when there was none.
INPUT_DB_KEY: web.AppKey[Optional[Path]] = web.AppKey("input_db")
# The server's metrics, or None when KV_METRICS is off.
METRICS_KEY: web.AppKey[Optional[Metrics]] = web.AppKey("metrics")
# The API document, rendered once.
OPENAPI_KEY = web.AppKey("openapi", bytes)
