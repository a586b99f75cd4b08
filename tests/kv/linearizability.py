"""A linearizability checker for histories of requests to one store, after Wing and Gong: is
there an order of the operations, each taking effect at one instant between its request and
its answer, in which every answer is what a single copy of the store would have given?

Linearizability is local (Herlihy and Wing): a history is linearizable when the history of
each key alone is, so each key is checked on its own, a depth-first search over which
operation takes effect next, remembering the (operations done, state) pairs already tried.

An operation whose answer was lost (a timeout, a refused or reset connection, a 503 for a
write) may or may not have taken effect: it has no answer time, so it may be placed anywhere
after its request, or (equivalently, for what anyone observed) after everything else.

A key's state is its value and version, or None when absent. A write's new version is what
its answer said (the ETag); a write whose answer was lost set a version nobody saw, which
the first read or condition that meets it then names.

A ``POST /txn`` compare-and-set (compare the key's version, set it on success, get it on
failure) is one operation at one instant: its failure branch's get is a read at the instant
its compare failed, so a failed txn is held to what it read, as a read is, and what it read
must make the compare false.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

# A key's state: (value, version) with version None when nobody has seen it yet, or None
# for an absent key.
State = Optional[tuple[str, Optional[int]]]

LOST = "lost"  # the outcome of an operation whose answer never came


@dataclass(frozen=True)
class Operation:
    """One request and its answer.

    kind: "read" (outcome: (value, version) or None), "write" (an unconditional set;
    outcome: the new version), "cas" (a set with If-Match: ``expected`` version; outcome: the
    new version, or "failed"), "create" (a set with If-None-Match: *; outcome: the new version,
    or "failed"), "delete" (outcome: "deleted" or "absent"), "txn" (a POST /txn that compares
    the key's version with ``expected``, 0 for absent as the API counts it, so that
    ``{"exists": false}`` is ``expected=0``; sets ``value`` on success and gets the key on
    failure; outcome: the new version, the txn's revision, or TxnFailed with what the get
    read). Any kind's outcome may be LOST.
    """

    key: str
    kind: str
    start: float
    end: float  # math.inf when the outcome is LOST
    value: Optional[str] = None  # what a write sets
    expected: Optional[int] = None  # a cas's version
    outcome: object = None


@dataclass(frozen=True)
class TxnFailed:
    """The outcome of a txn whose compare failed: what its failure branch's get read, at the
    same instant: (value, version), or None when the key was absent."""

    seen: State


def lost(key: str, kind: str, start: float, **fields: object) -> Operation:
    return Operation(key, kind, start, math.inf, outcome=LOST, **fields)  # type: ignore[arg-type]


def _read(state: State, seen: State) -> list[State]:
    """The state a read that saw ``seen`` leaves (an unseen version is seen now); none when
    it could not have seen it in ``state``."""
    if seen is None or state is None:
        return [state] if seen is None and state is None else []
    value, version = seen
    if value != state[0] or state[1] not in (None, version):
        return []
    return [(value, version)]


def _step(state: State, op: Operation) -> list[State]:
    """The states ``op`` may leave when it takes effect in ``state``; none when its outcome
    could not have come from ``state``. (That a lost operation may not have taken effect at
    all needs no state here: the search may place it after everything else.)"""
    outcome = op.outcome
    if op.kind == "read":
        return [state] if outcome is LOST else _read(state, outcome)  # type: ignore[arg-type]
    if op.kind == "txn" and isinstance(outcome, TxnFailed):
        # Its compare was false of the very state its get read.
        seen = _read(state, outcome.seen)
        return [after for after in seen if (0 if after is None else after[1]) != op.expected]
    new_version = None if outcome is LOST else outcome
    if op.kind == "write":
        return [(op.value, new_version)]  # type: ignore[list-item]
    if op.kind == "create" or (op.kind == "txn" and op.expected == 0):
        # A txn's compare of version 0 holds of a missing key only, as {"exists": false}.
        holds = state is None
        refused = not holds
    elif op.kind in ("cas", "txn"):
        # An unseen version may be the expected one, or not.
        holds = state is not None and state[1] in (None, op.expected)
        refused = state is None or state[1] != op.expected
    elif op.kind == "delete":
        if outcome == "deleted":
            return [None] if state is not None else []
        if outcome == "absent":
            return [state] if state is None else []
        return [None]  # lost: deleted, if it was there
    else:
        raise ValueError(f"unknown operation kind {op.kind!r}")
    applied: State = (op.value, new_version)  # type: ignore[assignment]
    if outcome is LOST:
        return ([applied] if holds else []) + ([state] if refused else [])
    if outcome == "failed":
        return [state] if refused else []
    return [applied] if holds else []


class TooLarge(Exception):
    """The search passed its budget: the history is too concurrent to judge in time."""


# States a key's search may visit before it gives up (TooLarge) rather than run for hours.
BUDGET = 2_000_000


def _prune(operations: Sequence[Operation]) -> list[Operation]:
    """The operations minus those that can constrain nothing: a read without an answer, and
    an unconditional write without an answer whose value no read returned (had it taken
    effect, nothing saw it before the next write; it may as well come last). A failed txn's
    get is a read."""
    answers = [
        op.outcome.seen if isinstance(op.outcome, TxnFailed) else op.outcome
        for op in operations
        if op.kind in ("read", "txn")
    ]
    read = {answer[0] for answer in answers if isinstance(answer, tuple)}
    return [
        op
        for op in operations
        if op.outcome is not LOST
        or not (op.kind == "read" or (op.kind == "write" and op.value not in read))
    ]


def check_key(operations: Sequence[Operation], initial: State, budget: int = BUDGET) -> bool:
    """Whether the operations on one key are linearizable from ``initial``: a depth-first
    search (on a stack of its own: a key may have thousands of operations) over which
    operation takes effect next."""
    ops = sorted(_prune(operations), key=lambda op: op.start)
    count = len(ops)
    everything = (1 << count) - 1

    def moves(done: int, state: State) -> Iterator[tuple[int, State]]:
        # The next to take effect started before every pending operation's answer came. The
        # pending ones are taken in order of start (lowest bit first) up to the first that
        # started after such an answer: none after it may go first, or has an earlier
        # answer. So a step costs the pending few, not the whole history.
        deadline = math.inf
        candidates = []
        pending = everything ^ done
        while pending:
            lowest = pending & -pending
            index = lowest.bit_length() - 1
            if ops[index].start > deadline:
                break
            deadline = min(deadline, ops[index].end)
            candidates.append(index)
            pending ^= lowest
        for index in candidates:
            for after in _step(state, ops[index]):
                yield done | 1 << index, after

    if count == 0:
        return True
    tried: set[tuple[int, State]] = set()
    stack = [moves(0, initial)]
    while stack:
        move = next(stack[-1], None)
        if move is None:
            stack.pop()
            continue
        if move[0] == everything:
            return True
        if move in tried:
            continue
        tried.add(move)
        if len(tried) > budget:
            raise TooLarge(f"{ops[0].key}: over {budget} states, {count} operations")
        stack.append(moves(*move))
    return False


def check(
    operations: Iterable[Operation], initial: Optional[Mapping[str, State]] = None
) -> list[str]:
    """The keys whose histories are not linearizable (an empty list: the whole history is)."""
    by_key: dict[str, list[Operation]] = defaultdict(list)
    for op in operations:
        by_key[op.key].append(op)
    return sorted(
        key for key, ops in by_key.items() if not check_key(ops, (initial or {}).get(key))
    )
