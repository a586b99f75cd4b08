"""The history's trimming policy, store-neutral: what one pass of trim_history drops (see
Store.trim_history and base.py's account of marks). Each store runs it with its own SQL or
lists; none decides for itself."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional


def trim_cut(oldest: Iterable[int], compact_revision: int, excess: int, aged: int) -> int:
    """The revision to trim through, from the oldest changes' revisions in order: the last of
    a run from the first that are each at or below ``compact_revision``, at or below ``aged``
    (every change up to it is older than the retention), or among the first ``excess`` rows.
    A revision is trimmed whole, so a cut may take a few rows more than ``excess``."""
    cut = compact_revision
    for position, revision in enumerate(oldest):
        if revision > compact_revision and revision > aged and position >= excess:
            break
        cut = max(cut, revision)
    return cut


@dataclass(frozen=True)
class TrimPolicy:
    """One pass of trimming: changes older than ``max_age`` seconds, or beyond the newest
    ``max_rows``, go, up to about ``batch`` of the oldest rows a pass, whole revisions at a
    time. A pass first marks the store's revision with the time; a change is old once a mark
    at or above its revision is older than the cutoff."""

    max_age: float
    max_rows: int
    batch: int

    def cutoff(self, now_ms: float) -> float:
        """The time (ms) at or before which a mark is aged. The newest such mark decides; the
        older ones are needed no more, and the store drops them."""
        return now_ms - self.max_age * 1000

    def cut(
        self, oldest: Sequence[int], compact_revision: int, rows: int, aged: Optional[int]
    ) -> int:
        """The revision to trim through, to which the compact revision moves: from the
        ``batch`` oldest changes' revisions, the history's ``rows``, and the newest aged
        mark's revision (None while no mark is aged)."""
        return trim_cut(oldest, compact_revision, rows - self.max_rows, aged or 0)

    @staticmethod
    def drops(oldest: Sequence[int], cut: int) -> bool:
        """Whether a cut at ``cut`` drops any row: the compact revision may move up without
        one (a bulk load moved it)."""
        return bool(oldest) and oldest[0] <= cut
