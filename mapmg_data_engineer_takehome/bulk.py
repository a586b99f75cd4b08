"""GET /export and POST /import: a store's live keys out as NDJSON, and back in.

An export is one snapshot of the store (Store.export), written a batch at a time as the client
reads it: a client that stops reading stops the export, and one that stops for longer than
KV_CLIENT_TIMEOUT is cut off, so that no snapshot is held open for ever.

An import is one bulk load (Store.load, the seed's path): its body is read as it arrives,
each line checked as a single /set would be, and the rows staged by the store; nothing is
applied until the last line has been read and found good, and then all of it is, in one
transaction with one revision.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, NoReturn, Optional, Union

import orjson
import structlog
from aiohttp import hdrs, web

from . import rules, validation
from .access import require
from .errors import JSON_HEADERS, ApiError, safe_message
from .models import ExportQuery, ImportQuery
from .protocol import stop_request_clock
from .settings import Settings
from .state import CLOCK_KEY, METRICS_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import MAX_TTL_SECONDS, LoadRow, StoreError
from .store.batches import BatchCut

log = structlog.get_logger("kv.bulk")

NDJSON = "application/x-ndjson"
_FIELDS = frozenset(("key", "val", "expires_at"))
# An import's rows go to the store this many at a time, fewer once their values pass
# _BATCH_CHARS: a batch is what the server holds of an import at once.
_BATCH_ROWS = 1_000
_BATCH_CHARS = 1 << 20
# JSON may spell a byte of text as six ("\u0001"): a line longer than this many times the
# largest key and value, plus room for the names and punctuation, cannot be valid.
_ESCAPE_FACTOR = 6
_LINE_OVERHEAD = 1_024


# --- export ----------------------------------------------------------------------------------


def ndjson_lines(rows: Sequence[LoadRow]) -> bytes:
    """The rows as an export's lines: one JSON object each, ending in a newline."""
    dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    return b"".join(
        [
            dumps(
                {
                    "key": key,
                    "val": val,
                    "expires_at": None if expires_at is None else rules.rfc3339(expires_at),
                },
                option=newline,
            )
            for key, val, expires_at in rows
        ]
    )


async def export(request: web.Request) -> web.StreamResponse:
    """GET /export: every live key under the prefix, in key order, as of one revision."""
    query = validation.parse_query(ExportQuery, request.query)
    require(request, read_prefixes=(query.prefix,))
    timeout = request.app[SETTINGS_KEY].client_timeout
    metrics = request.app[METRICS_KEY]
    async with request.app[STORE_KEY].export(query.prefix) as snapshot:
        response = web.StreamResponse(
            headers={hdrs.CONTENT_TYPE: NDJSON, rules.REVISION: str(snapshot.revision)}
        )
        await response.prepare(request)
        # From here on an error cannot be an answer: the connection is closed instead, so
        # that the client sees the body end before its last chunk, never a short export.
        try:
            async for batch in snapshot.batches():
                # write() waits while the client's buffers are full: as long as it reads.
                await asyncio.wait_for(response.write(ndjson_lines(batch)), timeout)
                # write() returns at once while the client keeps up: let the requests that
                # arrived meanwhile be answered before the next batch.
                await asyncio.sleep(0)
                if metrics is not None:
                    metrics.bulk_rows.labels("exported").inc(len(batch))
            await response.write_eof()
        except asyncio.TimeoutError:
            log.info("export_client_too_slow", timeout=timeout)
            _abort(request)
        except (ConnectionError, StoreError) as error:
            log.warning("export_failed", reason=safe_message(error))
            _abort(request)
        except Exception as error:  # a bug: said with its traceback, and the export cut
            log.error("export_failed", exc_info=error)
            _abort(request)
    return response


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


# --- import ----------------------------------------------------------------------------------


class NdjsonSource:
    """An import's body as a bulk load's rows: read as it arrives, each line checked, the
    lines whose expiry has passed skipped (and counted). The first bad line raises a 422
    invalid_line, a body past KV_MAX_IMPORT_BYTES a 413; either aborts the load."""

    fingerprint: Optional[str] = None

    def __init__(self, request: web.Request, settings: Settings, prefix: str, now_ms: int) -> None:
        self._request = request
        self._settings = settings
        self._prefix = prefix
        self._now_ms = now_ms
        self._latest_ms = now_ms + MAX_TTL_SECONDS * 1000
        self._max_line = (
            _ESCAPE_FACTOR * (settings.max_key_bytes + settings.max_value_bytes) + _LINE_OVERHEAD
        )
        self.lines = 0
        self.skipped = 0

    async def _chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: a 413 once it passes the limit, and a 408 when the client
        sends nothing for KV_CLIENT_TIMEOUT (a whole import may take longer than that)."""
        limit = self._settings.max_import_bytes
        timeout = self._settings.client_timeout
        content = self._request.content
        received = 0
        while True:
            try:
                data = await asyncio.wait_for(content.readany(), timeout)
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    "request_timeout",
                    f"The body stopped arriving for {timeout:g} s (KV_CLIENT_TIMEOUT); "
                    "nothing was imported.",
                ) from None
            if not data:
                return
            received += len(data)
            if received > limit:
                raise body_too_large(limit)
            yield data

    async def batches(self) -> AsyncIterator[list[LoadRow]]:
        cut: BatchCut[LoadRow] = BatchCut(_BATCH_ROWS, _BATCH_CHARS)
        pending = bytearray()
        async for data in self._chunks():
            if b"\n" not in data:
                pending += data
                if len(pending) > self._max_line:
                    self._too_long()
                continue
            pending += data
            *complete, rest = pending.split(b"\n")
            pending = bytearray(rest)
            for line in complete:
                row = self._parse(line)
                if row is not None and (full := cut.add(row, len(row[1]))) is not None:
                    yield full
            if len(pending) > self._max_line:
                self._too_long()
        if pending:
            row = self._parse(pending)  # a last line without its newline
            if row is not None and (full := cut.add(row, len(row[1]))) is not None:
                yield full
        if (last := cut.rest()) is not None:
            yield last

    def _too_long(self) -> NoReturn:
        self._invalid(
            self.lines + 1,
            None,
            f"is longer than any valid line can be ({self._max_line} bytes, from "
            "KV_MAX_KEY_BYTES and KV_MAX_VALUE_BYTES)",
        )

    def _parse(self, line: Union[bytes, bytearray]) -> Optional[LoadRow]:
        """The line's row; None for a blank line or one whose expiry has passed."""
        self.lines += 1
        number = self.lines
        if not line.strip():
            return None
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            document = self._parse_slowly(line, number)
        if type(document) is not dict:
            self._invalid(number, None, "is not a JSON object")
        if len(document) != 3 or document.keys() != _FIELDS:
            self._check_fields(document, number)
        key, val, expires = document.get("key"), document.get("val"), document.get("expires_at")
        if type(key) is not str:
            self._invalid(number, "key", "must be a string")
        if type(val) is not str:
            self._invalid(number, "val", "must be a string")
        self._check_text(key, val, number)
        expires_at = None
        if expires is not None:
            if type(expires) is not str:
                self._invalid(number, "expires_at", "must be an RFC 3339 time or null")
            expires_at = rules.parse_rfc3339(expires)
            if expires_at is None:
                self._invalid(
                    number, "expires_at", "must be an RFC 3339 time, as 2026-11-27T07:00:00.000Z"
                )
            if expires_at <= self._now_ms:
                self.skipped += 1
                return None
            if expires_at > self._latest_ms:
                self._invalid(number, "expires_at", "is more than ten years ahead")
        return (key, val, expires_at)

    def _parse_slowly(self, line: Union[bytes, bytearray], number: int) -> Any:
        """What orjson refuses may still be JSON: escaped lone surrogates, which are JSON but
        not text (an invalid string of a field, then)."""
        try:
            document = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self._invalid(number, None, "is not JSON")
        if isinstance(document, dict):
            for field in ("key", "val", "expires_at"):
                value = document.get(field)
                if isinstance(value, str) and not rules.is_text(value):
                    self._invalid(number, field, "contains an unpaired UTF-16 surrogate")
        return document

    def _check_fields(self, document: dict[str, Any], number: int) -> None:
        for field in document:
            if field not in _FIELDS:
                self._invalid(number, field, "is not a field of a line (key, val, expires_at)")
        for field in ("key", "val"):
            if field not in document:
                self._invalid(number, field, "is missing")

    def _check_text(self, key: str, val: str, number: int) -> None:
        broken = rules.broken_rule(self._settings, key, val)
        if broken is not None:
            self._invalid(number, *self._broken_rule(broken))
        if not key.startswith(self._prefix):
            self._invalid(number, "key", "is not under the import's prefix")
        # A refused line refuses the whole import, as an invalid one does: nothing is written.
        require(self._request, write=(key,))

    def _broken_rule(self, broken: str) -> tuple[str, str]:
        """The field that breaks a rule of rules.broken_rule, and how a line's 422 says it."""
        settings = self._settings
        return {
            rules.EMPTY_KEY: ("key", "is empty"),
            rules.KEY_TOO_LONG: ("key", f"is longer than {settings.max_key_bytes} bytes of UTF-8"),
            rules.VALUE_TOO_LARGE: (
                "val",
                f"is longer than {settings.max_value_bytes} bytes of UTF-8",
            ),
            rules.NUL_IN_KEY: ("key", "contains a NUL character (U+0000)"),
            rules.NUL_IN_VAL: ("val", "contains a NUL character (U+0000)"),
        }[broken]

    def _invalid(self, number: int, field: Optional[str], problem: str) -> NoReturn:
        where = f"Line {number}" if field is None else f"Line {number}, field '{field}',"
        details: dict[str, Any] = {"line": number}
        if field is not None:
            details["field"] = field
        raise ApiError(
            422, "invalid_line", f"{where} {problem}; nothing was imported.", details=details
        )


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"The import is larger than the limit of {limit} bytes (KV_MAX_IMPORT_BYTES); "
        "nothing was imported.",
    )


async def import_(request: web.Request) -> web.Response:
    """POST /import: the body's lines, all applied in one revision, or none of them."""
    settings = request.app[SETTINGS_KEY]
    query = validation.parse_query(ImportQuery, request.query)
    replace = query.prefix if query.mode == "replace" else None
    if replace is not None:  # deletes every key under the prefix that the body does not hold
        require(request, write_prefixes=(replace,))
    limit = settings.max_import_bytes
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit)  # refused before reading a byte of it
    # A large body may take longer than KV_CLIENT_TIMEOUT to arrive: only a pause that long
    # is too slow (see NdjsonSource._chunks).
    stop_request_clock(request)
    store = request.app[STORE_KEY]
    now_ms = round(request.app[CLOCK_KEY]() * 1000)
    source = NdjsonSource(request, settings, query.prefix, now_ms)
    loaded = await store.load(source, replace=replace)
    assert loaded is not None  # an import has no fingerprint to find already applied
    metrics = request.app[METRICS_KEY]
    if metrics is not None:
        metrics.bulk_rows.labels("imported").inc(loaded.applied)
        metrics.bulk_rows.labels("skipped").inc(source.skipped)
    body = {"imported": loaded.applied, "skipped": source.skipped, "revision": loaded.revision}
    return web.Response(body=orjson.dumps(body), headers=JSON_HEADERS)
