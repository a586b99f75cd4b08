"""The revision-wake notifier: a store's listener (see Store.listen) is woken once for each
revision this process learns of, not for every commit or poll that finds nothing new."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

from .base import Wake


class RevisionWake:
    """Wakes the listener that ``listening`` installed, for revisions it has not been woken
    for: ``moved`` for this process's commits (only a newer revision is news: a commit that
    finishes after a later one must not wake for it again), ``seen`` for a revision read from
    the store (any other number is news: newer, or the store was restored under it)."""

    __slots__ = ("known_revision", "wake")

    def __init__(self) -> None:
        self.wake: Optional[Wake] = None
        # The newest revision this process has woken its listener for.
        self.known_revision = 0

    @contextlib.contextmanager
    def listening(self, wake: Wake) -> Iterator[None]:
        """``wake`` is the listener while the block runs."""
        self.wake = wake
        try:
            yield
        finally:
            self.wake = None

    def moved(self, revision: int) -> None:
        """This process committed ``revision``: wake the listener if that is news."""
        if revision > self.known_revision:
            self.known_revision = revision
            if self.wake is not None:
                self.wake()

    def seen(self, revision: int) -> None:
        """The store was read at ``revision``: wake the listener unless it was woken for it."""
        if revision != self.known_revision:
            self.known_revision = revision
            if self.wake is not None:
                self.wake()

    def poke(self) -> None:
        """Wake the listener whatever the revision: a trim moved the compact revision, which
        the feed's tail learns from the store."""
        if self.wake is not None:
            self.wake()
