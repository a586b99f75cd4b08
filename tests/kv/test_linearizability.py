"""The checker the failover tests judge their histories with (linearizability.py): it accepts
what a single copy of the store could have answered, and catches what none could."""

from __future__ import annotations

import pytest

from .linearizability import Operation, TooLarge, check, check_key, lost


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
