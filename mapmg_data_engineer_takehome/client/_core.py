"""What the two clients share and what is no I/O (the sans-IO core): the results, the typed
exceptions, how a call is made into a request and an answer into a result or an exception,
the watch's resume point, and the timeouts and options of the connections. ``AsyncClient``
(_async.py) and ``Client`` (_sync.py) only send.

It imports nothing of the server, so that a script (and the kv command) starts fast.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
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
    key: str, val: str, ttl: Optional[float], if_version: Optional[int], create: bool
) -> Call:
    body: dict[str, Any] = {"key": key, "val": val}
    if ttl is not None:
        body["ttl"] = ttl
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
