"""A Python client for the key-value service: ``Client`` for blocking code, ``AsyncClient`` for
asyncio, with the same methods, typed results and typed exceptions.

    from mapmg_data_engineer_takehome.client import Client

    with Client("http://127.0.0.1:8000") as kv:
        kv.set("greeting", "hello")
        print(kv.get("greeting").val)

Both are thin layers over httpx (kept-alive connections, timeouts) and httpx-sse (the change
feed's stream). What the two share, how a call is made into a request and an answer into a
result or an exception, is written once below; each class only sends.

Retries: a read, a conditional write (``if_version``, ``create``) and the reconnection of a
watch are retried with backoff after a connection error or a 503, since doing them twice
changes nothing that doing them once would not. A blind write (``set`` without a condition,
``delete`` without ``if_version``, ``mset``, ``mdelete``, ``import_``) is sent once: after a
failure nobody can tell whether it was applied, and repeating it could undo a write that
came between. A retried conditional write whose first try did commit fails its second with
``PreconditionFailed``: read again, as after any conflict.

This module imports nothing of the server, so that a script (and the kv command) starts fast.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Callable, Optional
from urllib.parse import quote

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

__all__ = [
    "AsyncClient",
    "Client",
    "Entry",
    "Event",
    "HistoryGone",
    "Imported",
    "InvalidRequest",
    "KVError",
    "KeyNotFound",
    "PreconditionFailed",
    "Unauthorized",
    "Unavailable",
]

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
class Imported:
    """What an import did: lines applied, lines skipped (expired), and its revision."""

    imported: int
    skipped: int
    revision: int


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


def _error(response: httpx.Response) -> KVError:
    """The typed exception for a non-2xx answer, with the server's message."""
    status = response.status_code
    try:
        body = json.loads(response.content)
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):  # not our JSON (a proxy's page, say)
        code, message = None, f"HTTP {status} {response.reason_phrase}".strip()
    if status == 404 and code == "key_not_found":
        return KeyNotFound(message, status, code)
    if status == 412:
        return PreconditionFailed(message, status, code, _etag_version(response))
    if status == 401:
        return Unauthorized(message, status, code)
    if status == 410:
        return HistoryGone(message, status, code)
    if status >= 500:
        return Unavailable(message, status, code)
    return InvalidRequest(message, status, code)


def _unreachable(error: httpx.TransportError, url: httpx.URL) -> Unavailable:
    if isinstance(error, httpx.TimeoutException):
        return Unavailable(f"{url} did not answer in time ({type(error).__name__})")
    return Unavailable(f"cannot reach {url}: {error or type(error).__name__}")


# --- requests and answers, for both clients ---------------------------------------------------


@dataclass(frozen=True)
class _Call:
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


def _get(key: str) -> _Call:
    return _Call("GET", _key_path("get", key), retry=True)


def _set(
    key: str, val: str, ttl: Optional[float], if_version: Optional[int], create: bool
) -> _Call:
    body: dict[str, Any] = {"key": key, "val": val}
    if ttl is not None:
        body["ttl"] = ttl
    headers = _conditions(if_version, create)
    return _Call("POST", "/set", retry=bool(headers), body=body, headers=headers)


def _delete(key: str, if_version: Optional[int]) -> _Call:
    headers = _conditions(if_version, create=False)
    return _Call("DELETE", _key_path("delete", key), retry=bool(headers), headers=headers)


def _conditions(if_version: Optional[int], create: bool) -> dict[str, str]:
    headers = {}
    if if_version is not None:
        headers["If-Match"] = f'"{int(if_version)}"'
    if create:
        headers["If-None-Match"] = "*"
    return headers


def _keys_page(prefix: str, values: bool, page_size: int, cursor: Optional[str]) -> _Call:
    params: dict[str, Any] = {"prefix": prefix, "limit": page_size}
    if values:
        params["values"] = "true"
    if cursor is not None:
        params["cursor"] = cursor
    return _Call("GET", "/keys", retry=True, params=params)


def _mget_calls(keys: Iterable[str]) -> list[_Call]:
    wanted = list(keys)
    return [
        _Call("POST", "/mget", retry=True, body={"keys": wanted[start : start + MGET_BATCH]})
        for start in range(0, len(wanted), MGET_BATCH)
    ]


def _found(answer: httpx.Response) -> Iterator[tuple[str, Optional[str]]]:
    return ((item["key"], item["val"]) for item in answer.json()["items"])


def _mdelete(keys: Iterable[str]) -> _Call:
    return _Call("POST", "/mdelete", retry=False, body={"keys": list(keys)})


def _mset(items: Mapping[str, str], ttl: Optional[float]) -> _Call:
    rows = [
        {"key": key, "val": val, **({"ttl": ttl} if ttl is not None else {})}
        for key, val in items.items()
    ]
    return _Call("POST", "/mset", retry=False, body={"items": rows})


def _entry(key: str, val: str, response: httpx.Response) -> Entry:
    expires = response.headers.get("KV-Expires-At")
    return Entry(key, val, _etag_version(response) or 0, _parse_time(expires))


def _listed(item: Mapping[str, Any]) -> Entry:
    return Entry(item["key"], item.get("val"), item["version"], _parse_time(item["expires_at"]))


def _event(data: Mapping[str, Any]) -> Event:
    return Event(
        data["revision"],
        data["type"],
        data["key"],
        data.get("val"),
        _parse_time(data.get("expires_at")),
    )


def _etag_version(response: httpx.Response) -> Optional[int]:
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


def _import_params(replace: bool, prefix: str) -> dict[str, str]:
    params = {"mode": "replace" if replace else "merge"}
    if prefix:
        params["prefix"] = prefix
    return params


def _chunks(source: IO[bytes], progress: Optional[Callable[[int], None]]) -> Iterator[bytes]:
    sent = 0
    while chunk := source.read(UPLOAD_CHUNK):
        yield chunk
        sent += len(chunk)
        if progress is not None:
            progress(sent)


def _retryable(error: BaseException) -> bool:
    return isinstance(error, httpx.TransportError) or (
        isinstance(error, Unavailable) and error.status == 503
    )


def _backoff(attempt: int) -> float:
    return random.uniform(0.5, 1.0) * min(BACKOFF_MAX, BACKOFF_FIRST * 2.0**attempt)


class _Resume:
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


async def _async_sleep(seconds: float) -> None:
    # asyncio is imported only by the AsyncClient's code: a blocking script (and every start
    # of the kv command) would pay a twentieth of a second for it.
    import asyncio

    await asyncio.sleep(seconds)


def _stream_timeouts(timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, read=max(timeout, STREAM_READ_TIMEOUT))


def _import_timeouts(timeout: float) -> httpx.Timeout:
    # The answer comes once the whole import is applied, in one transaction: a GiB takes
    # minutes. Sending still times out as usual.
    return httpx.Timeout(timeout, read=max(timeout, IMPORT_ANSWER_TIMEOUT))


def _http_options(url: str, token: Optional[str], timeout: float) -> dict[str, Any]:
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


# --- the blocking client ----------------------------------------------------------------------


class Client:
    """A blocking client; a context manager that closes its connections."""

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
        self._http = httpx.Client(**_http_options(url, token, timeout))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        """Send ``call``, again after a retryable failure if it may be; raise the typed
        exception for what did not succeed."""
        attempt = 0
        while True:
            try:
                return self._send_once(call)
            except (httpx.TransportError, Unavailable) as error:
                if not (call.retry and _retryable(error) and attempt < self.retries):
                    if isinstance(error, httpx.TransportError):
                        raise _unreachable(error, self._http.base_url) from None
                    raise
            time.sleep(_backoff(attempt))
            attempt += 1

    def _send_once(self, call: _Call) -> httpx.Response:
        response = self._http.request(**call.request())
        if response.is_success:
            return response
        raise _error(response)

    def get(self, key: str) -> Entry:
        response = self._send(_get(key))
        return _entry(key, response.json()["val"], response)

    def set(
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
        return _etag_version(self._send(_set(key, val, ttl, if_version, create))) or 0

    def delete(self, key: str, *, if_version: Optional[int] = None) -> None:
        self._send(_delete(key, if_version))

    def keys(
        self, prefix: str = "", *, values: bool = False, page_size: int = 1000
    ) -> Generator[Entry, None, None]:
        """Every live key under ``prefix`` in key order, page after page."""
        cursor = None
        while True:
            page = self._send(_keys_page(prefix, values, page_size, cursor)).json()
            yield from map(_listed, page["items"])
            cursor = page["cursor"]
            if cursor is None:
                return

    def mget(self, keys: Iterable[str]) -> dict[str, Optional[str]]:
        found: dict[str, Optional[str]] = {}
        for call in _mget_calls(keys):
            found.update(_found(self._send(call)))
        return found

    def mset(self, items: Mapping[str, str], *, ttl: Optional[float] = None) -> int:
        """Write every item in one transaction; returns their version."""
        return int(self._send(_mset(items, ttl)).json()["version"])

    def mdelete(self, keys: Iterable[str]) -> int:
        return int(self._send(_mdelete(keys)).json()["deleted"])

    def compare_and_set(
        self, key: str, fn: Callable[[Optional[str]], str], *, ttl: Optional[float] = None
    ) -> int:
        """Set ``key`` to ``fn(its value)`` (``fn(None)`` when it has none) without losing a
        write that came between: read, write if still at the version read, and on a
        conflict read again. Returns the new version."""
        attempt = 0
        while True:
            try:
                current: Optional[Entry] = self.get(key)
            except KeyNotFound:
                current = None
            try:
                if current is None:
                    return self.set(key, fn(None), ttl=ttl, create=True)
                return self.set(key, fn(current.val), ttl=ttl, if_version=current.version)
            except PreconditionFailed:
                time.sleep(_backoff(min(attempt, 3)) / 5)
                attempt += 1

    def watch(
        self, prefix: str = "", *, since: Optional[int] = None, reconnect_for: float = RECONNECT_FOR
    ) -> Generator[Event, None, None]:
        """The changes under ``prefix`` after revision ``since`` as they happen, for as long
        as the caller iterates (closing the generator closes the stream). With ``since`` None,
        from the store's revision when the iteration begins: the first ``next`` asks for it.
        Each event is yielded as it comes; a lost stream is resumed right after the last one
        yielded, inside a revision too, with nothing missed or repeated; after
        ``reconnect_for`` seconds of failing, Unavailable. HistoryGone when the history does
        not hold where it resumes: list again, then watch from the listing's revision."""
        if since is None:
            since = self._revision()
        resume = _Resume(since)
        failing_since: Optional[float] = None
        attempt = 0
        while True:
            try:
                with connect_sse(
                    self._http,
                    "GET",
                    "/changes",
                    params=resume.params(prefix),
                    headers=resume.headers(),
                    timeout=_stream_timeouts(self.timeout),
                ) as source:
                    if not source.response.is_success:
                        source.response.read()
                        raise _error(source.response)
                    failing_since, attempt = None, 0
                    for sse in source.iter_sse():
                        event = resume.take(sse)
                        if event is not None:
                            yield event
            except (httpx.TransportError, Unavailable) as error:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > reconnect_for:
                    if isinstance(error, httpx.TransportError):
                        raise _unreachable(error, self._http.base_url) from None
                    raise
            time.sleep(_backoff(attempt))
            attempt += 1

    def _revision(self) -> int:
        """The store's revision now: what a watch from now on resumes from."""
        answer = self._send(_Call("GET", "/changes", retry=True, params={"timeout": 0}))
        return int(answer.json()["next"])

    def export(
        self,
        out: IO[bytes],
        prefix: str = "",
        *,
        progress: Optional[Callable[[int], None]] = None,
    ) -> int:
        """Write the NDJSON export of the keys under ``prefix`` to ``out``; returns the
        revision it is a snapshot of. An export cut short raises Unavailable."""
        try:
            with self._http.stream(
                "GET",
                "/export",
                params={"prefix": prefix},
                timeout=_stream_timeouts(self.timeout),
            ) as response:
                if not response.is_success:
                    response.read()
                    raise _error(response)
                written = 0
                for chunk in response.iter_raw():
                    out.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress(written)
                return int(response.headers["KV-Revision"])
        except httpx.TransportError as error:
            raise _unreachable(error, self._http.base_url) from None

    def import_(
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
            response = self._http.post(
                "/import",
                params=_import_params(replace, prefix),
                content=_chunks(source, progress),
                headers={"Content-Type": "application/x-ndjson"},
                timeout=_import_timeouts(self.timeout),
            )
        except httpx.TransportError as error:
            raise _unreachable(error, self._http.base_url) from None
        if not response.is_success:
            raise _error(response)
        return Imported(**response.json())

    def health(self) -> dict[str, Any]:
        return dict(self._send(_Call("GET", "/health", retry=True)).json())


# --- the asyncio client -----------------------------------------------------------------------


class AsyncClient:
    """The same as Client, for asyncio: its methods are coroutines, and ``keys`` and ``watch``
    async iterators. An async context manager that closes its connections."""

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
        self._http = httpx.AsyncClient(**_http_options(url, token, timeout))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await self._send_once(call)
            except (httpx.TransportError, Unavailable) as error:
                if not (call.retry and _retryable(error) and attempt < self.retries):
                    if isinstance(error, httpx.TransportError):
                        raise _unreachable(error, self._http.base_url) from None
                    raise
            await _async_sleep(_backoff(attempt))
            attempt += 1

    async def _send_once(self, call: _Call) -> httpx.Response:
        response = await self._http.request(**call.request())
        if response.is_success:
            return response
        raise _error(response)

    async def get(self, key: str) -> Entry:
        response = await self._send(_get(key))
        return _entry(key, response.json()["val"], response)

    async def set(
        self,
        key: str,
        val: str,
        *,
        ttl: Optional[float] = None,
        if_version: Optional[int] = None,
        create: bool = False,
    ) -> int:
        return _etag_version(await self._send(_set(key, val, ttl, if_version, create))) or 0

    async def delete(self, key: str, *, if_version: Optional[int] = None) -> None:
        await self._send(_delete(key, if_version))

    async def keys(
        self, prefix: str = "", *, values: bool = False, page_size: int = 1000
    ) -> AsyncGenerator[Entry, None]:
        cursor = None
        while True:
            page = (await self._send(_keys_page(prefix, values, page_size, cursor))).json()
            for item in page["items"]:
                yield _listed(item)
            cursor = page["cursor"]
            if cursor is None:
                return

    async def mget(self, keys: Iterable[str]) -> dict[str, Optional[str]]:
        found: dict[str, Optional[str]] = {}
        for call in _mget_calls(keys):
            found.update(_found(await self._send(call)))
        return found

    async def mset(self, items: Mapping[str, str], *, ttl: Optional[float] = None) -> int:
        return int((await self._send(_mset(items, ttl))).json()["version"])

    async def mdelete(self, keys: Iterable[str]) -> int:
        return int((await self._send(_mdelete(keys))).json()["deleted"])

    async def compare_and_set(
        self, key: str, fn: Callable[[Optional[str]], str], *, ttl: Optional[float] = None
    ) -> int:
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
                await _async_sleep(_backoff(min(attempt, 3)) / 5)
                attempt += 1

    async def watch(
        self, prefix: str = "", *, since: Optional[int] = None, reconnect_for: float = RECONNECT_FOR
    ) -> AsyncGenerator[Event, None]:
        if since is None:
            since = await self._revision()
        resume = _Resume(since)
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
                    timeout=_stream_timeouts(self.timeout),
                ) as source:
                    if not source.response.is_success:
                        await source.response.aread()
                        raise _error(source.response)
                    failing_since, attempt = None, 0
                    async for sse in source.aiter_sse():
                        event = resume.take(sse)
                        if event is not None:
                            yield event
            except (httpx.TransportError, Unavailable) as error:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > reconnect_for:
                    if isinstance(error, httpx.TransportError):
                        raise _unreachable(error, self._http.base_url) from None
                    raise
            await _async_sleep(_backoff(attempt))
            attempt += 1

    async def _revision(self) -> int:
        answer = await self._send(_Call("GET", "/changes", retry=True, params={"timeout": 0}))
        return int(answer.json()["next"])

    async def export(
        self,
        out: IO[bytes],
        prefix: str = "",
        *,
        progress: Optional[Callable[[int], None]] = None,
    ) -> int:
        try:
            async with self._http.stream(
                "GET",
                "/export",
                params={"prefix": prefix},
                timeout=_stream_timeouts(self.timeout),
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise _error(response)
                written = 0
                async for chunk in response.aiter_raw():
                    out.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress(written)
                return int(response.headers["KV-Revision"])
        except httpx.TransportError as error:
            raise _unreachable(error, self._http.base_url) from None

    async def import_(
        self,
        source: IO[bytes],
        *,
        replace: bool = False,
        prefix: str = "",
        progress: Optional[Callable[[int], None]] = None,
    ) -> Imported:
        async def chunks() -> AsyncIterator[bytes]:
            for chunk in _chunks(source, progress):
                yield chunk

        try:
            response = await self._http.post(
                "/import",
                params=_import_params(replace, prefix),
                content=chunks(),
                headers={"Content-Type": "application/x-ndjson"},
                timeout=_import_timeouts(self.timeout),
            )
        except httpx.TransportError as error:
            raise _unreachable(error, self._http.base_url) from None
        if not response.is_success:
            raise _error(response)
        return Imported(**response.json())

    async def health(self) -> dict[str, Any]:
        return dict((await self._send(_Call("GET", "/health", retry=True))).json())
