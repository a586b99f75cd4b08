"""What the two clients share and what is no I/O (the sans-IO core): the results, the typed
exceptions, how a call is made into a request and an answer into a result or an exception,
the watch's resume point, and the timeouts and options of the connections. ``AsyncClient``
(_async.py) and ``Client`` (_sync.py) only send.

It imports nothing of the server, so that a script (and the kv command) starts fast.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent

DEFAULT_URL = "http://127.0.0.1:8000"
# What the server takes in one /mget; longer lists are read in several (reads may be split,
# writes never: an /mset or /mdelete is one transaction, or the server's 422).
MGET_BATCH = 1000
# An import's body is sent in pieces of this size, read from its file as they go.
UPLOAD_CHUNK = 256 * 1024
# A stream of changes writes at least a heartbeat every 15 s (KV_CHANGES_HEARTBEAT): a read
# that waits longer than this has lost its server without being told.
STREAM_READ_TIMEOUT = 60.0
# Backoff between retries: doubling from the first, capped, with jitter so that clients
# turned away together do not come back together.
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0
# An import's answer may take this long after its last byte was sent (it is applied then).
IMPORT_ANSWER_TIMEOUT = 3600.0
# A watch reconnects for this long after its stream is lost (a server restart takes a second
# or two) before it gives up with Unavailable.
RECONNECT_FOR = 60.0


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """A key's value (None in a listing without values), version and expiry (UTC)."""

    key: str
    val: Optional[str]
    version: int
    expires_at: Optional[datetime] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "val": self.val,
            "version": self.version,
            "expires_at": _format_time(self.expires_at),
        }


@dataclass(frozen=True)
class Event:
    """One change of the feed: ``type`` is "set", "delete" or "expire"; a set has its value."""

    revision: int
    type: str
    key: str
    val: Optional[str] = None
    expires_at: Optional[datetime] = None

    def to_json(self) -> dict[str, Any]:
        event: dict[str, Any] = {"revision": self.revision, "type": self.type, "key": self.key}
        if self.type == "set":
            event.update(val=self.val, expires_at=_format_time(self.expires_at))
        return event


@dataclass(frozen=True)
class TxnResult:
    """What a transaction did: whether every compare held (``failed`` is then None, else the
    index of the first that did not), the store's revision after it, and one result per
    operation of the branch that ran, as the server gave them (docs/api.md, Transactions)."""

    succeeded: bool
    revision: int
    failed: Optional[int]
    results: list[dict[str, Any]]


@dataclass(frozen=True)
class Lease:
    """A lease: its id, its time to live in seconds, and when it expires (UTC) unless kept
    alive. ``keys`` are its keys, when the answer listed them (``get_lease``)."""

    id: str
    ttl: float
    expires_at: datetime
    keys: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Imported:
    """What an import did: lines applied, lines skipped (expired), and its revision."""

    imported: int
    skipped: int
    revision: int


@dataclass(frozen=True)
class TokenRule:
    """A rule of an access token: ``access`` ("read" or "readwrite") to every key that
    starts with ``prefix`` ("" covers every key)."""

    prefix: str
    access: str

    def to_json(self) -> dict[str, str]:
        return {"prefix": self.prefix, "access": self.access}


@dataclass(frozen=True)
class Token:
    """An access token. ``secret`` is there only in the answer that made it (``create_token``,
    ``rotate_token``): the server shows it once. ``last_used_at`` only in ``tokens()``."""

    name: str
    created_at: datetime
    rules: tuple[TokenRule, ...] = ()
    admin: bool = False
    secret: Optional[str] = None
    expires_at: Optional[datetime] = None
    last_used_at: Optional[datetime] = None

    def to_json(self) -> dict[str, Any]:
        """As GET /tokens lists it (never with the secret)."""
        return {
            "name": self.name,
            "rules": [rule.to_json() for rule in self.rules],
            "admin": self.admin,
            "created_at": _format_time(self.created_at),
            "expires_at": _format_time(self.expires_at),
            "last_used_at": _format_time(self.last_used_at),
        }


@dataclass(frozen=True)
class Identity:
    """What the client's own token may do (``whoami``): its name (None on a server without
    KV_AUTH_TOKEN, where every request may do everything), its rules and whether it is admin."""

    name: Optional[str]
    rules: tuple[TokenRule, ...]
    admin: bool


# --- errors -----------------------------------------------------------------------------------


class KVError(Exception):
    """The server refused a request, or could not be reached. ``message`` is one line (the
    server's own when it answered), ``status`` the HTTP status and ``code`` the server's
    ``error`` code, when there was an answer."""

    def __init__(
        self, message: str, status: Optional[int] = None, code: Optional[str] = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class KeyNotFound(KVError):
    """404: the key has no value (never set, deleted, or expired)."""


class PreconditionFailed(KVError):
    """412: the key is not at the version the write asked for. ``current_version`` is the
    version it is at, or None when it does not exist."""

    def __init__(
        self,
        message: str,
        status: Optional[int] = None,
        code: Optional[str] = None,
        current_version: Optional[int] = None,
    ) -> None:
        super().__init__(message, status, code)
        self.current_version = current_version


class LeaseNotFound(KVError):
    """404 ``lease_not_found``: the lease was never granted, was revoked, or has expired."""


class TokenNotFound(KVError):
    """404 ``token_not_found``: no token has that name (never made, or revoked)."""


class TokenExists(KVError):
    """409 ``token_exists``: a token of that name exists already."""


class Forbidden(KVError):
    """403 ``forbidden``: the token may not do this (a key or prefix outside its rules, or an
    admin's request); the message names what was refused."""


class LockLost(KVError):
    """A lock's lease ran out while it was held (or while its owner waited for it): another
    owner may hold it now. Raised when the ``with`` block of a lock ends, or, in asyncio, in
    place of the cancellation that interrupted the block."""


class Unauthorized(KVError):
    """401: the server wants a token (``token=``), or another one."""


class Unavailable(KVError):
    """The server could not be reached, did not answer in time, or answered 5xx."""


class InvalidRequest(KVError):
    """Any other 4xx: the request breaks a rule; ``code`` says which (``invalid_ttl``, ...)."""


class HistoryGone(KVError):
    """410: the change history does not hold the point a watch resumes from: it was compacted
    away (``compacted``), or it is of another history (``unknown_revision``: another store,
    or a life of this one that a restart, a restore or a failover left behind). List again,
    then watch from the listing's revision."""


def error_of(response: httpx.Response) -> KVError:
    """The typed exception for a non-2xx answer, with the server's message."""
    status = response.status_code
    try:
        body = json.loads(response.content)
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):  # not our JSON (a proxy's page, say)
        code, message = None, f"HTTP {status} {response.reason_phrase}".strip()
    if status == 404 and code == "key_not_found":
        return KeyNotFound(message, status, code)
    if status == 404 and code == "lease_not_found":
        return LeaseNotFound(message, status, code)
    if status == 404 and code == "token_not_found":
        return TokenNotFound(message, status, code)
    if status == 409 and code == "token_exists":
        return TokenExists(message, status, code)
    if status == 403:
        return Forbidden(message, status, code)
    if status == 412:
        return PreconditionFailed(message, status, code, etag_version(response))
    if status == 401:
        return Unauthorized(message, status, code)
    if status == 410:
        return HistoryGone(message, status, code)
    if status >= 500:
        return Unavailable(message, status, code)
    return InvalidRequest(message, status, code)


def unreachable(error: httpx.TransportError, url: httpx.URL) -> Unavailable:
    if isinstance(error, httpx.TimeoutException):
        return Unavailable(f"{url} did not answer in time ({type(error).__name__})")
    return Unavailable(f"cannot reach {url}: {error or type(error).__name__}")


# --- requests and answers, for both clients ---------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request, and whether it may be sent again after a failure."""

    method: str
    path: str
    retry: bool
    params: Optional[dict[str, Any]] = None
    body: Optional[Any] = None  # sent as JSON
    headers: dict[str, str] = field(default_factory=dict)

    def request(self) -> dict[str, Any]:
        """The arguments of httpx's ``request`` for this call."""
        arguments = {"method": self.method, "url": self.path, "params": self.params}
        if self.body is None:
            return {**arguments, "headers": self.headers}
        try:
            content = json.dumps(self.body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            # A lone surrogate, which is not text: sent escaped, for the server to refuse
            # with the same invalid_string as from any other client.
            content = json.dumps(self.body).encode()
        headers = {**self.headers, "Content-Type": "application/json"}
        return {**arguments, "content": content, "headers": headers}


def _key_path(route: str, key: str) -> str:
    if not key:
        # No path names it (/get/ is no endpoint): refused here, as /set refuses it.
        raise InvalidRequest("Field 'key' must not be empty.", None, "empty_key")
    # Every reserved character encoded, "/" too; and "." as well, since HTTP clients remove
    # the path segments "." and ".." before sending.
    return f"/{route}/" + quote(key, safe="").replace(".", "%2E")


def get_call(key: str) -> Call:
    return Call("GET", _key_path("get", key), retry=True)


def set_call(
    key: str,
    val: str,
    ttl: Optional[float],
    if_version: Optional[int],
    create: bool,
    lease: Optional[str] = None,
) -> Call:
    body: dict[str, Any] = {"key": key, "val": val}
    if ttl is not None:
        body["ttl"] = ttl
    if lease is not None:
        body["lease"] = lease
    headers = _conditions(if_version, create)
    return Call("POST", "/set", retry=bool(headers), body=body, headers=headers)


def delete_call(key: str, if_version: Optional[int]) -> Call:
    headers = _conditions(if_version, create=False)
    return Call("DELETE", _key_path("delete", key), retry=bool(headers), headers=headers)


def _conditions(if_version: Optional[int], create: bool) -> dict[str, str]:
    headers = {}
    if if_version is not None:
        headers["If-Match"] = f'"{int(if_version)}"'
    if create:
        headers["If-None-Match"] = "*"
    return headers


def keys_page_call(prefix: str, values: bool, page_size: int, cursor: Optional[str]) -> Call:
    params: dict[str, Any] = {"prefix": prefix, "limit": page_size}
    if values:
        params["values"] = "true"
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", "/keys", retry=True, params=params)


def mget_calls(keys: Iterable[str]) -> list[Call]:
    wanted = list(keys)
    return [
        Call("POST", "/mget", retry=True, body={"keys": wanted[start : start + MGET_BATCH]})
        for start in range(0, len(wanted), MGET_BATCH)
    ]


def found_in(answer: httpx.Response) -> Iterator[tuple[str, Optional[str]]]:
    return ((item["key"], item["val"]) for item in answer.json()["items"])


def mdelete_call(keys: Iterable[str]) -> Call:
    return Call("POST", "/mdelete", retry=False, body={"keys": list(keys)})


def mset_call(items: Mapping[str, str], ttl: Optional[float]) -> Call:
    rows = [
        {"key": key, "val": val, **({"ttl": ttl} if ttl is not None else {})}
        for key, val in items.items()
    ]
    return Call("POST", "/mset", retry=False, body={"items": rows})


def txn_call(
    compare: Optional[Iterable[Mapping[str, Any]]],
    success: Optional[Iterable[Mapping[str, Any]]],
    failure: Optional[Iterable[Mapping[str, Any]]],
) -> Call:
    # Sent once, as a blind write is: a transaction whose first try committed may not hold
    # its compares any more, and would then run its other branch.
    body = {"compare": list(compare or ()), "success": list(success or ())}
    body["failure"] = list(failure or ())
    return Call("POST", "/txn", retry=False, body=body)


def txn_result(answer: httpx.Response) -> TxnResult:
    body = answer.json()
    return TxnResult(body["succeeded"], body["revision"], body["failed"], body["results"])


def _lease_path(lease: str, action: str = "") -> str:
    return f"/leases/{quote(lease, safe='')}{action}"


def grant_lease_call(ttl: float) -> Call:
    # Retried: a grant whose answer was lost leaves a lease nobody holds, which expires.
    return Call("POST", "/leases", retry=True, body={"ttl": ttl})


def keepalive_call(lease: str) -> Call:
    return Call("POST", _lease_path(lease, "/keepalive"), retry=True)


def keepalive_many_call(leases: Iterable[str]) -> Call:
    return Call("POST", "/leases/keepalive", retry=True, body={"ids": list(leases)})


def kept_alive(answer: httpx.Response, asked: Iterable[str]) -> dict[str, Optional[Lease]]:
    renewed = {lease["id"]: lease for lease in answer.json()["leases"]}
    return {
        lease: None if lease not in renewed else _lease(renewed[lease], None) for lease in asked
    }


def get_lease_call(lease: str) -> Call:
    return Call("GET", _lease_path(lease), retry=True)


def revoke_lease_call(lease: str) -> Call:
    # Retried: a revocation that committed before its answer was lost makes the retry a
    # LeaseNotFound, which says the same thing: the lease is gone.
    return Call("DELETE", _lease_path(lease), retry=True)


def lease_of(answer: httpx.Response) -> Lease:
    body = answer.json()
    keys = body.get("keys")
    return _lease(body, None if keys is None else tuple(keys))


def _lease(shown: Mapping[str, Any], keys: Optional[tuple[str, ...]]) -> Lease:
    expires_at = _parse_time(shown["expires_at"])
    assert expires_at is not None  # a lease always expires
    return Lease(shown["id"], shown["ttl"], expires_at, keys)


def _token_path(name: str, action: str = "") -> str:
    return f"/tokens/{quote(name, safe='')}{action}"


def create_token_call(
    name: str, rules: Iterable[Any], admin: bool, expires_in: Optional[float]
) -> Call:
    body: dict[str, Any] = {
        "name": name,
        "rules": [_rule_json(rule) for rule in rules],
        "admin": admin,
    }
    if expires_in is not None:
        body["expires_in"] = expires_in
    # Sent once: a creation whose answer was lost made a token whose secret nobody has;
    # a retry would only be told 409. Revoke it and create it again.
    return Call("POST", "/tokens", retry=False, body=body)


def _rule_json(rule: Any) -> dict[str, str]:
    """A rule as the caller gave it: a TokenRule, or a (prefix, access) pair."""
    if isinstance(rule, TokenRule):
        return rule.to_json()
    prefix, access = rule
    return {"prefix": prefix, "access": access}


def rotate_token_call(name: str, grace: Optional[float]) -> Call:
    # Sent once: a retry after a rotation that committed would rotate again, and with grace
    # the secret kept working would be the lost one's, not the old one.
    body = {} if grace is None else {"grace": grace}
    return Call("POST", _token_path(name, "/rotate"), retry=False, body=body)


def revoke_token_call(name: str) -> Call:
    # Retried: a revocation that committed before its answer was lost makes the retry a
    # TokenNotFound, which says the same thing: the token is gone.
    return Call("DELETE", _token_path(name), retry=True)


def _rules_of(listed: Iterable[Mapping[str, str]]) -> tuple[TokenRule, ...]:
    return tuple(TokenRule(rule["prefix"], rule["access"]) for rule in listed)


def token_of(body: Mapping[str, Any]) -> Token:
    created_at = _parse_time(body["created_at"])
    assert created_at is not None  # every token has one
    return Token(
        body["name"],
        created_at,
        rules=_rules_of(body["rules"]),
        admin=body["admin"],
        secret=body.get("secret"),
        expires_at=_parse_time(body.get("expires_at")),
        last_used_at=_parse_time(body.get("last_used_at")),
    )


def identity_of(answer: httpx.Response) -> Identity:
    body = answer.json()
    return Identity(body["name"], _rules_of(body["rules"]), body["admin"])


def entry_of(key: str, val: str, response: httpx.Response) -> Entry:
    expires = response.headers.get("KV-Expires-At")
    return Entry(key, val, etag_version(response) or 0, _parse_time(expires))


def listed_entry(item: Mapping[str, Any]) -> Entry:
    return Entry(item["key"], item.get("val"), item["version"], _parse_time(item["expires_at"]))


def _event(data: Mapping[str, Any]) -> Event:
    return Event(
        data["revision"],
        data["type"],
        data["key"],
        data.get("val"),
        _parse_time(data.get("expires_at")),
    )


def etag_version(response: httpx.Response) -> Optional[int]:
    etag = response.headers.get("ETag")
    return int(etag.strip('"')) if etag else None


def _parse_time(text: Optional[str]) -> Optional[datetime]:
    # fromisoformat takes "Z" only from Python 3.11.
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _format_time(moment: Optional[datetime]) -> Optional[str]:
    if moment is None:
        return None
    utc = moment.astimezone(timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def import_params(replace: bool, prefix: str) -> dict[str, str]:
    params = {"mode": "replace" if replace else "merge"}
    if prefix:
        params["prefix"] = prefix
    return params


def chunks(source: IO[bytes], progress: Optional[Callable[[int], None]]) -> Iterator[bytes]:
    sent = 0
    while chunk := source.read(UPLOAD_CHUNK):
        yield chunk
        sent += len(chunk)
        if progress is not None:
            progress(sent)


def retryable(error: BaseException) -> bool:
    return isinstance(error, httpx.TransportError) or (
        isinstance(error, Unavailable) and error.status == 503
    )


def backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**attempt)


class Resume:
    """Where a watch is: the id of the last event it delivered. Every event of the stream has
    an id that names its place (``17.2`` after the second of revision 17's events under the
    prefix, the bare ``17`` after its last, or a heartbeat's), so each event is delivered as
    it comes, and a reconnection sends that id as ``Last-Event-ID``: a stream cut inside a
    revision resumes right after the last event delivered, repeating none of it."""

    def __init__(self, since: int) -> None:
        self.since = since
        self.last_id: Optional[str] = None

    def params(self, prefix: str) -> dict[str, Any]:
        if self.last_id is None:  # no id yet: the revision the watch began at
            return {"prefix": prefix, "since": self.since}
        return {"prefix": prefix}

    def headers(self) -> dict[str, str]:
        return {} if self.last_id is None else {"Last-Event-ID": self.last_id}

    def take(self, sse: ServerSentEvent) -> Optional[Event]:
        """The event that ``sse`` carries, if it is a change (a heartbeat only moves the
        resume point)."""
        if sse.event not in ("set", "delete", "expire", "progress"):
            return None  # the opening "retry:" line, or an event type this client predates
        event = None if sse.event == "progress" else _event(json.loads(sse.data))
        # httpx-sse carries the last id over to a block without one, as an EventSource does;
        # it is empty only before the stream's first id.
        if sse.id:
            self.last_id = sse.id
        return event


# --- locks -----------------------------------------------------------------------------------

# How often a lock's keep-alive renews its lease: three times a TTL, so that two lost
# keep-alives in a row still leave time for a third.
KEEPALIVES_PER_TTL = 3
# The most leases a client renews in one request (the server takes 10,000): more that are
# due go in the next, at once.
KEEPALIVE_BATCH = 1000
_LEASE_ID = re.compile(r"[0-9a-f]{32}")


def lock_prefix(name: str) -> str:
    """Where a lock's owners are: a key ``NAME/<lease id>`` each, as etcd's Mutex does it."""
    return f"{name}/"


def owner_value() -> str:
    """What a lock's key holds: who owns it, for whoever lists the owners (``kv ls -l``)."""
    import os
    import socket

    return f"{socket.gethostname()} pid {os.getpid()}"


def owners(listing: Iterable[Entry], prefix: str) -> Iterator[Entry]:
    """The owners of a lock among the keys under its prefix: the keys ``prefix<lease id>``
    (another key that shares the prefix is no owner)."""
    return (entry for entry in listing if _LEASE_ID.fullmatch(entry.key[len(prefix) :]))


def leader_of(listing: Iterable[Entry], prefix: str) -> Optional[Entry]:
    """The lock's holder (an election's leader): its oldest owner, None when it has none."""
    return min(owners(listing, prefix), key=lambda entry: entry.version, default=None)


def predecessor(listing: Iterable[Entry], prefix: str, mine: str, token: int) -> Optional[str]:
    """The owner to wait for, of a listing of the lock's prefix: the one that came last
    before ``mine`` (the highest version below its ``token``), or None when ``mine`` is the
    oldest and holds the lock. Each waiter waits for one key only, so a release wakes one
    waiter, in the order they came. LockLost when ``mine`` is gone: its lease ran out."""
    ahead: Optional[Entry] = None
    found = False
    for entry in owners(listing, prefix):
        if entry.key == mine:
            found = True
        elif entry.version < token and (ahead is None or entry.version > ahead.version):
            ahead = entry
    if not found:
        raise LockLost(f"the lease of the lock {prefix[:-1]!r} ran out while it waited")
    return None if ahead is None else ahead.key


def applied(listing: dict[str, Entry], event: Event) -> None:
    """Apply a change of the feed to a listing kept as a dict, key to entry."""
    if event.type == "set":
        assert event.val is not None  # a set's event has its value
        listing[event.key] = Entry(event.key, event.val, event.revision, event.expires_at)
    else:
        listing.pop(event.key, None)


def gone(event: Event, key: str) -> bool:
    return event.key == key and event.type != "set"


@dataclass
class _Renewal:
    ttl: float
    renew_by: float  # time.monotonic(): past it, the lease may have run out
    due: float  # when it is renewed next
    lose: Callable[[], None]  # the lock's, called once it is lost


class Renewals:
    """The leases a client keeps alive for its locks, and when each falls due: bookkeeping
    only; the client's keep-alive loop sends (``POST /leases/keepalive``, every lease due in
    one request).

    A lease is renewed every ttl/3, and with it every other that would fall due within half
    of its own period: the leases of a client drift into one request a period, as etcd's
    clients keep all their leases alive over one stream. A lease counts its ttl from the
    moment its last successful renewal was sent, so its owner knows it lost the lock no later
    than the server. Guarded: a blocking client's locks are held from many threads, and its
    loop runs on another.
    """

    def __init__(self) -> None:
        self._held: dict[str, _Renewal] = {}
        self._guard = threading.Lock()
        self._attempt = 0  # failed renewals in a row

    def add(self, lease: str, ttl: float, sent: float, lose: Callable[[], None]) -> None:
        """Keep ``lease`` alive from now on; ``sent`` is when its grant was sent."""
        with self._guard:
            self._held[lease] = _Renewal(ttl, sent + ttl, sent + ttl / KEEPALIVES_PER_TTL, lose)

    def discard(self, lease: str) -> None:
        """No longer keep ``lease`` alive (it is released): what a renewal in flight learns
        of it is ignored."""
        with self._guard:
            self._held.pop(lease, None)

    def wait(self) -> Optional[float]:
        """Seconds until a lease falls due or may run out; None while none is held."""
        with self._guard:
            soonest = min(
                (min(held.due, held.renew_by) for held in self._held.values()), default=None
            )
        return None if soonest is None else soonest - time.monotonic()

    def expired(self) -> list[Callable[[], None]]:
        """Let go of the leases that may have run out: the ``lose`` of each, to call."""
        now = time.monotonic()
        with self._guard:
            gone = [lease for lease, held in self._held.items() if now >= held.renew_by]
            return [self._held.pop(lease).lose for lease in gone]

    def due(self) -> tuple[list[str], float]:
        """The leases to renew now (none until one is due; then each that falls due within
        half its period, the soonest KEEPALIVE_BATCH), and how long their request may take:
        no longer than the soonest of them may still live, so that a server that hangs
        cannot keep an owner from learning that its lock is lost."""
        now = time.monotonic()
        with self._guard:
            if not any(held.due <= now for held in self._held.values()):
                return [], 0.0
            due = sorted(
                (
                    lease
                    for lease, held in self._held.items()
                    if held.due - now <= held.ttl / KEEPALIVES_PER_TTL / 2
                ),
                key=lambda lease: self._held[lease].due,
            )[:KEEPALIVE_BATCH]
            return due, min(self._held[lease].renew_by for lease in due) - now

    def renewed(self, kept: Mapping[str, Optional[Lease]], sent: float) -> list[Callable[[], None]]:
        """Record the answer to a renewal sent at ``sent``: the ``lose`` of each lease it
        found gone, to call."""
        lost = []
        with self._guard:
            self._attempt = 0
            for lease, renewal in kept.items():
                held = self._held.get(lease)
                if held is None:
                    continue  # released meanwhile
                if renewal is None:
                    lost.append(self._held.pop(lease).lose)
                else:
                    held.renew_by = sent + held.ttl
                    held.due = sent + held.ttl / KEEPALIVES_PER_TTL
        return lost

    def failed(self, leases: Iterable[str]) -> None:
        """A renewal of ``leases`` went unanswered: again soon, backing off, until one
        succeeds or they may have run out."""
        with self._guard:
            due = time.monotonic() + backoff(self._attempt)
            self._attempt += 1
            for lease in leases:
                held = self._held.get(lease)
                if held is not None:
                    held.due = due


# Where the two flavours differ for real, a pair: the client's source (_async.py) calls the
# asynchronous one, and setup.py names its blocking twin in _sync.py.


async def async_chunks(
    source: IO[bytes], progress: Optional[Callable[[int], None]]
) -> AsyncIterator[bytes]:
    # httpx's AsyncClient sends only an async iterable; the file is still read as it goes.
    for chunk in chunks(source, progress):
        yield chunk


async def async_sleep(seconds: float) -> None:
    # asyncio is imported only by the AsyncClient's code: a blocking script (and every start
    # of the kv command) would pay a twentieth of a second for it.
    import asyncio

    await asyncio.sleep(seconds)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def stream_timeouts(timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, read=max(timeout, STREAM_READ_TIMEOUT))


def import_timeouts(timeout: float) -> httpx.Timeout:
    # The answer comes once the whole import is applied, in one transaction: a GiB takes
    # minutes. Sending still times out as usual.
    return httpx.Timeout(timeout, read=max(timeout, IMPORT_ANSWER_TIMEOUT))


def http_options(url: str, token: Optional[str], timeout: float) -> dict[str, Any]:
    headers = {"User-Agent": "kv-client"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return {
        "base_url": url,
        "headers": headers,
        "timeout": httpx.Timeout(timeout),
        # Plain http has no certificates to check: loading the CA bundle would only add a
        # tenth of a second to every start of the kv command.
        "verify": httpx.URL(url).scheme == "https",
    }


class AsyncKeeper:
    """Runs a client's keep-alive loop (the leases of its locks) in asyncio: a task of its
    own, which ``pause`` puts to sleep until its next renewal is due or it is woken."""

    def __init__(self) -> None:
        import asyncio

        self._asyncio = asyncio
        self._woken = asyncio.Event()
        self._stopping = False
        self._task: Optional[asyncio.Task[None]] = None

    def start(self, loop: Callable[[], Awaitable[None]]) -> None:
        self._task = self._asyncio.ensure_future(loop())

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._stopping

    async def pause(self, seconds: Callable[[], Optional[float]]) -> bool:
        """Wait ``seconds()`` (None: until woken), or until woken; False, at once, when the
        keeper is being stopped. A wake between the two is not missed: ``seconds`` is asked
        after the last wake is cleared."""
        self._woken.clear()
        if not self._stopping:
            wait = seconds()
            with contextlib.suppress(self._asyncio.TimeoutError):
                await self._asyncio.wait_for(
                    self._woken.wait(), None if wait is None else max(wait, 0.0)
                )
        return not self._stopping

    def wake(self) -> None:
        self._woken.set()

    async def stop(self) -> None:
        """Stop the loop and wait for it (what it raised is raised here)."""
        self._stopping = True
        self._woken.set()
        if self._task is not None and self._task is not self._asyncio.current_task():
            await self._task


class Keeper:
    """Runs a client's keep-alive loop (the leases of its locks) for blocking code: a daemon
    thread, which ``pause`` puts to sleep until its next renewal is due or it is woken."""

    def __init__(self) -> None:
        self._woken = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def start(self, loop: Callable[[], None]) -> None:
        def run() -> None:
            try:
                loop()
            except BaseException as error:  # raised by stop(), as the task's would be
                self._error = error

        self._thread = threading.Thread(target=run, name="kv-lock-keepalive", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def pause(self, seconds: Callable[[], Optional[float]]) -> bool:
        """Wait ``seconds()`` (None: until woken), or until woken; False, at once, when the
        keeper is being stopped. A wake between the two is not missed: ``seconds`` is asked
        after the last wake is cleared."""
        self._woken.clear()
        if not self._stopping:
            wait = seconds()
            self._woken.wait(None if wait is None else max(wait, 0.0))
        return not self._stopping

    def wake(self) -> None:
        self._woken.set()

    def stop(self) -> None:
        """Stop the loop and wait for it (what it raised is raised here)."""
        self._stopping = True
        self._woken.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._error is not None:
            raise self._error


class AsyncOwner:
    """The task that holds a lock, which the lock's loss interrupts: it is cancelled, so that
    the owner's block stops where it is."""

    def __init__(self) -> None:
        import asyncio

        self._asyncio = asyncio
        self._task = asyncio.current_task()
        self._interrupted = False

    def interrupt(self) -> None:
        if self._task is not None:
            self._interrupted = True
            self._task.cancel()

    def interrupted(self, error: Optional[BaseException]) -> bool:
        """Whether ``error`` is the cancellation ``interrupt`` caused. It is then taken back
        (Python 3.11's ``uncancel``), unless the task was cancelled by someone else as well,
        which must go on."""
        if not (self._interrupted and isinstance(error, self._asyncio.CancelledError)):
            return False
        uncancel = getattr(self._task, "uncancel", None)
        return uncancel is None or uncancel() == 0


class Owner:
    """A blocking owner cannot be interrupted from another thread: it reads ``Lock.lost``, or
    is called back (``on_lost``)."""

    def interrupt(self) -> None:
        pass

    def interrupted(self, error: Optional[BaseException]) -> bool:
        return False
