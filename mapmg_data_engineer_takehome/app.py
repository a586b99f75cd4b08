"""The application factory and the server loop around it."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from .errors import JsonErrorServer, StartupError
from .middleware import make_request_middleware
from .routes import setup_routes
from .seed import find_input_db, seed_store
from .settings import Settings
from .state import INPUT_DB_KEY, SETTINGS_KEY, STORE_KEY
from .store import StoreError, open_store

log = structlog.get_logger("kv.app")


def create_app(settings: Settings) -> web.Application:
    """Build the application; the store opens (and seeds) when the app starts."""
    app = web.Application(
        # aiohttp stops reading a body past this bound, so a client streaming without end
        # costs at most this much memory; handlers.read_body enforces the exact limit.
        client_max_size=settings.max_body_bytes + 1,
        middlewares=[make_request_middleware(settings.access_log)],
    )
    app[SETTINGS_KEY] = settings
    app.cleanup_ctx.append(store_context)
    setup_routes(app)
    return app


async def store_context(app: web.Application) -> AsyncIterator[None]:
    """Open the store and seed it before the port opens; close it after the last request."""
    settings = app[SETTINGS_KEY]
    input_db = find_input_db(settings.input_db)
    try:
        store = open_store(settings)
    except StoreError as error:
        raise StartupError(str(error)) from None
    try:
        await seed_store(store, input_db)
        app[INPUT_DB_KEY] = input_db
        app[STORE_KEY] = store
        yield
    finally:
        await store.close()
        log.info("store_closed", store=store.name)


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


# A request line must hold a 4096-byte key percent-encoded (12 KiB); aiohttp's default is 8 KiB.
MAX_REQUEST_LINE_BYTES = 16 * 1024


class ServerRunner(web.AppRunner):
    """An AppRunner whose protocol errors are JSON like every other error."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server itself; JsonErrorServer only swaps the handler class it
        # creates per connection, so re-classing the instance is all that is needed.
        server.__class__ = JsonErrorServer
        return server


async def serve(settings: Settings) -> None:
    """Start, serve until SIGTERM or SIGINT, then finish in-flight requests and close."""
    runner = ServerRunner(
        create_app(settings),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
        max_line_size=MAX_REQUEST_LINE_BYTES,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("starting", settings=settings.public_view())
    await runner.setup()  # opens the store and seeds: nothing is bound yet
    try:
        addresses = []
        for host in listen_hosts(settings.host):
            site = web.TCPSite(runner, host, settings.port)
            try:
                await site.start()
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {host}:{settings.port}: {error.strerror}"
                ) from None
            addresses.append(site.name)
        log.info("listening", addresses=addresses)
        await stop.wait()
        log.info("shutting_down")
    finally:
        await runner.cleanup()
    log.info("stopped")
