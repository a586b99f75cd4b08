"""Several server processes on one port: a supervisor seeds once, then runs N workers.

Each worker is a whole server (its own event loop and SQLite connections) bound to the same
port with SO_REUSEPORT, so the kernel spreads connections over them. They share the sqlite
store's file: WAL lets their reads run side by side, and SQLite serialises their commits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import wait
from types import FrameType
from typing import Optional, cast

import structlog

from . import metrics
from .app import Worker, prepare_store, run_event_loop, serve
from .errors import StartupError
from .logs import configure_logging
from .settings import Settings

log = structlog.get_logger("kv.workers")


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
