"""Prometheus metrics (prometheus-client), served at /metrics in the text format.

Labels never hold a key or a value: requests are labelled by route pattern (``/get/{key}``),
method and status.

With KV_WORKERS above 1, each process writes its values to files in a directory shared by
all (prometheus-client's multiprocess mode), so that a scrape answered by any worker reports
the totals of all. The supervisor sets that directory up before any worker starts, empties
it, and marks the files of a worker that died. prometheus-client reads the directory's name
from PROMETHEUS_MULTIPROC_DIR when it is first imported, which is why this module imports it
only inside functions called after ``prepare``.
"""

from __future__ import annotations

import bisect
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Optional

from .store.base import HistoryStats

MULTIPROCESS_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Most answers take well under a millisecond: the buckets start at 100 µs.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def prepare_multiprocess(directory: Optional[Path] = None) -> Path:
    """Set up the shared directory for KV_WORKERS processes (call before importing
    prometheus_client anywhere, and before starting them); it is emptied first, since a
    file left by an earlier run would add to this run's totals."""
    path = directory or Path(tempfile.gettempdir()) / f"kv-metrics-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROCESS_VARIABLE] = str(path)
    return path


def mark_dead(pid: int) -> None:
    """A worker ended: its gauges' files go (its counters stay, as totals should)."""
    if os.environ.get(MULTIPROCESS_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def cleanup_multiprocess() -> None:
    directory = os.environ.pop(MULTIPROCESS_VARIABLE, None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


class Metrics:
    """Every metric this server reports, in a registry of its own."""

    def __init__(self) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        # The *_created series (a timestamp per label set) say nothing a scrape needs here.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_VARIABLE))
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        counter = partial(Counter, registry=registry)
        histogram = partial(Histogram, registry=registry)
        # A gauge of the store's state: with workers, the value the latest of them wrote.
        store_gauge = partial(Gauge, registry=registry, multiprocess_mode="mostrecent")
        self.requests = counter(
            "kv_requests",
            "Requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
        )
        self.duration = histogram(
            "kv_request_duration_seconds",
            "Seconds from the handler's start to its answer, by route pattern.",
            ["route"],
            buckets=DURATION_BUCKETS,
        )
        self.commit_groups = histogram(
            "kv_commit_group_writes",
            "Writes per committed transaction: _count is commits, _sum writes committed.",
            buckets=GROUP_BUCKETS,
        )
        self.purged = counter(
            "kv_expired_keys_purged",
            "Rows of expired keys deleted by the purge.",
        )
        self.seed_rows = counter(
            "kv_seed_rows",
            "Rows of input.db read, applied and skipped by seeding.",
            ["outcome"],
        )
        self.bulk_rows = counter(
            "kv_bulk_rows",
            "Keys written by GET /export (exported), and lines of POST /import applied "
            "(imported) or skipped as expired (skipped), once the import has committed.",
            ["outcome"],
        )
        self.transactions = counter(
            "kv_transactions",
            "POST /txn answered, by outcome: succeeded (every compare held) or failed.",
            ["outcome"],
        )
        self.leases = counter(
            "kv_leases",
            "Leases by event: granted (POST /leases), revoked (DELETE /leases/{id}) or "
            "expired (removed by the upkeep once their time ran out).",
            ["event"],
        )
        self.tokens = counter(
            "kv_tokens",
            "Access tokens by event: created (POST /tokens), rotated or revoked.",
            ["event"],
        )
        self.leases_live = store_gauge(
            "kv_leases_live",
            "Leases granted and neither revoked nor expired, on the store.",
        )
        self.store_errors = counter(
            "kv_store_errors",
            "Failed store calls by kind: unavailable (503), corrupt or error (500).",
            ["kind"],
        )
        self.auth_refusals = counter(
            "kv_auth_refusals",
            "Requests refused by access control, by reason: missing (no bearer token), "
            "unknown (a secret no live token has: revoked and rotated-out ones too), expired "
            "(401); forbidden (a key or prefix outside the token's rules), not_admin (403).",
            ["reason"],
        )
        self.keys = store_gauge(
            "kv_keys",
            "Keys in the store (expired ones not yet purged included); kept by the store as "
            "it writes, never counted per scrape.",
        )
        self.watchers = Gauge(
            "kv_watchers",
            "Watchers of /changes connected, by transport: sse (a stream) or longpoll (a "
            "request waiting).",
            ["transport"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.events_sent = counter(
            "kv_change_events_sent",
            "Change events sent to watchers, by transport.",
            ["transport"],
        )
        self.history_rows = store_gauge(
            "kv_change_history_rows",
            "Changes the store's history keeps (KV_CHANGES_RETENTION, KV_CHANGES_MAX).",
        )
        self.compact_revision = store_gauge(
            "kv_change_compact_revision",
            "The revision above which the history is whole: a watcher from below it is told "
            "to list again (410).",
        )
        if not self.multiprocess:
            from prometheus_client import PlatformCollector, ProcessCollector

            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        # Requests and commits are recorded into plain numbers, moved into the metrics above
        # in bulk (at each scrape, and every second with workers): prometheus-client's own
        # calls, a lock and a loop over the buckets per observation, cost more than the rest
        # of the request wrapper. See flush.
        self._bounds = (*DURATION_BUCKETS, math.inf)
        self._requests: dict[tuple[str, str, int], int] = {}
        self._durations: dict[str, list[float]] = {}  # per bucket, then the sum last
        self._group_bounds = (*GROUP_BUCKETS, math.inf)
        self._groups = [0.0] * (len(self._group_bounds) + 1)
        self._events_sent: dict[str, int] = {}
        self._transactions = {"succeeded": 0, "failed": 0}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self._requests[key] = self._requests.get(key, 0) + 1
        counts = self._durations.get(route)
        if counts is None:
            counts = self._durations[route] = [0.0] * (len(self._bounds) + 1)
        counts[bisect.bisect_left(self._bounds, seconds)] += 1
        counts[-1] += seconds

    def flush(self) -> None:
        """Move the requests and commits recorded since the last flush into the metrics."""
        requests, self._requests = self._requests, {}
        for (route, method, status), count in requests.items():
            self.requests.labels(route, method, str(status)).inc(count)
        durations, self._durations = self._durations, {}
        for route, counts in durations.items():
            add_observations(self.duration.labels(route), counts[:-1], counts[-1])
        groups, self._groups = self._groups, [0.0] * len(self._groups)
        if any(groups):
            add_observations(self.commit_groups, groups[:-1], groups[-1])
        events_sent, self._events_sent = self._events_sent, {}
        for transport, count in events_sent.items():
            self.events_sent.labels(transport).inc(count)
        transactions, self._transactions = self._transactions, {"succeeded": 0, "failed": 0}
        for outcome, count in transactions.items():
            self.transactions.labels(outcome).inc(count)

    def observe_events_sent(self, transport: str, count: int) -> None:
        self._events_sent[transport] = self._events_sent.get(transport, 0) + count

    def observe_lease(self, event: str) -> None:
        """A lease granted, revoked or expired (a label of kv_leases: never an id)."""
        self.leases.labels(event).inc()

    def observe_token(self, event: str) -> None:
        """A token created, rotated or revoked (a label of kv_tokens: never a name)."""
        self.tokens.labels(event).inc()

    def observe_txn(self, succeeded: bool) -> None:
        self._transactions["succeeded" if succeeded else "failed"] += 1

    def observe_commit(self, writes: int) -> None:
        counts = self._groups
        counts[bisect.bisect_left(self._group_bounds, writes)] += 1
        counts[-1] += writes

    def observe_seed(self, read: int, applied: int, skipped: int) -> None:
        self.seed_rows.labels("read").inc(read)
        self.seed_rows.labels("applied").inc(applied)
        self.seed_rows.labels("skipped").inc(skipped)

    def render(self, keys: int, history: HistoryStats, live_leases: int = 0) -> bytes:
        """The text format, with ``keys`` (the store's count) as kv_keys, the store's
        ``history`` and its live leases: this process's metrics, or with workers every
        process's."""
        from prometheus_client import CollectorRegistry, generate_latest

        self.flush()
        self.keys.set(keys)
        self.leases_live.set(live_leases)
        self.history_rows.set(history.rows)
        self.compact_revision.set(history.compact_revision)
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import ProcessCollector, multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        ProcessCollector(registry=merged)  # the process that answers the scrape
        return generate_latest(merged)


def add_observations(histogram: Any, counts: Sequence[float], total: float) -> None:
    """Add observations to a prometheus-client histogram at once: ``counts[i]`` of them in
    its i-th bucket (bounded above by its i-th upper bound, +Inf last), summing ``total``.

    prometheus-client has no public call for it, so this uses the two attributes ``observe``
    itself uses, ``_buckets`` (a value per bucket, not cumulative) and ``_sum``: the one
    place that does, pinned by tests/kv/test_metrics.py, which fails if they change.
    """
    for bucket, count in zip(histogram._buckets, counts):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)
