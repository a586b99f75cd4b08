"""The whole URL map, readable in one screen."""

from __future__ import annotations

from aiohttp import web

from . import handlers
from .middleware import Wrap


def setup_routes(app: web.Application, wrap: Wrap) -> None:
    """Register every endpoint, each handler wrapped (see middleware.py)."""

    def add(method: str, path: str, handler: handlers.Handler, route: str = "") -> None:
        wrapped = wrap(handler, route or path, public=path == "/health")
        if method == "GET":
            app.router.add_get(path, wrapped)  # and HEAD
        else:
            app.router.add_route(method, path, wrapped)

    add("POST", "/set", handlers.set_value)
    # [\s\S]+ lets "/" and a decoded newline belong to the key.
    add("GET", r"/get/{key:[\s\S]+}", handlers.get_value, "/get/{key}")
    add("DELETE", r"/delete/{key:[\s\S]+}", handlers.delete_value, "/delete/{key}")
    add("GET", "/keys", handlers.list_keys)
    add("POST", "/mget", handlers.get_many)
    add("POST", "/mset", handlers.set_many)
    add("POST", "/mdelete", handlers.delete_many)
    add("GET", "/health", handlers.health)  # public: readiness probes carry no token
    add("GET", "/config", handlers.config)
    # Last: whatever no route above takes gets a JSON 404, or 405 with Allow.
    add("*", "/{path:.*}", handlers.no_route, "unmatched")
