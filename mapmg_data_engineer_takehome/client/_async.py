"""The client itself, written once: ``AsyncClient`` in _async.py is the source, written by hand,
and ``Client`` in _sync.py is generated from it at every build by setup.py (``async`` and
``await`` dropped, httpx's and httpx-sse's asynchronous names made their blocking twins).
Where the two flavours really differ, the source names the asynchronous side of a pair that
_core.py holds (``async_sleep`` and ``sleep``, ``async_chunks`` and ``chunks``), as
httpcore does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import IO, Any, Callable, Optional

import httpx
from httpx_sse import aconnect_sse

from ._core import (
    DEFAULT_URL,
    RECONNECT_FOR,
    AsyncKeeper,
    AsyncOwner,
    Call,
    Entry,
    Event,
    Identity,
    Imported,
    KeyNotFound,
    KVError,
    Lease,
    LeaseNotFound,
    LockLost,
    PreconditionFailed,
    Renewals,
    Resume,
    Token,
    TxnResult,
    Unavailable,
    applied,
    async_chunks,
    async_sleep,
    backoff,
    create_token_call,
    delete_call,
    entry_of,
    error_of,
    etag_version,
    found_in,
    get_call,
    get_lease_call,
    gone,
    grant_lease_call,
    http_options,
    identity_of,
    import_params,
    import_timeouts,
    keepalive_call,
    keepalive_many_call,
    kept_alive,
    keys_page_call,
    leader_of,
    lease_of,
    listed_entry,
    lock_prefix,
    mdelete_call,
    mget_calls,
    mset_call,
    owner_value,
    predecessor,
    retryable,
    revoke_lease_call,
    revoke_token_call,
    rotate_token_call,
    set_call,
    stream_timeouts,
    token_of,
    txn_call,
    txn_result,
    unreachable,
)


class AsyncClient:
    """A client of the service; a context manager that closes its connections. Client blocks;
    AsyncClient is for asyncio: its methods are coroutines, ``keys`` and ``watch`` async
    iterators, and it is an async context manager."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: Optional[str] = None,
        timeout: float = 10.0,
        retries: int = 3,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self._http = httpx.AsyncClient(**http_options(url, token, timeout))
        # The leases of this client's locks, and the loop that keeps them alive, started with
        # the first lock (under the guard: a blocking client's locks come from many threads).
        self._renewals = Renewals()
        self._keeper: Optional[AsyncKeeper] = None
        self._keeper_guard = threading.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            if self._keeper is not None:
                await self._keeper.stop()
        finally:
            await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        """Send ``call``, again after a retryable failure if it may be; raise the typed
        exception for what did not succeed."""
        attempt = 0
        while True:
            try:
                return await self._send_once(call)
            except (httpx.TransportError, Unavailable) as error:
                if not (call.retry and retryable(error) and attempt < self.retries):
                    if isinstance(error, httpx.TransportError):
                        raise unreachable(error, self._http.base_url) from None
                    raise
            await async_sleep(backoff(attempt))
            attempt += 1

    async def _send_once(self, call: Call, timeout: Optional[float] = None) -> httpx.Response:
        """Send ``call`` once; within ``timeout`` seconds when given, else the client's."""
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        response = await self._http.request(**call.request(), **options)
        if response.is_success:
            return response
        raise error_of(response)

    async def get(self, key: str) -> Entry:
        response = await self._send(get_call(key))
        return entry_of(key, response.json()["val"], response)

    async def set(
        self,
        key: str,
        val: str,
        *,
        ttl: Optional[float] = None,
        if_version: Optional[int] = None,
        create: bool = False,
        lease: Optional[str] = None,
    ) -> int:
        """Write ``val``; with ``if_version`` only if the key is at that version, with
        ``create`` only if it does not exist; with ``lease`` (a lease's id) for as long as
        that lease lives. Returns the new version."""
        call = set_call(key, val, ttl, if_version, create, lease)
        return etag_version(await self._send(call)) or 0

    async def delete(self, key: str, *, if_version: Optional[int] = None) -> None:
        await self._send(delete_call(key, if_version))

    async def keys(
        self, prefix: str = "", *, values: bool = False, page_size: int = 1000
    ) -> AsyncGenerator[Entry, None]:
        """Every live key under ``prefix`` in key order, page after page."""
        async for _, entries in self._pages(prefix, values, page_size):
            for entry in entries:
                yield entry

    async def _pages(
        self, prefix: str, values: bool, page_size: int
    ) -> AsyncGenerator[tuple[int, list[Entry]], None]:
        """The pages of a listing, each with the revision it was read at."""
        cursor = None
        while True:
            answer = await self._send(keys_page_call(prefix, values, page_size, cursor))
            page = answer.json()
            yield int(answer.headers["KV-Revision"]), [listed_entry(i) for i in page["items"]]
            cursor = page["cursor"]
            if cursor is None:
                return

    async def mget(self, keys: Iterable[str]) -> dict[str, Optional[str]]:
        found: dict[str, Optional[str]] = {}
        for call in mget_calls(keys):
            found.update(found_in(await self._send(call)))
        return found

    async def mset(self, items: Mapping[str, str], *, ttl: Optional[float] = None) -> int:
        """Write every item in one transaction; returns their version."""
        answer = await self._send(mset_call(items, ttl))
        return int(answer.json()["version"])

    async def mdelete(self, keys: Iterable[str]) -> int:
        answer = await self._send(mdelete_call(keys))
        return int(answer.json()["deleted"])

    async def compare_and_set(
        self, key: str, fn: Callable[[Optional[str]], str], *, ttl: Optional[float] = None
    ) -> int:
        """Set ``key`` to ``fn(its value)`` (``fn(None)`` when it has none) without losing a
        write that came between: read, write if still at the version read, and on a
        conflict read again. Returns the new version."""
        attempt = 0
        while True:
            try:
                current: Optional[Entry] = await self.get(key)
            except KeyNotFound:
                current = None
            try:
                if current is None:
                    return await self.set(key, fn(None), ttl=ttl, create=True)
                return await self.set(key, fn(current.val), ttl=ttl, if_version=current.version)
            except PreconditionFailed:
                await async_sleep(backoff(min(attempt, 3)) / 5)
                attempt += 1

    async def txn(
        self,
        compare: Optional[Iterable[Mapping[str, Any]]] = None,
        success: Optional[Iterable[Mapping[str, Any]]] = None,
        failure: Optional[Iterable[Mapping[str, Any]]] = None,
    ) -> TxnResult:
        """One atomic transaction, in the shape of POST /txn: if every compare holds, the
        ``success`` operations, else the ``failure`` ones. A compare that does not hold is an
        answer (``succeeded`` false), not an exception."""
        return txn_result(await self._send(txn_call(compare, success, failure)))

    async def grant_lease(self, ttl: float) -> Lease:
        """A new lease of ``ttl`` seconds: keys set with it live as long as it does."""
        return lease_of(await self._send(grant_lease_call(ttl)))

    async def keepalive_lease(self, lease: str) -> Lease:
        """Renew the lease to its ttl from now; LeaseNotFound once it has expired."""
        return lease_of(await self._send(keepalive_call(lease)))

    async def keepalive_leases(self, leases: Iterable[str]) -> dict[str, Optional[Lease]]:
        """Renew many leases in one request; each id maps to its renewed Lease, or None when
        it is no live lease (expired, revoked, never granted)."""
        asked = list(dict.fromkeys(leases))
        return kept_alive(await self._send(keepalive_many_call(asked)), asked)

    async def get_lease(self, lease: str) -> Lease:
        """The lease, with its keys."""
        return lease_of(await self._send(get_lease_call(lease)))

    async def revoke_lease(self, lease: str) -> int:
        """End the lease now: its keys are deleted, in one revision. Returns how many."""
        return int((await self._send(revoke_lease_call(lease))).json()["deleted"])

    def _keep_alive(self, lease: str, ttl: float, sent: float, lose: Callable[[], None]) -> None:
        """Keep a lock's lease alive, with every other this client holds, until ``_let_go``;
        ``lose`` is called if it is lost. ``sent`` is when its grant was sent."""
        self._renewals.add(lease, ttl, sent, lose)
        with self._keeper_guard:
            if self._keeper is not None and self._keeper.running:
                self._keeper.wake()  # it may be waiting for no lease at all
                return
            keeper = self._keeper = AsyncKeeper()
            keeper.start(lambda: self._renew_leases(keeper))

    def _let_go(self, lease: str) -> None:
        self._renewals.discard(lease)

    async def _renew_leases(self, keeper: AsyncKeeper) -> None:
        """The loop that keeps the leases of this client's locks alive (Renewals says when),
        until the client closes: one request for every lease due."""
        renewals = self._renewals
        while await keeper.pause(renewals.wait):
            for lose in renewals.expired():
                lose()
            leases, timeout = renewals.due()
            if not leases:
                continue
            sent = time.monotonic()
            try:
                answer = await self._send_once(keepalive_many_call(leases), timeout=timeout)
                kept = kept_alive(answer, leases)
            except Exception:
                # Not renewed, whatever the reason: the server unreachable or refusing, an
                # answer that is none, httpx's RuntimeError for a client closed under a held
                # lock. Tried again soon; once the leases may have run out, their locks are
                # lost. The loop goes on: it is every lock's.
                renewals.failed(leases)
                continue
            for lose in renewals.renewed(kept, sent):
                lose()

    def lock(
        self,
        name: str,
        *,
        ttl: float = 10.0,
        on_lost: Optional[Callable[[], None]] = None,
        value: Optional[str] = None,
    ) -> AsyncLock:
        """A lock named ``name``, to be held in a ``with`` block (see AsyncLock). ``value``
        is what its owner's key holds (by default, the host and process): in an election,
        what the leader says of itself."""
        return AsyncLock(self, name, ttl=ttl, on_lost=on_lost, value=value)

    async def leader(self, name: str) -> Optional[Entry]:
        """Who holds the lock ``name`` now, an election's leader: its owner's key, value and
        version (its fencing token); None when nobody holds it."""
        prefix = lock_prefix(name)
        listing = [entry async for entry in self.keys(prefix, values=True)]
        return leader_of(listing, prefix)

    async def observe_leader(self, name: str) -> AsyncGenerator[Optional[Entry], None]:
        """The holder of the lock ``name`` (as ``leader``), then each new one as it takes
        over, None while nobody holds it, for as long as the caller iterates: a listing,
        then the change feed applied to it."""
        prefix = lock_prefix(name)
        listing: dict[str, Entry] = {}
        since: Optional[int] = None
        async for revision, entries in self._pages(prefix, True, 1000):
            since = revision if since is None else since
            listing.update((entry.key, entry) for entry in entries)
        current = leader_of(listing.values(), prefix)
        yield current
        events = self.watch(prefix, since=since)
        try:
            async for event in events:
                applied(listing, event)
                now = leader_of(listing.values(), prefix)
                if now != current:
                    current = now
                    yield current
        finally:
            await events.aclose()

    async def watch(
        self, prefix: str = "", *, since: Optional[int] = None, reconnect_for: float = RECONNECT_FOR
    ) -> AsyncGenerator[Event, None]:
        """The changes under ``prefix`` after revision ``since`` as they happen, for as long
        as the caller iterates (closing the generator closes the stream). With ``since`` None,
        from the store's revision when the iteration begins: its first step asks for it.
        Each event is yielded as it comes; a lost stream is resumed right after the last one
        yielded, inside a revision too, with nothing missed or repeated; after
        ``reconnect_for`` seconds of failing, Unavailable. HistoryGone when the history does
        not hold where it resumes: list again, then watch from the listing's revision."""
        if since is None:
            since = await self._revision()
        resume = Resume(since)
        failing_since: Optional[float] = None
        attempt = 0
        while True:
            try:
                async with aconnect_sse(
                    self._http,
                    "GET",
                    "/changes",
                    params=resume.params(prefix),
                    headers=resume.headers(),
                    timeout=stream_timeouts(self.timeout),
                ) as source:
                    if not source.response.is_success:
                        await source.response.aread()
                        raise error_of(source.response)
                    failing_since, attempt = None, 0
                    async for sse in source.aiter_sse():
                        event = resume.take(sse)
                        if event is not None:
                            yield event
            except (httpx.TransportError, Unavailable) as error:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > reconnect_for:
                    if isinstance(error, httpx.TransportError):
                        raise unreachable(error, self._http.base_url) from None
                    raise
            await async_sleep(backoff(attempt))
            attempt += 1

    async def _revision(self) -> int:
        """The store's revision now: what a watch from now on resumes from."""
        answer = await self._send(Call("GET", "/changes", retry=True, params={"timeout": 0}))
        return int(answer.json()["next"])

    async def export(
        self,
        out: IO[bytes],
        prefix: str = "",
        *,
        progress: Optional[Callable[[int], None]] = None,
    ) -> int:
        """Write the NDJSON export of the keys under ``prefix`` to ``out``; returns the
        revision it is a snapshot of. An export cut short raises Unavailable."""
        try:
            async with self._http.stream(
                "GET",
                "/export",
                params={"prefix": prefix},
                timeout=stream_timeouts(self.timeout),
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_of(response)
                written = 0
                async for chunk in response.aiter_raw():
                    out.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress(written)
                return int(response.headers["KV-Revision"])
        except httpx.TransportError as error:
            raise unreachable(error, self._http.base_url) from None

    async def import_(
        self,
        source: IO[bytes],
        *,
        replace: bool = False,
        prefix: str = "",
        progress: Optional[Callable[[int], None]] = None,
    ) -> Imported:
        """Load NDJSON lines (an export's) from ``source``, all or nothing. With ``replace``,
        the keys under ``prefix`` that ``source`` lacks are removed."""
        try:
            response = await self._http.post(
                "/import",
                params=import_params(replace, prefix),
                content=async_chunks(source, progress),
                headers={"Content-Type": "application/x-ndjson"},
                timeout=import_timeouts(self.timeout),
            )
        except httpx.TransportError as error:
            raise unreachable(error, self._http.base_url) from None
        if not response.is_success:
            raise error_of(response)
        return Imported(**response.json())

    async def health(self) -> dict[str, Any]:
        answer = await self._send(Call("GET", "/health", retry=True))
        return dict(answer.json())

    async def create_token(
        self,
        name: str,
        rules: Iterable[Any] = (),
        *,
        admin: bool = False,
        expires_in: Optional[float] = None,
    ) -> Token:
        """A new access token (admin only); its ``secret`` is in this answer alone. ``rules``
        are TokenRules or (prefix, access) pairs, access "read" or "readwrite"; TokenExists
        when the name is taken."""
        call = create_token_call(name, rules, admin, expires_in)
        return token_of((await self._send(call)).json())

    async def tokens(self) -> list[Token]:
        """Every access token, by name (admin only): never a secret."""
        answer = await self._send(Call("GET", "/tokens", retry=True))
        return [token_of(token) for token in answer.json()["tokens"]]

    async def rotate_token(self, name: str, *, grace: Optional[float] = None) -> Token:
        """A new secret for the token (admin only), in this answer alone; the old one stops at
        once, or after ``grace`` seconds. TokenNotFound."""
        return token_of((await self._send(rotate_token_call(name, grace))).json())

    async def revoke_token(self, name: str) -> None:
        """Revoke the token (admin only): it stops working at once. TokenNotFound."""
        await self._send(revoke_token_call(name))

    async def whoami(self) -> Identity:
        """What this client's token may do: its name, rules and whether it is admin."""
        return identity_of(await self._send(Call("GET", "/tokens/self", retry=True)))


class AsyncLock:
    """A lock shared by every client of the store, held under a lease that a keeper keeps
    alive, as etcd's Mutex: ``async with kv.lock("jobs/nightly", ttl=10) as lock:``.

    Each owner sets a key ``NAME/<its lease id>`` with its lease. The version of that key,
    the revision that created it, orders the owners: the oldest holds the lock; each of the
    others waits, on the change feed, for the key of the one just before it to go (released,
    or its lease ran out), so the lock passes in the order owners came, without polling.

    ``token`` is that version: the fencing token. It grows with every new owner, and a write
    that must not happen once the lock is lost compares it in a transaction:
    ``kv.txn(compare=[lock.fence], success=[...])`` does nothing once the lease has run out.

    The client renews the lease every ``ttl``/3 s, with the leases of its other locks in one
    request (Renewals). Once a renewal fails past the ttl (counted from the last renewal
    sent, so never after the server's own expiry), or the lease is found gone, the lock is
    lost: ``lost`` is set, ``on_lost`` is called (from the client's keep-alive loop), and in
    asyncio the block is cancelled at once; its end then raises LockLost.
    """

    def __init__(
        self,
        client: AsyncClient,
        name: str,
        *,
        ttl: float = 10.0,
        on_lost: Optional[Callable[[], None]] = None,
        value: Optional[str] = None,
    ) -> None:
        self.name = name
        self.value = owner_value() if value is None else value
        self.ttl = ttl
        self.on_lost = on_lost
        self.lost = False
        self.key = ""
        self.token = 0
        self.lease: Optional[Lease] = None
        self._client = client
        self._prefix = lock_prefix(name)
        self._owner: Optional[AsyncOwner] = None  # while the lock is held or wanted
        self._held = False
        self._on_lost_error: Optional[Exception] = None
        # Between release() and the keep-alive loop's _lose, which a blocking client runs on
        # a thread of its own.
        self._state_guard = threading.Lock()

    @property
    def fence(self) -> dict[str, Any]:
        """The compare of a fenced write: the lock's key still at the lock's token."""
        return {"key": self.key, "version": self.token}

    async def __aenter__(self) -> AsyncLock:
        await self.acquire()
        return self

    async def __aexit__(self, kind: object, error: Optional[BaseException], trace: object) -> None:
        assert self._owner is not None
        interrupted = self._owner.interrupted(error)
        await self.release()
        if self.lost and (error is None or interrupted):
            raise LockLost(f"the lock {self.name!r} was lost while it was held") from error

    async def acquire(self) -> int:
        """Wait for the lock, in turn; returns the fencing token."""
        if self._owner is not None:
            raise RuntimeError(f"the lock {self.name!r} is held or wanted already: release it")
        self.lost = False
        self._on_lost_error = None
        sent = time.monotonic()
        self.lease = await self._client.grant_lease(self.ttl)
        self._owner = AsyncOwner()
        lease = self.lease.id
        self._client._keep_alive(lease, self.ttl, sent, lambda: self._lose(lease))
        try:
            self.key = self._prefix + self.lease.id
            self.token = await self._own()
            await self._wait_for_turn()
            if self.lost:
                raise LockLost(f"the lease of the lock {self.name!r} ran out while it waited")
        except BaseException:
            with contextlib.suppress(KVError):  # what stopped the wait is what matters
                await self.release()
            raise
        self._held = True
        return self.token

    async def release(self) -> None:
        """Give the lock up: its lease is no longer kept alive, and is revoked, which
        deletes the key, so the next owner in line is woken. What ``on_lost`` raised, if it
        was called, is raised here."""
        with self._state_guard:
            self._held = False
            self._owner = None
        if self.lease is None:
            return
        self._client._let_go(self.lease.id)
        try:
            await self._client.revoke_lease(self.lease.id)
        except LeaseNotFound:
            pass  # it ran out: the lock was free already
        except Unavailable:
            if not self.lost:
                raise
            # Lost already, which is what the owner must hear of; the lease runs out alone.
        if self._on_lost_error is not None:
            error, self._on_lost_error = self._on_lost_error, None
            raise error

    async def _own(self) -> int:
        assert self.lease is not None
        try:
            return await self._client.set(self.key, self.value, lease=self.lease.id, create=True)
        except PreconditionFailed:
            # A retry after a first try that did commit: the key is ours all the same.
            return (await self._client.get(self.key)).version

    async def _wait_for_turn(self) -> None:
        while True:
            listing: list[Entry] = []
            since: Optional[int] = None
            async for revision, entries in self._client._pages(self._prefix, False, 1000):
                # The watch starts from the first page's revision: a key that a later page
                # lists went after it, if it went, and the watch sees it go.
                since = revision if since is None else since
                listing.extend(entries)
            ahead = predecessor(listing, self._prefix, self.key, self.token)
            if ahead is None:
                return
            events = self._client.watch(self._prefix, since=since)
            try:
                async for event in events:
                    if gone(event, self.key):
                        raise LockLost(f"the lease of the lock {self.name!r} ran out")
                    if gone(event, ahead):
                        break
            finally:
                await events.aclose()

    def _lose(self, lease: str) -> None:
        """The ``lease`` is gone, or may have run out: the client's keep-alive loop says so.
        Nothing, if the lock was released meanwhile (or holds another lease since)."""
        with self._state_guard:
            if self._owner is None or self.lease is None or self.lease.id != lease:
                return
            self.lost = True
            interrupt = self._owner.interrupt if self._held else None
        if self.on_lost is not None:
            try:
                self.on_lost()
            except Exception as error:  # the owner's to hear, at release; not the loop's
                self._on_lost_error = error
        if interrupt is not None:
            interrupt()
