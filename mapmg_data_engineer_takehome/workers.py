"""The process runtime: one server process (serve), or a supervisor that seeds once, then runs
N workers on one port.

serve runs the application create_app builds until SIGTERM or SIGINT, then finishes the
requests in flight and closes. With workers, each is a whole server (its own event loop and
SQLite connections) bound to the same port with SO_REUSEPORT, so the kernel spreads
connections over them. They share the sqlite store's file: WAL lets their reads run side by
side, and SQLite serialises their commits.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType
from typing import Any, Optional, cast

import structlog
from aiohttp import web

from . import metrics
from .app import create_app, prepare_store
from .errors import StartupError
from .logs import configure_logging
from .protocol import MAX_REQUEST_LINE_BYTES, ServerRunner, close_stalled_connections
from .settings import Settings

log = structlog.get_logger("kv.workers")
# A server's own lines (starting, listening, stopped) keep the logger name they have always had.
server_log = structlog.get_logger("kv.app")


def run_event_loop(main_coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (it halves the event loop's cost), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


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


@dataclass(frozen=True)
class Worker:
    """Who a worker process is: its number (from 1) and its supervisor's pid."""

    number: int
    supervisor_pid: int


async def serve(settings: Settings, worker: Optional[Worker] = None) -> None:
    """Start, serve until SIGTERM or SIGINT, then finish in-flight requests and close.

    A ``worker`` shares its port with its siblings, does not seed, and stops if its
    supervisor dies.
    """
    runner = ServerRunner(
        # Workers share a store seeded by their supervisor, and one of them purges it.
        create_app(settings, seed=worker is None, purge=worker is None or worker.number == 1),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.shutdown_timeout,
        max_line_size=MAX_REQUEST_LINE_BYTES,
        # Idle keep-alive connections close after this; close_stalled_connections covers
        # the time a request takes to arrive.
        keepalive_timeout=settings.client_timeout,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stop_on_signals(loop, stop)
    loop.set_exception_handler(log_loop_error)
    if worker is None:
        server_log.info("starting", settings=settings.public_view())
    await runner.setup()  # opens the store and seeds: nothing is bound yet
    assert runner.server is not None
    sweeper = asyncio.ensure_future(
        close_stalled_connections(runner.server, settings.client_timeout)
    )
    try:
        addresses = []
        for host in listen_hosts(settings.host):
            # SO_REUSEPORT: the kernel spreads connections over every worker on the port.
            site = web.TCPSite(runner, host, settings.port, reuse_port=worker is not None)
            try:
                await site.start()
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {host}:{settings.port}: {error.strerror}"
                ) from None
            addresses.append(site.name)
        server_log.info("listening", addresses=addresses)
        if worker is not None:
            stop_when_orphaned(stop, worker.supervisor_pid)
        await stop.wait()
        server_log.info("shutting_down")
    finally:
        sweeper.cancel()
        await runner.cleanup()
    server_log.info("stopped")


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's default handler logs the repr of the failing callback, arguments (a key, a
    value) included; this one logs asyncio's sentence up to that repr, and the exception."""
    message = str(context.get("message", "")).split("<", 1)[0].split("(", 1)[0].strip()
    server_log.error("event_loop_error", message=message, exc_info=context.get("exception"))


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT (Ctrl-C) set ``stop``.

    Windows' event loops have no add_signal_handler; there a plain signal handler, which runs
    between bytecodes of the main thread, hands the signal to the loop thread-safely.
    """
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except NotImplementedError:
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))


def stop_when_orphaned(stop: asyncio.Event, supervisor: int, interval: float = 1.0) -> None:
    """Set ``stop`` once this worker's supervisor is gone (killed with -9, say), so that no
    worker outlives it holding the port. Its pid is passed in rather than read here: the
    supervisor may already be gone when a slow worker gets this far."""
    loop = asyncio.get_running_loop()

    def check() -> None:
        if os.getppid() != supervisor:
            server_log.warning("supervisor_gone", supervisor=supervisor)
            stop.set()
        else:
            loop.call_later(interval, check)

    loop.call_later(interval, check)


def _run_worker(settings: Settings, worker: Worker) -> None:
    """A worker process's entry point (runs in a fresh interpreter)."""
    number = worker.number
    configure_logging(settings, worker=number)
    try:
        run_event_loop(serve(settings, worker))
    except StartupError as error:
        structlog.get_logger("kv").error("startup_failed", reason=str(error), worker=number)
        print(f"error: worker {number}: {error}", file=sys.stderr)
        sys.exit(1)


def supervise(settings: Settings) -> int:
    """Seed, start the workers, forward SIGTERM and SIGINT to them; 0 when all ended cleanly.

    A worker that dies while the others serve stops them all, so that whatever restarts
    the service starts it whole; the exit status is then 1.
    """
    log.info("starting", settings=settings.public_view(), workers=settings.worker_count)
    if settings.metrics:
        # Before anything imports prometheus-client, here and in the workers (who inherit it).
        metrics.prepare_multiprocess()
    try:
        return _supervise(settings)
    finally:
        metrics.cleanup_multiprocess()


def _supervise(settings: Settings) -> int:
    run_event_loop(prepare_store(settings))  # before any port opens: no half-seeded reads
    # spawn, not fork: a worker starts from a clean interpreter, sharing no SQLite handles
    # or threads with the supervisor.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_run_worker,
            args=(settings, Worker(number, os.getpid())),
            name=f"kv-worker-{number}",
        )
        for number in range(1, settings.worker_count + 1)
    ]
    stopping = False

    def stop_all(signum: int, frame: Optional[FrameType]) -> None:
        nonlocal stopping
        stopping = True
        for process in processes:
            if process.is_alive() and process.pid is not None:
                process.terminate()  # SIGTERM: each worker finishes its requests

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for process in processes:
        process.start()
    running = {process.sentinel: process for process in processes}
    while running:
        for sentinel in wait(list(running)):
            process = running.pop(cast(int, sentinel))
            process.join()  # the sentinel fires as the process ends; join reaps it
            if process.pid is not None:
                metrics.mark_dead(process.pid)
            if process.exitcode != 0 and not stopping:
                log.error("worker_died", worker=process.name, exitcode=process.exitcode)
                stop_all(signal.SIGTERM, None)
    # A worker still starting when SIGTERM came dies of it before its handler is in place:
    # that is a clean stop too.
    clean = {0, -signal.SIGTERM} if stopping else {0}
    failed = {
        process.name: process.exitcode for process in processes if process.exitcode not in clean
    }
    log.info("stopped", failed_workers=failed)
    return 1 if failed else 0
