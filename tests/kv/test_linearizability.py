"""The checker the failover tests judge their histories with (linearizability.py): it accepts
what a single copy of the store could have answered, and catches what none could."""

from __future__ import annotations

import pytest

from .linearizability import Operation, TooLarge, TxnFailed, check, check_key, lost


def op(kind: str, start: float, end: float, outcome: object = None, **fields: object) -> Operation:
    return Operation("k", kind, start, end, outcome=outcome, **fields)  # type: ignore[arg-type]


def test_reads_see_the_last_write_that_ended_before_them() -> None:
    assert check([op("write", 0, 1, 5, value="a"), op("read", 2, 3, ("a", 5))]) == []
    assert check([op("write", 0, 1, 5, value="a"), op("read", 2, 3, None)]) == ["k"]
    stale = [
        op("write", 0, 1, 5, value="a"),
        op("write", 2, 3, 6, value="b"),
        op("read", 4, 5, ("a", 5)),
    ]
    assert check(stale) == ["k"]


def test_a_read_during_a_write_may_see_either_but_not_go_back() -> None:
    for seen in [None, ("a", 5)]:
        assert check([op("write", 0, 10, 5, value="a"), op("read", 1, 2, seen)]) == []
    back_and_forth = [
        op("write", 0, 10, 5, value="a"),
        op("read", 1, 2, ("a", 5)),
        op("read", 3, 4, None),
    ]
    assert check(back_and_forth) == ["k"]


def test_a_lost_write_may_or_may_not_have_applied_but_nothing_else_appears() -> None:
    for seen in [None, ("a", 9)]:
        assert check([lost("k", "write", 0, value="a"), op("read", 5, 6, seen)]) == []
    assert check([lost("k", "write", 0, value="a"), op("read", 5, 6, ("b", 9))]) == ["k"]
    # Once seen, it stays: a later read cannot find it gone.
    gone_again = [
        lost("k", "write", 0, value="a"),
        op("read", 5, 6, ("a", 9)),
        op("read", 7, 8, None),
    ]
    assert check(gone_again) == ["k"]


def test_of_two_compare_and_sets_at_one_version_only_one_succeeds() -> None:
    start = op("write", 0, 1, 5, value="0")
    both = [
        start,
        op("cas", 2, 4, 6, value="1", expected=5),
        op("cas", 2, 4, 7, value="1", expected=5),
    ]
    assert check(both) == ["k"]
    one = [
        start,
        op("cas", 2, 4, 6, value="1", expected=5),
        op("cas", 2, 4, "failed", value="1", expected=5),
    ]
    assert check(one) == []


def test_a_lost_compare_and_set_that_applied_is_named_by_the_next_read() -> None:
    history = [
        op("write", 0, 1, 5, value="0"),
        lost("k", "cas", 2, value="1", expected=5),
        op("read", 3, 4, ("1", 8)),
        op("cas", 5, 6, 9, value="2", expected=8),
    ]
    assert check(history) == []
    history[-1] = op("cas", 5, 6, 9, value="2", expected=5)  # the version it replaced
    assert check(history) == ["k"]


def test_creates_and_deletes() -> None:
    history = [
        op("create", 0, 1, 5, value="a"),
        op("create", 2, 3, "failed", value="b"),
        op("delete", 4, 5, "deleted"),
        op("delete", 6, 7, "absent"),
        op("create", 8, 9, 10, value="c"),
        op("read", 10, 11, ("c", 10)),
    ]
    assert check(history) == []
    assert check([op("create", 0, 1, "failed", value="a")]) == ["k"]
    assert check([op("delete", 0, 1, "deleted")]) == ["k"]


def test_of_two_txns_comparing_one_version_only_one_succeeds() -> None:
    start = op("write", 0, 1, 5, value="0")
    both = [
        start,
        op("txn", 2, 4, 6, value="1", expected=5),
        op("txn", 2, 4, 7, value="1", expected=5),
    ]
    assert check(both) == ["k"]
    one = [
        start,
        op("txn", 2, 4, 6, value="1", expected=5),
        op("txn", 2, 4, TxnFailed(("1", 6)), value="1", expected=5),
    ]
    assert check(one) == []
    # A failure that began after a success ended cannot read the state before it.
    assert check([*one[:2], op("txn", 5, 6, TxnFailed(("0", 5)), value="1", expected=5)]) == ["k"]


def test_a_failed_txn_is_held_to_what_its_failure_branch_read() -> None:
    start = op("write", 0, 1, 5, value="0")
    # Its get saw the state it compared false: fine.
    assert check([start, op("txn", 2, 3, TxnFailed(("0", 5)), value="1", expected=4)]) == []
    # A value or a version nobody wrote, or an absent key that was there.
    for impossible in [("9", 5), ("0", 7), None]:
        history = [start, op("txn", 2, 3, TxnFailed(impossible), value="1", expected=4)]
        assert check(history) == ["k"], impossible
    # What it saw made its compare true: it should have succeeded.
    assert check([start, op("txn", 2, 3, TxnFailed(("0", 5)), value="1", expected=5)]) == ["k"]
    # It saw a stale state, after a later write had been acknowledged.
    stale = [
        start,
        op("txn", 2, 3, 6, value="1", expected=5),
        op("txn", 4, 5, TxnFailed(("0", 5)), value="2", expected=4),
    ]
    assert check(stale) == ["k"]


def test_a_txn_on_a_missing_key_compares_version_0() -> None:
    """``{"exists": false}``, or a version of 0: true of an absent key only."""
    created = [
        op("txn", 0, 1, 5, value="a", expected=0),
        op("txn", 2, 3, TxnFailed(("a", 5)), value="b", expected=0),
        op("read", 4, 5, ("a", 5)),
    ]
    assert check(created) == []
    assert check([op("txn", 0, 1, TxnFailed(None), value="a", expected=0)]) == ["k"]
    both = [op("txn", 0, 2, 5, value="a", expected=0), op("txn", 0, 2, 6, value="b", expected=0)]
    assert check(both) == ["k"]
    # A failed compare of a version against a missing key reads it missing.
    assert check([op("txn", 0, 1, TxnFailed(None), value="a", expected=3)]) == []
    assert check([op("txn", 0, 1, 4, value="a", expected=3)]) == ["k"]


def test_a_lost_txn_may_have_applied_and_a_failed_one_names_its_unseen_version() -> None:
    start = op("write", 0, 1, 5, value="0")
    for seen in [("0", 5), ("1", 8)]:
        history = [
            start,
            lost("k", "txn", 2, value="1", expected=5),
            op("txn", 3, 4, TxnFailed(seen), value="x", expected=2),
        ]
        assert check(history) == [], seen
    # Its write's version, seen by a failed txn, is the one the next txn must compare.
    history = [
        start,
        lost("k", "txn", 2, value="1", expected=5),
        op("txn", 3, 4, TxnFailed(("1", 8)), value="x", expected=5),
        op("txn", 5, 6, 9, value="2", expected=8),
    ]
    assert check(history) == []
    history[-1] = op("txn", 5, 6, 9, value="2", expected=5)
    assert check(history) == ["k"]
    # A lost unconditional write whose value only a failed txn read is not dropped unseen.
    seen_by_a_txn = [
        start,
        lost("k", "write", 2, value="w"),
        op("txn", 3, 4, TxnFailed(("w", 7)), value="x", expected=5),
    ]
    assert check(seen_by_a_txn) == []


def test_keys_are_judged_apart_and_from_their_initial_state() -> None:
    other = Operation("j", "read", 0, 1, outcome=("x", 1))
    assert check([other], initial={"j": ("x", 1)}) == []
    assert check([other, op("read", 0, 1, None)]) == ["j"]


def test_a_long_history_is_judged_and_an_untamed_one_refused() -> None:
    """Thousands of operations in a row (no recursion limit), and a budget that stops a
    search too large to finish rather than running for hours."""
    sequential = [
        op("write", 2 * number, 2 * number + 1, number + 1, value=str(number))
        for number in range(1500)
    ]
    assert check([*sequential, op("read", 4000, 4001, ("1499", 1500))]) == []
    concurrent = [op("write", 0, 100, number + 1, value=str(number)) for number in range(40)]
    with pytest.raises(TooLarge):
        check_key([*concurrent, op("read", 200, 201, ("x", 99))], None, budget=10_000)
