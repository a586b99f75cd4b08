"""What happens below the application, per connection: requests aiohttp cannot parse get the
same JSON errors as the rest, clients that are too slow to send a request are cut off, a
stream's chunks can be written without a task per stream (``chunk``), and what a peer has not
yet taken of a connection's writes can be told (``unsent_bytes``).
"""

from __future__ import annotations

import asyncio
import struct
import sys
import time
from typing import Any, Optional, Protocol

try:  # not on Windows, where the kernel's share is not asked for
    import fcntl
    import termios
except ImportError:  # pragma: no cover
    fcntl = termios = None  # type: ignore[assignment]

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .errors import HTTP_ERRORS, error_response, internal_error

log = structlog.get_logger("kv.protocol")

# A request line must hold a 4096-byte key percent-encoded (12 KiB); aiohttp's default is 8 KiB.
MAX_REQUEST_LINE_BYTES = 16 * 1024


class KvRequestHandler(RequestHandler):
    """aiohttp's connection handler, plus JSON protocol errors and a request clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # When the first byte of the request now being received arrived (monotonic clock);
        # None between requests. close_stalled_connections reads it.
        self.request_started: Optional[float] = None
        # True while a handler reads a body that may take longer than the timeout (an
        # import's), keeping its own watch on pauses: its bytes do not start the clock.
        self.clock_stopped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.request_started = time.monotonic()  # a client that never sends a byte is slow too

    def data_received(self, data: bytes) -> None:
        if self.request_started is None and not self.clock_stopped:
            self.request_started = time.monotonic()
        super().data_received(data)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: Optional[BaseException] = None,
        message: Optional[str] = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse; aiohttp's own answer is plain text."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot send the error")
        response: web.StreamResponse
        if status >= 500:
            log.error("protocol_error", exc_info=exc)
            response = internal_error()
        else:
            # aiohttp's message quotes the offending bytes; the log and the answer keep only
            # the sentence before them, since those bytes may be a client's secret.
            detail = (message or "").strip().split(":", 1)[0].split("\n", 1)[0]
            log.info("bad_http_request", status=status, reason=detail)
            code, sentence = HTTP_ERRORS.get(status, HTTP_ERRORS[400])
            if detail:
                sentence = f"The request is not valid HTTP: {detail}."
            response = error_response(status, code, sentence)
        response.force_close()
        return response


def request_done(request: web.Request) -> None:
    """Stop the request clock: the handler has read the whole request (or answered it)."""
    handler = request.protocol
    if isinstance(handler, KvRequestHandler):
        handler.request_started = None
        handler.clock_stopped = False


def stop_request_clock(request: web.Request) -> None:
    """Stop the request clock until the request is done: its handler reads the body, which
    may take longer than the timeout, and watches for pauses itself."""
    handler = request.protocol
    if isinstance(handler, KvRequestHandler):
        handler.request_started = None
        handler.clock_stopped = True


class KvServer(web.Server):
    """A web.Server whose connections use KvRequestHandler."""

    def __call__(self) -> RequestHandler:
        return KvRequestHandler(self, loop=self._loop, **self._kwargs)


class ServerRunner(web.AppRunner):
    """An AppRunner whose connections are KvRequestHandlers."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server itself; KvServer only swaps the handler class it creates
        # per connection, so re-classing the instance is all that is needed.
        server.__class__ = KvServer
        return server


async def close_stalled_connections(server: web.Server, timeout: float) -> None:
    """Forever: close connections whose current request has taken longer than ``timeout``
    to arrive (headers and body), such as slowloris clients and ones that never send a byte.

    One sweep every few seconds costs nothing per request, unlike a timer per request; a
    connection is closed between ``timeout`` and ``timeout`` plus a quarter of it.
    """
    interval = min(5.0, timeout / 4)
    while True:
        await asyncio.sleep(interval)
        deadline = time.monotonic() - timeout
        for handler in server.connections:
            started = getattr(handler, "request_started", None)
            if started is not None and started < deadline and handler.transport is not None:
                handler.transport.close()


def chunk(data: bytes) -> bytes:
    """``data`` framed as one chunk of HTTP/1.1's chunked transfer coding.

    aiohttp writes a body only from a coroutine of the request's own task, which would make a
    task per open stream wake for every event. The change feed writes the events of a stream
    that has caught up straight to its transport instead, each write one chunk framed here.
    That holds while aiohttp frames a chunked answer as the protocol says: its answer was
    prepared with ``enable_chunked_encoding``, a first write through aiohttp sent its headers
    (aiohttp may hold them until then), nothing of aiohttp's is buffered for the transport
    (a chunk goes out whole as it is written), and when the handler returns aiohttp ends the
    body with the last chunk. tests/kv/test_protocol.py fails if any of that changes.
    """
    return b"%x\r\n%s\r\n" % (len(data), data)


class WriteTransport(Protocol):
    def get_write_buffer_size(self) -> int: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


# Linux's SIOCOUTQ, which for a TCP socket is the bytes sent or queued that the peer has not
# acknowledged (TIOCOUTQ is the same request number).
_OUTQ = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None


def unsent_bytes(transport: WriteTransport) -> int:
    """Bytes written to ``transport`` that its peer has not yet taken: those in the
    transport's buffer, and, on Linux, those in the kernel's send queue not yet acknowledged.
    The kernel's queue grows to megabytes for a slow reader and is written to again only once
    a good part of it is free, so the transport's buffer alone can stand still for seconds
    while the reader is reading."""
    waiting = transport.get_write_buffer_size()
    if _OUTQ is None:
        return waiting
    sock = transport.get_extra_info("socket")
    if sock is None:
        return waiting
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):  # closed meanwhile, or not a socket the kernel tells of
        return waiting
    return waiting + int(queued)
