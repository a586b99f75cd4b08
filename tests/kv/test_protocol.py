"""The aiohttp internals protocol.py relies on (the one module that touches them): this fails
loudly, naming what moved, when an aiohttp release changes them."""

from __future__ import annotations

import asyncio
import inspect

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mapmg_data_engineer_takehome.protocol import KvRequestHandler, KvServer, ServerRunner


def test_aiohttp_is_the_major_version_protocol_py_was_written_for() -> None:
    assert aiohttp.__version__.split(".")[0] == "3", aiohttp.__version__


def test_the_connection_handler_hooks_are_still_there() -> None:
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters[:5] == ["self", "request", "status", "exc", "message"], parameters
    for name in ("data_received", "connection_made", "force_close"):
        assert callable(getattr(RequestHandler, name, None)), name
    assert issubclass(KvRequestHandler, RequestHandler)


async def test_the_runner_still_builds_its_server_where_protocol_py_swaps_it() -> None:
    assert inspect.iscoroutinefunction(web.AppRunner._make_server)
    runner = ServerRunner(web.Application(), handle_signals=False)
    await runner.setup()
    try:
        server = runner.server
        assert isinstance(server, KvServer)
        # KvServer.__call__ builds each connection's handler from these two.
        assert isinstance(server._loop, asyncio.AbstractEventLoop)
        assert isinstance(server._kwargs, dict)
        assert isinstance(server(), KvRequestHandler)
        assert isinstance(server.connections, list)
    finally:
        await runner.cleanup()
