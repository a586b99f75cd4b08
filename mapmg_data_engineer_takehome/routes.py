"""The whole URL map, readable in one screen."""

from __future__ import annotations

from aiohttp import web

from . import handlers


def setup_routes(app: web.Application) -> None:
    """Register every endpoint; aiohttp answers 405 with Allow for other methods."""
    app.router.add_post("/set", handlers.set_value)
    # [\s\S]+ lets "/" and a decoded newline belong to the key; GET also serves HEAD.
    app.router.add_get(r"/get/{key:[\s\S]+}", handlers.get_value)
    app.router.add_delete(r"/delete/{key:[\s\S]+}", handlers.delete_value)
    app.router.add_get("/keys", handlers.list_keys)
    app.router.add_post("/mget", handlers.get_many)
    app.router.add_post("/mset", handlers.set_many)
    app.router.add_post("/mdelete", handlers.delete_many)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/config", handlers.config)
