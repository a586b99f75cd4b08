"""Typed keys for the application's state, shared by the app factory and the handlers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from aiohttp import web

from .settings import Settings
from .store.base import Store

SETTINGS_KEY = web.AppKey("settings", Settings)
STORE_KEY = web.AppKey("store", Store)
# The input.db seeding actually read, or None when there was none.
INPUT_DB_KEY: web.AppKey[Optional[Path]] = web.AppKey("input_db")
