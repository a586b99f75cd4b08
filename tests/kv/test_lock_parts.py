"""The parts of a lock that are no I/O (client/_core.py): which owner a waiter waits for,
who leads, a listing kept by the change feed, which leases a client renews when; and how
`kv lock` reads its command line."""

from __future__ import annotations

import functools
import time
from datetime import datetime, timezone
from typing import Optional

import pytest

from mapmg_data_engineer_takehome.cli import parse
from mapmg_data_engineer_takehome.client import Entry, Event, Lease, LockLost
from mapmg_data_engineer_takehome.client._core import (
    KEEPALIVE_BATCH,
    Renewals,
    applied,
    leader_of,
    predecessor,
)

PREFIX = "jobs/nightly/"
A, B, C = ("a" * 32, "b" * 32, "c" * 32)


def owner(lease: str, version: int, val: Optional[str] = None) -> Entry:
    return Entry(PREFIX + lease, val, version)


def test_a_waiter_waits_for_the_owner_just_before_it() -> None:
    listing = [owner(A, 30), owner(B, 10), owner(C, 20)]
    assert predecessor(listing, PREFIX, PREFIX + A, 30) == PREFIX + C
    assert predecessor(listing, PREFIX, PREFIX + C, 20) == PREFIX + B
    assert predecessor(listing, PREFIX, PREFIX + B, 10) is None  # the oldest holds it


def test_keys_that_share_the_prefix_but_name_no_lease_are_no_owners() -> None:
    listing = [
        owner(A, 30),
        Entry(PREFIX + "notes", "x", 5),
        Entry(PREFIX + B + "/sub", "x", 6),
        Entry(PREFIX + B.upper(), "x", 7),
    ]
    assert predecessor(listing, PREFIX, PREFIX + A, 30) is None
    assert leader_of(listing, PREFIX) == owner(A, 30)


def test_a_waiter_whose_key_is_gone_has_lost() -> None:
    with pytest.raises(LockLost):
        predecessor([owner(B, 10)], PREFIX, PREFIX + A, 30)


def test_the_leader_is_the_oldest_owner_as_the_feed_changes_it() -> None:
    listing = {entry.key: entry for entry in [owner(B, 20, "node-b"), owner(A, 10, "node-a")]}
    assert leader_of(listing.values(), PREFIX) == owner(A, 10, "node-a")
    applied(listing, Event(30, "set", PREFIX + C, "node-c"))
    assert leader_of(listing.values(), PREFIX) == owner(A, 10, "node-a")
    applied(listing, Event(31, "expire", PREFIX + A))
    assert leader_of(listing.values(), PREFIX) == owner(B, 20, "node-b")
    applied(listing, Event(32, "delete", PREFIX + B))
    applied(listing, Event(33, "delete", PREFIX + C))
    assert leader_of(listing.values(), PREFIX) is None


@pytest.mark.parametrize(
    ("argv", "ttl", "url", "command"),
    [
        (
            ["lock", "n", "--ttl", "2", "--", "sh", "-c", "x --ttl 3"],
            2,
            None,
            ["sh", "-c", "x --ttl 3"],
        ),
        (["lock", "n", "--", "--ttl"], 10, None, ["--ttl"]),
        (["lock", "n", "--", "a", "--", "b"], 10, None, ["a", "--", "b"]),
        (["--url", "http://h:1", "lock", "n", "--", "x"], 10, "http://h:1", ["x"]),
        (["--url", "lock", "lock", "n", "--url", "http://h:1", "--", "x"], 10, "http://h:1", ["x"]),
        (["lock", "--ttl", "0.5", "n", "true"], 0.5, None, ["true"]),
    ],
)
def test_kv_lock_takes_every_word_after_its_first_double_dash_as_the_command(
    argv: list[str], ttl: float, url: Optional[str], command: list[str]
) -> None:
    args = parse(argv)
    assert (args.name, args.ttl, args.url, args.command) == ("n", ttl, url, command)


def test_a_double_dash_of_another_command_is_still_its_own() -> None:
    args = parse(["get", "--", "-starts-with-a-dash"])
    assert args.key == "-starts-with-a-dash"


def test_a_client_renews_the_soonest_due_leases_a_batch_at_a_time() -> None:
    """1,500 leases of 30 s, all past due (granted over 10 s ago, the soonest longest ago):
    the first request takes the 1,000 soonest, the next the other 500; a lease the server
    did not renew is lost, and one renewed is not due again for a period."""
    renewals = Renewals()
    lost: list[str] = []
    leases = [f"{number:032x}" for number in range(1500)]
    now = time.monotonic()
    for number, lease in enumerate(leases):
        renewals.add(lease, 30.0, now - 10 - number / 1000, functools.partial(lost.append, lease))
    first, timeout = renewals.due()
    assert first == leases[::-1][:KEEPALIVE_BATCH]
    assert 0 < timeout <= 30 - 10 - 1.499  # what the soonest of them has left to live
    renewal = Lease("", 30.0, datetime.now(timezone.utc))
    answer: dict[str, Optional[Lease]] = dict.fromkeys(first, renewal)
    answer[first[0]] = None  # gone on the server
    for lose in renewals.renewed(answer, time.monotonic()):
        lose()
    assert lost == [first[0]]
    second, _ = renewals.due()
    assert sorted(second) == leases[:500]
    assert renewals.renewed(dict.fromkeys(second, renewal), time.monotonic()) == []
    assert renewals.due() == ([], 0.0)
    wait = renewals.wait()
    assert wait is not None and 9 < wait <= 10  # a period (ttl/3) from now
