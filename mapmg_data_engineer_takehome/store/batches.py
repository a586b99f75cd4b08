"""The batch cut: rows gathered into batches of at most N rows, each ending at the row that
takes its values past C characters. Exports and imports, in every store, cut by it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Optional, TypeVar

from .base import EXPORT_BATCH_CHARS, EXPORT_BATCH_ROWS, LoadRow

Row = TypeVar("Row")
# A bulk load's row: a plain tuple, or a BulkRow.
AnyLoadRow = TypeVar("AnyLoadRow", bound=LoadRow)


class BatchCut(Generic[Row]):
    """Gathers rows, one at a time, into batches: a batch is full at ``max_rows`` rows, or at
    the row whose value takes it to ``max_chars`` characters, so that a batch of large values
    is a few MiB, not hundreds."""

    __slots__ = ("_batch", "_chars", "_max_chars", "_max_rows")

    def __init__(
        self, max_rows: int = EXPORT_BATCH_ROWS, max_chars: int = EXPORT_BATCH_CHARS
    ) -> None:
        self._max_rows = max_rows
        self._max_chars = max_chars
        self._batch: list[Row] = []
        self._chars = 0

    def add(self, row: Row, chars: int) -> Optional[list[Row]]:
        """Take ``row``, whose value has ``chars`` characters; the batch it fills, if any."""
        batch = self._batch
        batch.append(row)
        self._chars += chars
        if len(batch) < self._max_rows and self._chars < self._max_chars:
            return None
        self._batch, self._chars = [], 0
        return batch

    def rest(self) -> Optional[list[Row]]:
        """The last batch, not full, once the rows have ended; None when it is empty."""
        batch, self._batch, self._chars = self._batch, [], 0
        return batch or None


def batched(
    rows: Iterable[AnyLoadRow],
    max_rows: int = EXPORT_BATCH_ROWS,
    max_chars: int = EXPORT_BATCH_CHARS,
) -> Iterator[list[AnyLoadRow]]:
    """``rows`` (key, value, expiry) cut into batches by BatchCut."""
    cut: BatchCut[AnyLoadRow] = BatchCut(max_rows, max_chars)
    for row in rows:
        if (full := cut.add(row, len(row[1]))) is not None:
            yield full
    if (rest := cut.rest()) is not None:
        yield rest
