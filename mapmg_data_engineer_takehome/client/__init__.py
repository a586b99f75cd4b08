"""A Python client for the key-value service: ``Client`` for blocking code, ``AsyncClient`` for
asyncio, with the same methods, typed results and typed exceptions.

    from mapmg_data_engineer_takehome.client import Client

    with Client("http://127.0.0.1:8000") as kv:
        kv.set("greeting", "hello")
        print(kv.get("greeting").val)

Both are thin layers over httpx (kept-alive connections, timeouts) and httpx-sse (the change
feed's stream). What the two share, how a call is made into a request and an answer into a
result or an exception, is written once in _core.py; each class only sends. ``AsyncClient``
(_async.py) is written by hand, and ``Client`` (_sync.py) is generated from it when the
package is built (setup.py), so that the two cannot drift apart.

Retries: a read, a conditional write (``if_version``, ``create``) and the reconnection of a
watch are retried with backoff after a connection error or a 503, since doing them twice
changes nothing that doing them once would not. A blind write (``set`` without a condition,
``delete`` without ``if_version``, ``mset``, ``mdelete``, ``import_``) is sent once: after a
failure nobody can tell whether it was applied, and repeating it could undo a write that
came between. A retried conditional write whose first try did commit fails its second with
``PreconditionFailed``: read again, as after any conflict.

This package imports nothing of the server, so that a script (and the kv command) starts fast.
"""

from __future__ import annotations

from ._async import AsyncClient, AsyncLock
from ._core import (
    Entry,
    Event,
    Forbidden,
    HistoryGone,
    Identity,
    Imported,
    InvalidRequest,
    KeyNotFound,
    KVError,
    Lease,
    LeaseNotFound,
    LockLost,
    PreconditionFailed,
    Token,
    TokenExists,
    TokenNotFound,
    TokenRule,
    TxnResult,
    Unauthorized,
    Unavailable,
)
from ._sync import Client, Lock

__all__ = [
    "AsyncClient",
    "AsyncLock",
    "Client",
    "Entry",
    "Event",
    "Forbidden",
    "HistoryGone",
    "Identity",
    "Imported",
    "InvalidRequest",
    "KVError",
    "KeyNotFound",
    "Lease",
    "LeaseNotFound",
    "Lock",
    "LockLost",
    "PreconditionFailed",
    "Token",
    "TokenExists",
    "TokenNotFound",
    "TokenRule",
    "TxnResult",
    "Unauthorized",
    "Unavailable",
]
