"""Read grouping: the GETs of one event-loop turn, collected by key and handed to the
backend as one group, so that they cost one query.

One query for many keys costs less than a query per key: a local store pays its driver's
per-statement work once and looks the keys up in order, a networked one pays one round trip
(bench/results.md has the figures).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Callable, Optional

from .base import Entry

# The GETs of one group: each key, and the futures of the requests that asked for it.
Waiting = dict[str, list["asyncio.Future[Optional[Entry]]"]]


class ReadGroups:
    """Collects GETs by key; at the end of the loop turn in which the first arrived, hands
    them to ``start`` as one group. ``start`` answers them (see answer and fail), at once or
    later; a backend whose groups end later says so with ``ended``. With ``max_in_flight``,
    no group starts while that many are in flight: the GETs that arrive meanwhile wait to go
    as one bigger group when the first of them ends."""

    __slots__ = ("_in_flight", "_max_in_flight", "_scheduled", "_start", "_waiting")

    def __init__(
        self, start: Callable[[Waiting], None], max_in_flight: Optional[int] = None
    ) -> None:
        self._start = start
        self._max_in_flight = max_in_flight
        self._waiting: Waiting = {}
        self._scheduled = False
        self._in_flight = 0

    def join(self, key: str) -> asyncio.Future[Optional[Entry]]:
        """A future for what ``key`` holds, answered with the group this GET joins."""
        future: asyncio.Future[Optional[Entry]] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [future]
        else:
            waiting.append(future)
        if not self._scheduled:
            self._schedule()
        return future

    def _schedule(self) -> None:
        """Start a group at the end of this turn, unless as many are in flight as may be
        (then the first of them to end starts it)."""
        if self._max_in_flight is not None and self._in_flight >= self._max_in_flight:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._start_group)

    def _start_group(self) -> None:
        waiting, self._waiting = self._waiting, {}
        self._scheduled = False
        self._in_flight += 1
        self._start(waiting)

    def ended(self) -> None:
        """A group has been answered: the GETs that waited for it go next."""
        self._in_flight -= 1
        if self._waiting and not self._scheduled:
            self._schedule()


def answer(waiting: Waiting, found: Mapping[str, Entry]) -> None:
    """Answer every GET of a group with what its key holds (None for a key not ``found``)."""
    for key, futures in waiting.items():
        entry = found.get(key)
        for future in futures:
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(entry)


def fail(waiting: Waiting, error: BaseException) -> None:
    """Answer every GET of a group with ``error``: each must get an answer, or it would wait
    forever."""
    for futures in waiting.values():
        for future in futures:
            if not future.done():
                future.set_exception(error)
