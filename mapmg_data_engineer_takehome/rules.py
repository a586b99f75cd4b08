"""The wire rules, in one home: what a key and a value may be, how a time, a listing's cursor
and a version are written, and the names of the API's own headers.

The handlers, an import's lines (bulk.py), the seed, the request models, the routes and the
API document read each rule here; none of them says one of its own. What a client is told
when a rule is broken is said where the rule is applied, since each says it its own way (a
request's field, an import's line, a seed's skip count).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Optional

from pydantic import Field, StrictStr

from .settings import Settings

# --- headers ---------------------------------------------------------------------------------

# As the API document names it (RFC 9110's spelling; aiohttp's hdrs.ETAG reads "Etag").
ETAG = "ETag"
EXPIRES_AT = "KV-Expires-At"
# The store's revision a listing's page (or an export) was read at: where a watcher of its
# keys starts.
REVISION = "KV-Revision"
# Where a reconnecting EventSource resumes a stream of /changes.
LAST_EVENT_ID = "Last-Event-ID"
REQUEST_ID = "X-Request-ID"

# --- versions --------------------------------------------------------------------------------

# A version (a revision) as a header writes it: up to 18 digits, which any int64 holds.
REVISION_DIGITS = "[0-9]{1,18}"
# ETag and If-Match carry a version in double quotes ("12"), as HTTP writes an entity tag.
VERSION_TAG = re.compile(f'"({REVISION_DIGITS})"')


def version_tag(version: int) -> str:
    """A version as ETag gives it: ``"12"``."""
    return f'"{version}"'


# --- keys and values -------------------------------------------------------------------------

# PostgreSQL's text cannot hold U+0000; every store refuses it, so that they answer alike.
NUL = "\x00"
# How the document says "no NUL" (a JSON Schema pattern); the check is broken_rule's.
_NO_NUL = {"pattern": "^[^\\u0000]*$"}
Key = Annotated[
    StrictStr,
    Field(
        min_length=1,
        description="Any non-empty string without NUL; at most KV_MAX_KEY_BYTES of UTF-8.",
        json_schema_extra=_NO_NUL,
    ),
]
Val = Annotated[
    StrictStr,
    Field(
        description="Any string without NUL; at most KV_MAX_VALUE_BYTES of UTF-8.",
        json_schema_extra=_NO_NUL,
    ),
]

# The rules broken_rule finds broken, first to last.
EMPTY_KEY = "empty_key"
KEY_TOO_LONG = "key_too_long"
VALUE_TOO_LARGE = "value_too_large"
NUL_IN_KEY = "nul_in_key"
NUL_IN_VAL = "nul_in_val"


def broken_rule(settings: Settings, key: str, val: Optional[str] = None) -> Optional[str]:
    """The first rule ``key`` (or ``val``) breaks, one of the names above, or None.

    The byte limits are settings (KV_MAX_KEY_BYTES, KV_MAX_VALUE_BYTES), which is why they
    are checked here rather than declared in Key and Val: a model is declared once for every
    server."""
    if not key:
        return EMPTY_KEY
    if utf8_length_exceeds(key, settings.max_key_bytes):
        return KEY_TOO_LONG
    if val is not None and utf8_length_exceeds(val, settings.max_value_bytes):
        return VALUE_TOO_LARGE
    if NUL in key:
        return NUL_IN_KEY
    if val is not None and NUL in val:
        return NUL_IN_VAL
    return None


def utf8_length_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` takes more than ``limit`` bytes of UTF-8 (encoding only when it may)."""
    # A character is at most 4 bytes and at least 1: most texts are decided by their length.
    if len(text) * 4 <= limit:
        return False
    return len(text) > limit or len(text.encode("utf-8")) > limit


def is_text(text: str) -> bool:
    """Whether ``text`` is text: no unpaired UTF-16 surrogate (JSON can escape one)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_of(blob: bytes) -> Optional[str]:
    """The text ``blob`` holds when it is valid UTF-8 without NUL, else None: how the seed
    reads a value that SQLite does not vouch for."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if NUL in text else text


# --- listing cursors -------------------------------------------------------------------------

# What a cursor may look like before it is decoded: unpadded URL-safe base64.
CURSOR_PATTERN = "^[A-Za-z0-9_-]+$"

# A lease's id, as the store makes it (base.new_lease_id): 32 hex digits. Any other text names
# no lease (404 lease_not_found) without asking the store. A body's lease field is bounded.
LEASE_ID = re.compile("[0-9a-f]{32}")
LEASE_ID_MAX_CHARS = 64


def names_no_lease(lease: str) -> bool:
    """Whether ``lease`` cannot be a lease's id: no store ever made one like it."""
    return LEASE_ID.fullmatch(lease) is None


def encode_cursor(key: str) -> str:
    """An opaque cursor that resumes a listing after ``key``."""
    return base64.urlsafe_b64encode(key.encode("utf-8")).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, settings: Settings) -> Optional[str]:
    """The key a cursor resumes after, or None when it is not one of ours."""
    try:
        key = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        after = key.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    if not after or utf8_length_exceeds(after, settings.max_key_bytes):
        return None
    return after


# --- times -----------------------------------------------------------------------------------

# When a key expires, as the KV-Expires-At header, listings, exports and the change feed give
# it, and as an import's lines may write it.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MILLISECOND = timedelta(milliseconds=1)
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


def rfc3339(milliseconds: int) -> str:
    """An expiry as RFC 3339 UTC with milliseconds: 2026-11-27T07:00:00.000Z."""
    # isoformat of a naive time, a quarter of strftime's cost (every keepalive answers one),
    # and a year of four digits even before 1000, as RFC 3339 has it (strftime's %Y has not).
    moment = _NAIVE_EPOCH + timedelta(milliseconds=milliseconds)
    return f"{moment.isoformat(timespec='milliseconds')}Z"


def parse_rfc3339(text: str) -> Optional[int]:
    """An RFC 3339 time as milliseconds since the epoch (any offset, fractions past the
    millisecond dropped), or None when ``text`` is not one."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, off_hours, off_minutes = match.groups()
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second),
            tzinfo=timezone.utc,
        )  # fmt: skip
    except ValueError:  # February 30th, hour 24, and the like
        return None
    milliseconds = (moment - _EPOCH) // _MILLISECOND + int((fraction or "0").ljust(3, "0")[:3])
    if sign is not None:
        offset = (int(off_hours) * 60 + int(off_minutes)) * 60_000
        milliseconds -= offset if sign == "+" else -offset
    return milliseconds
