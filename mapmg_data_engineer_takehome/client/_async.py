"""The client itself, written once: ``AsyncClient`` in _async.py is the source, written by hand,
and ``Client`` in _sync.py is generated from it at every build by setup.py (``async`` and
``await`` dropped, httpx's and httpx-sse's asynchronous names made their blocking twins).
Where the two flavours really differ, the source names the asynchronous side of a pair that
_core.py holds (``async_sleep`` and ``sleep``, ``async_chunks`` and ``chunks``), as
httpcore does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import IO, Any, Callable, Optional

import httpx
from httpx_sse import aconnect_sse

from ._core import (
    DEFAULT_URL,
    RECONNECT_FOR,
    Call,
    Entry,
    Event,
    Imported,
    KeyNotFound,
    PreconditionFailed,
    Resume,
    Unavailable,
    async_chunks,
    async_sleep,
    backoff,
    delete_call,
    entry_of,
    error_of,
    etag_version,
    found_in,
    get_call,
    http_options,
    import_params,
    import_timeouts,
    keys_page_call,
    listed_entry,
    mdelete_call,
    mget_calls,
    mset_call,
    retryable,
    set_call,
    stream_timeouts,
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

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
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

    async def _send_once(self, call: Call) -> httpx.Response:
        response = await self._http.request(**call.request())
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
    ) -> int:
        """Write ``val``; with ``if_version`` only if the key is at that version, with
        ``create`` only if it does not exist. Returns the new version."""
        return etag_version(await self._send(set_call(key, val, ttl, if_version, create))) or 0

    async def delete(self, key: str, *, if_version: Optional[int] = None) -> None:
        await self._send(delete_call(key, if_version))

    async def keys(
        self, prefix: str = "", *, values: bool = False, page_size: int = 1000
    ) -> AsyncGenerator[Entry, None]:
        """Every live key under ``prefix`` in key order, page after page."""
        cursor = None
        while True:
            answer = await self._send(keys_page_call(prefix, values, page_size, cursor))
            page = answer.json()
            for item in page["items"]:
                yield listed_entry(item)
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
