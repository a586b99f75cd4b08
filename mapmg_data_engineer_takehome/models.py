"""The request models: the one declaration of what each request may carry.

pydantic validates every request body and the listing's query parameters with these models
(validation.py), and the API document describes them. What a key and a value may be is
declared in rules.py (Key, Val); the limits that depend on settings (key and value bytes) are
checked by the handlers, since a model is declared once for every server.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from .rules import CURSOR_PATTERN, LEASE_ID_MAX_CHARS, Key, Val
from .store.base import MAX_TTL_SECONDS, TokenAccess

MAX_MGET_KEYS = 1_000
MAX_BATCH_WRITES = 10_000
MAX_PAGE = 1_000
DEFAULT_PAGE = 100
MAX_EVENTS = 1_000
MAX_WAIT_SECONDS = 60

Ttl = Annotated[
    float,
    Field(
        gt=0,
        le=MAX_TTL_SECONDS,
        allow_inf_nan=False,
        description="Seconds until the key expires (above 0, at most ten years). Without it, "
        "the key never expires, and an earlier expiry is removed.",
    ),
]


LeaseField = Annotated[
    Optional[str],
    Field(
        default=None,
        max_length=LEASE_ID_MAX_CHARS,
        description="A lease's id (POST /leases): the key then lives exactly as long as the "
        "lease, and shows its expiry. Not with ttl. A lease that does not exist, or has "
        "expired, is 404 lease_not_found, and nothing is written.",
    ),
]


class RequestModel(BaseModel):
    """Strict JSON: no field beyond those declared, no coercion ("5" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SetItemRequest(RequestModel):
    """Each item of POST /mset."""

    key: Key
    val: Val
    ttl: Optional[Ttl] = None


class SetRequest(SetItemRequest):
    """POST /set."""

    lease: LeaseField = None


class MgetRequest(RequestModel):
    """POST /mget."""

    keys: Annotated[list[Key], Field(min_length=1, max_length=MAX_MGET_KEYS)]


class MsetRequest(RequestModel):
    """POST /mset: all items are written in one transaction, or none."""

    items: Annotated[list[SetItemRequest], Field(min_length=1, max_length=MAX_BATCH_WRITES)]


class MdeleteRequest(RequestModel):
    """POST /mdelete: all keys are deleted in one transaction."""

    keys: Annotated[list[Key], Field(min_length=1, max_length=MAX_BATCH_WRITES)]


class TxnCompare(RequestModel):
    """A condition of POST /txn on one key: exactly one of version, value and exists."""

    key: Key
    version: Optional[int] = Field(
        default=None,
        ge=0,
        description="Compare the key's version (the revision of its last write, as in its "
        "ETag; 0 when the key is missing or expired) with cmp: =, !=, < or >.",
    )
    value: Optional[Val] = Field(
        default=None,
        description="Compare the key's value with cmp: = or !=. A missing or expired key "
        "has no value: = is false and != true.",
    )
    exists: Optional[bool] = Field(
        default=None,
        description="Whether the key has a live value (cmp =, the default, only).",
    )
    cmp: Literal["=", "!=", "<", ">"] = Field(default="=", description="How to compare.")


class TxnGetOperation(RequestModel):
    """Read a key: its value and version, both null when it has none."""

    op: Literal["get"]
    key: Key


class TxnSetOperation(RequestModel):
    """Set a key, as POST /set does; its version is the transaction's revision."""

    op: Literal["set"]
    key: Key
    val: Val
    ttl: Optional[Ttl] = None
    lease: LeaseField = None


class TxnDeleteOperation(RequestModel):
    """Delete one key, or every key that starts with prefix: exactly one of the two."""

    op: Literal["delete"]
    key: Optional[Key] = None
    prefix: Optional[str] = Field(
        default=None,
        description="Delete every live key that starts with this (the empty prefix: every "
        "key); at most KV_MAX_KEY_BYTES of UTF-8, without NUL.",
    )


TxnOperationRequest = Annotated[
    Union[TxnGetOperation, TxnSetOperation, TxnDeleteOperation], Field(discriminator="op")
]


class TxnRequest(RequestModel):
    """POST /txn: the compares, then the success branch if they all hold, else the failure
    branch, in one transaction and one revision. Each list may be left out (empty), and holds
    at most KV_MAX_TXN_OPS entries."""

    compare: list[TxnCompare] = Field(
        default_factory=list, description="Evaluated in order; all must hold for success."
    )
    success: list[TxnOperationRequest] = Field(
        default_factory=list, description="Run, in order, when every compare holds."
    )
    failure: list[TxnOperationRequest] = Field(
        default_factory=list, description="Run, in order, when a compare does not hold."
    )


class LeaseRequest(RequestModel):
    """POST /leases."""

    ttl: Annotated[
        float,
        Field(
            gt=0,
            le=MAX_TTL_SECONDS,
            allow_inf_nan=False,
            description="Seconds the lease lives unless kept alive (above 0, at most ten "
            "years); each keepalive renews it to this many seconds from then.",
        ),
    ]


class KeepaliveRequest(RequestModel):
    """POST /leases/keepalive: many leases renewed in one transaction."""

    ids: Annotated[
        list[str],
        Field(
            min_length=1,
            max_length=MAX_BATCH_WRITES,
            description="The leases to keep alive (at most 10,000): a holder of many renews "
            "them all in one request.",
        ),
    ]


# A token's name: short, and safe in a path, a log line and a shell without quoting.
TOKEN_NAME_PATTERN = "^[A-Za-z0-9._-]{1,64}$"
MAX_TOKEN_RULES = 100
# How long a rotated-out secret may keep working: long enough to roll it out, not to forget it.
MAX_GRACE_SECONDS = 86_400

TokenName = Annotated[
    str,
    Field(
        pattern=TOKEN_NAME_PATTERN,
        description="1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-'.",
    ),
]


class TokenRuleRequest(RequestModel):
    """A rule of a token: access to every key that starts with prefix."""

    prefix: str = Field(
        description="The keys it covers: those that start with it (the empty prefix: every "
        "key); at most KV_MAX_KEY_BYTES of UTF-8, without NUL.",
        json_schema_extra={"pattern": "^[^\\u0000]*$"},
    )
    access: TokenAccess = Field(description="read, or readwrite (read and write).")


class TokenRequest(RequestModel):
    """POST /tokens."""

    name: TokenName
    rules: list[TokenRuleRequest] = Field(
        default_factory=list,
        max_length=MAX_TOKEN_RULES,
        description=f"At most {MAX_TOKEN_RULES}. A request may read or write only the keys "
        "and prefixes a rule of the right access covers; rules only allow, never deny.",
    )
    admin: bool = Field(
        default=False, description="Whether it may manage tokens and read /config and /metrics."
    )
    expires_in: Optional[float] = Field(
        default=None,
        gt=0,
        le=MAX_TTL_SECONDS,
        allow_inf_nan=False,
        description="Seconds until it stops working (above 0, at most ten years); without "
        "it, it never expires.",
    )


class RotateRequest(RequestModel):
    """POST /tokens/{name}/rotate."""

    grace: Optional[float] = Field(
        default=None,
        ge=0,
        le=MAX_GRACE_SECONDS,
        allow_inf_nan=False,
        description=f"Seconds the old secret keeps working (at most {MAX_GRACE_SECONDS}, a "
        "day); without it, or 0, the old secret stops at once.",
    )


class ListQuery(BaseModel):
    """GET /keys: query parameters, which arrive as text (so not strict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only keys that start with this.")
    limit: int = Field(
        default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="The most keys on one page."
    )
    cursor: Optional[str] = Field(
        default=None,
        pattern=CURSOR_PATTERN,
        description="The previous page's cursor, as given; absent for the first page.",
    )
    values: bool = Field(default=False, description="Whether each item carries its value.")


class ChangesQuery(BaseModel):
    """GET /changes: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only changes to keys that start with this.")
    since: Optional[int] = Field(
        default=None,
        ge=0,
        le=2**62,
        description="Answer the changes in revisions above this one (a previous answer's "
        "next, a listing's KV-Revision). Absent: from the store's revision now on. "
        "Last-Event-ID, when sent, wins.",
    )
    limit: int = Field(
        default=MAX_EVENTS,
        ge=1,
        le=MAX_EVENTS,
        description="The most events in one answer, but a revision is never split: an answer "
        "may pass it to finish one.",
    )
    timeout: float = Field(
        default=30,
        ge=0,
        le=MAX_WAIT_SECONDS,
        allow_inf_nan=False,
        description="Seconds a long-poll waits when there is no change yet; 0 answers at once.",
    )


class ExportQuery(BaseModel):
    """GET /export: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = Field(default="", description="Only keys that start with this.")


class ImportQuery(BaseModel):
    """POST /import: query parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["merge", "replace"] = Field(
        default="merge",
        description="merge: set every line's key, leaving the others. replace: afterwards the "
        "store holds exactly the file's keys under prefix (in the whole store without one).",
    )
    prefix: str = Field(
        default="",
        description="Every line's key must start with this; with replace, the keys under it "
        "that the file lacks are removed.",
    )


class BulkLine(BaseModel):
    """One line of an export, and of an import's body: NDJSON, one object a line."""

    model_config = ConfigDict(extra="forbid")

    key: Key
    val: Val
    expires_at: Optional[str] = Field(
        default=None,
        description="When the key expires (RFC 3339; an export gives UTC with milliseconds), "
        "or null. An import skips (and counts) a line whose time has passed; at most ten "
        "years ahead.",
    )
