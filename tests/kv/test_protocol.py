"""The aiohttp internals protocol.py relies on (the one module that touches them): this fails
loudly, naming what moved, when an aiohttp release changes them."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from mapmg_data_engineer_takehome.protocol import (
    KvRequestHandler,
    KvServer,
    ServerRunner,
    chunk,
)


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


async def test_chunks_written_to_the_transport_join_aiohttps_own(aiohttp_client: Any) -> None:
    """What the change feed's direct writes rely on (protocol.chunk): a prepared, chunked
    answer whose first chunk aiohttp wrote (and with it the headers) takes further chunks
    written to its transport, between aiohttp's own writes, and aiohttp ends it with the last
    chunk. An HTTP client reads every chunk back, in order, and the end."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first,")
        assert request.transport is not None
        request.transport.write(chunk(b"direct,"))
        request.transport.write(chunk(b"x" * 70_000 + b","))
        await response.write(b"aiohttp again,")
        request.transport.write(chunk(b"last"))
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    answer = await client.get("/")
    assert answer.headers["Transfer-Encoding"] == "chunked"
    assert await answer.read() == b"first,direct," + b"x" * 70_000 + b",aiohttp again,last"
    # The connection is still good for another request: the body ended where it should.
    assert await (await client.get("/")).read() == await answer.read()
