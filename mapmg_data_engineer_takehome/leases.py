"""The lease endpoints: grant, keep alive, read and revoke a lease (see store/base.py's
leases). A set names a lease through POST /set or a transaction's set (handlers.py).

Every answer is JSON with the lease's id; a lease that was never granted, was revoked or has
expired is 404 lease_not_found (store.base.LeaseNotFound, which errors.py renders).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import orjson
from aiohttp import web

from .access import grant_of, require
from .errors import JSON_HEADERS
from .models import KeepaliveRequest, LeaseRequest
from .rules import names_no_lease, rfc3339
from .state import METRICS_KEY, STORE_KEY
from .store.base import KeysRefused, Lease, LeaseNotFound, MayWrite
from .validation import parse_body


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), headers=JSON_HEADERS)


def _shown(lease: Lease) -> dict[str, Any]:
    # A whole number of seconds as the client most likely sent it: 60, not 60.0.
    ttl = int(lease.ttl) if float(lease.ttl).is_integer() else lease.ttl
    return {"id": lease.id, "ttl": ttl, "expires_at": rfc3339(lease.expires_at)}


def _lease_id(request: web.Request) -> str:
    """The lease's id from the path; one no store could have made names no lease."""
    lease = request.match_info["id"]
    if names_no_lease(lease):
        raise LeaseNotFound(lease)
    return lease


async def grant(request: web.Request) -> web.Response:
    """POST /leases: a new lease of ttl seconds."""
    # aiohttp's client_max_size (KV_MAX_BODY_BYTES) bounds the body: 413 beyond it.
    body = parse_body(LeaseRequest, await request.read())
    lease = await request.app[STORE_KEY].grant_lease(body.ttl)
    metrics = request.app[METRICS_KEY]
    if metrics is not None:
        metrics.observe_lease("granted")
    return _json(_shown(lease))


@contextlib.contextmanager
def _writing_keys(request: web.Request) -> Iterator[Optional[MayWrite]]:
    """Keeping a lease alive or revoking it writes its keys (their expiry, or their end): the
    token must be able to write every one. The block is given the judge to hand the store,
    which asks it inside the write's transaction, of the keys the lease has then, so that a
    key attached to the lease by another token a moment before is judged too: None when
    there is nothing to judge (an open server, or a token that may write every key). A
    refusal the store raises (KeysRefused) leaves the block as the 403 that ``require``
    words. Granting a lease needs no more than a valid token."""
    grant = grant_of(request)
    if grant is None or grant.allows_prefix("", "readwrite"):
        yield None
        return
    try:
        yield lambda keys: all(grant.allows(key, "readwrite") for key in keys)
    except KeysRefused as refused:
        require(request, write=refused.keys)
        raise AssertionError(
            "the grant refused these keys in the store, and allows them here"
        ) from refused


async def keepalive(request: web.Request) -> web.Response:
    """POST /leases/{id}/keepalive: renew the lease and its keys to ttl seconds from now."""
    lease = _lease_id(request)
    with _writing_keys(request) as may_write:
        renewed = await request.app[STORE_KEY].keepalive_lease(lease, may_write)
    return _json(_shown(renewed))


async def keepalive_many(request: web.Request) -> web.Response:
    """POST /leases/keepalive: renew many leases in one transaction, as one keepalive each
    would; those that are not live are named, not an error."""
    body = parse_body(KeepaliveRequest, await request.read())
    asked = list(dict.fromkeys(body.ids))
    # An id no store could have made names no lease: the store is not asked about it.
    leases = [lease for lease in asked if not names_no_lease(lease)]
    # Judged as each lease's own keepalive would be: one lease the token may not renew
    # refuses the request, and nothing is renewed.
    with _writing_keys(request) as may_write:
        renewed = await request.app[STORE_KEY].keepalive_leases(leases, may_write)
    kept = {lease.id for lease in renewed}
    return _json(
        {
            "leases": [_shown(lease) for lease in renewed],
            "not_found": [lease for lease in asked if lease not in kept],
        }
    )


async def read(request: web.Request) -> web.Response:
    """GET /leases/{id}: the lease and its keys, in key order."""
    found = await request.app[STORE_KEY].lease_keys(_lease_id(request))
    require(request, read=found.keys)
    return _json({**_shown(found.lease), "keys": list(found.keys)})


async def revoke(request: web.Request) -> web.Response:
    """DELETE /leases/{id}: the lease and its keys go, in one revision."""
    lease = _lease_id(request)
    with _writing_keys(request) as may_write:
        deleted = await request.app[STORE_KEY].revoke_lease(lease, may_write)
    metrics = request.app[METRICS_KEY]
    if metrics is not None:
        metrics.observe_lease("revoked")
    return _json({"id": lease, "revoked": True, "deleted": deleted})
