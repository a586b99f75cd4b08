"""What the endpoints answer, for the API document.

Handlers write these shapes with orjson directly (a model per response would cost more than
the rest of a GET), and schemathesis checks in CI that every answer conforms to them.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class KeyValue(BaseModel):
    """A key and its value: the answer of GET /get/{key} and POST /set."""

    key: str
    val: str


class Deleted(BaseModel):
    """The answer of DELETE /delete/{key}."""

    key: str
    deleted: Literal[True]


class ListedItem(BaseModel):
    """One key of a listing; ``val`` only with values=true."""

    key: str
    version: int = Field(description="The revision of the write that last changed the key.")
    expires_at: Optional[str] = Field(
        description="When the key expires (RFC 3339, UTC, milliseconds), or null."
    )
    val: Optional[str] = Field(default=None, description="Present with values=true.")


class ListPage(BaseModel):
    """A page of GET /keys."""

    items: list[ListedItem]
    cursor: Optional[str] = Field(
        description="Pass it as ?cursor= for the next page; null on the last."
    )


class MgetItem(BaseModel):
    key: str
    val: Optional[str] = Field(description="null when the key has no value (absent or expired).")


class MgetAnswer(BaseModel):
    """The answer of POST /mget, in request order."""

    items: list[MgetItem]


class MsetAnswer(BaseModel):
    """The answer of POST /mset."""

    count: int = Field(description="How many items were written.")
    version: int = Field(description="The revision all the items now have.")


class MdeleteAnswer(BaseModel):
    """The answer of POST /mdelete."""

    deleted: int = Field(description="How many of the keys had a value.")


class TxnGot(BaseModel):
    """A get's result in POST /txn."""

    key: str
    val: Optional[str] = Field(description="null when the key has no value.")
    version: Optional[int] = Field(description="null when the key has no value.")


class TxnWritten(BaseModel):
    """A set's result in POST /txn."""

    key: str
    version: int = Field(description="The key's new version: the transaction's revision.")


class TxnDeletedKey(BaseModel):
    """A delete's result in POST /txn."""

    key: str
    deleted: bool = Field(description="Whether the key had a value.")


class TxnDeletedPrefix(BaseModel):
    """A prefix delete's result in POST /txn."""

    prefix: str
    deleted: int = Field(description="How many keys under the prefix had a value.")


class TxnAnswer(BaseModel):
    """The answer of POST /txn."""

    succeeded: bool = Field(description="Whether every compare held (and success ran).")
    revision: int = Field(
        description="The store's revision after the transaction: its own when the branch "
        "changed anything, which every key it set has as its version."
    )
    failed: Optional[int] = Field(
        description="The index of the first compare that did not hold; null when all held."
    )
    results: list[Union[TxnGot, TxnWritten, TxnDeletedKey, TxnDeletedPrefix]] = Field(
        description="One per operation of the branch that ran, in order."
    )


class LeaseAnswer(BaseModel):
    """A lease: the answer of POST /leases and POST /leases/{id}/keepalive."""

    id: str = Field(description="The lease's id: name it in a set's lease.")
    ttl: float = Field(description="Seconds it lives from each grant or keepalive.")
    expires_at: str = Field(
        description="When it expires unless kept alive, RFC 3339 UTC with milliseconds; its "
        "keys show the same as KV-Expires-At."
    )


class KeepaliveAnswer(BaseModel):
    """The answer of POST /leases/keepalive."""

    leases: list[LeaseAnswer] = Field(description="The leases renewed, in the order asked.")
    not_found: list[str] = Field(
        description="The ids asked for that name no live lease (never granted, revoked or "
        "expired): grant new ones."
    )


class LeaseKeysAnswer(LeaseAnswer):
    """The answer of GET /leases/{id}."""

    keys: list[str] = Field(description="Its keys, in ascending order of their UTF-8 bytes.")


class LeaseRevoked(BaseModel):
    """The answer of DELETE /leases/{id}."""

    id: str
    revoked: Literal[True]
    deleted: int = Field(description="How many keys went with it, in one revision.")


class TokenRuleView(BaseModel):
    """A rule of a token."""

    prefix: str
    access: Literal["read", "readwrite"]


class TokenView(BaseModel):
    """A token as GET /tokens lists it: never its secret, nor the secret's hash."""

    name: str
    rules: list[TokenRuleView]
    admin: bool
    created_at: str = Field(description="RFC 3339 UTC with milliseconds.")
    expires_at: Optional[str] = Field(description="When it stops working; null if never.")
    last_used_at: Optional[str] = Field(
        description="When a request last used it, recorded every few seconds; null if never."
    )


class TokenList(BaseModel):
    """The answer of GET /tokens."""

    tokens: list[TokenView] = Field(description="In ascending order of name.")


class TokenSecret(BaseModel):
    """The answer of POST /tokens and POST /tokens/{name}/rotate: the secret, shown once."""

    name: str
    secret: str = Field(
        description="Send it as 'Authorization: Bearer <secret>'. Shown only this once: the "
        "server keeps its SHA-256, never the secret."
    )
    rules: list[TokenRuleView]
    admin: bool
    created_at: str = Field(description="RFC 3339 UTC with milliseconds.")
    expires_at: Optional[str] = Field(description="When it stops working; null if never.")


class TokenSelf(BaseModel):
    """The answer of GET /tokens/self: what the calling token may do."""

    name: Optional[str] = Field(description="The token's name; null on an open server.")
    rules: list[TokenRuleView]
    admin: bool


class TokenRevoked(BaseModel):
    """The answer of DELETE /tokens/{name}."""

    name: str
    revoked: Literal[True]


class Health(BaseModel):
    """The answer of GET /health."""

    status: Literal["ok"]
    store: Literal["sqlite", "memory", "postgres"]


class ConfigView(BaseModel):
    """The answer of GET /config: the effective settings (secrets as "**********")."""

    model_config = ConfigDict(extra="allow")

    input_db_used: Optional[str] = Field(description="The input.db seeding read, or null.")


class ChangeEvent(BaseModel):
    """One key's change in one revision; ``val`` and ``expires_at`` only on a set."""

    revision: int = Field(description="The revision of the write; a batch's keys share it.")
    type: Literal["set", "delete", "expire"] = Field(
        description="set, delete, or expire: the key's time ran out and the purge removed it."
    )
    key: str
    val: Optional[str] = Field(default=None, description="The value set (a set only).")
    expires_at: Optional[str] = Field(
        default=None,
        description="When the key set expires (RFC 3339, UTC, milliseconds), or null (a set only).",
    )


class ChangesAnswer(BaseModel):
    """A long-poll answer of GET /changes."""

    events: list[ChangeEvent] = Field(description="In revision order; a revision's keys in order.")
    next: int = Field(
        description="The since of the next request: the store's revision when the answer was "
        "made, or with more, the last event's revision."
    )
    more: bool = Field(description="Whether the limit cut the answer short.")


class ImportAnswer(BaseModel):
    """The answer of POST /import."""

    imported: int = Field(description="Lines applied (a key's earlier lines included).")
    skipped: int = Field(description="Lines skipped because their expires_at had passed.")
    revision: int = Field(
        description="The import's revision, which every key it wrote has as its version; the "
        "store's unchanged revision when it changed nothing."
    )


class ErrorBody(BaseModel):
    """Every non-2xx answer."""

    error: str = Field(description="A code, one of those listed with the status.")
    message: str = Field(description="What went wrong, in a sentence.")
