"""Who may do what: the one decision function every path asks (``require``), the grants it
judges by, and the secrets behind them.

A request's bearer secret names a grant: the bootstrap token (``KV_AUTH_TOKEN``: every key,
read and write, and admin) or a token of the store (store/base.py, "access tokens"): its rules,
``{prefix, access}``, and whether it is admin. A request is allowed only when every key it may
read or write, and every prefix it reads or writes under, is covered by a rule of the right
access; an admin request (tokens, /config, /metrics) needs an admin grant. A refusal is 403
``forbidden`` naming the key or prefix, before anything is written. Without ``KV_AUTH_TOKEN``
the server is open, as it always was: no request has a grant, and ``require`` allows all.

Rules only allow, never deny, so the union of a token's rules is what it may do, and the order
of its rules does not matter.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

from aiohttp import web

from .errors import ApiError
from .store.base import TokenAccess, TokenRule

# What a secret starts with, so that secret scanners (GitHub's, gitleaks) can find a leaked one.
SECRET_PREFIX = "kv_"


def new_secret() -> str:
    """A token's secret: 256 random bits, URL-safe, after SECRET_PREFIX."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    """What the store keeps of a secret: its SHA-256 in hex. A fast hash is right for 256
    random bits, which no dictionary holds; a slow one (bcrypt) would only cost every request
    its time."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What a request's token may do. ``name`` is the token's (the access log names it)."""

    name: str
    rules: tuple[TokenRule, ...]
    admin: bool

    def allows(self, key: str, access: TokenAccess) -> bool:
        """Whether a rule of ``access`` (read: either) covers ``key``."""
        return any(
            key.startswith(rule.prefix) and _enough(rule.access, access) for rule in self.rules
        )

    def allows_prefix(self, prefix: str, access: TokenAccess) -> bool:
        """Whether a rule of ``access`` covers every key under ``prefix``, even those that do
        not exist yet: one whose own prefix ``prefix`` starts with."""
        return self.allows(prefix, access)


BOOTSTRAP = Grant("KV_AUTH_TOKEN", (TokenRule("", "readwrite"),), admin=True)

# The grant of the request, set by the request wrapper (middleware.py) once the token is
# known; absent on an open server (no KV_AUTH_TOKEN) and on public routes.
GRANT_KEY = web.RequestKey("grant", Grant)


def _enough(granted: TokenAccess, needed: TokenAccess) -> bool:
    return granted == "readwrite" or needed == "read"


def require(
    request: web.Request,
    *,
    read: Iterable[str] = (),
    write: Iterable[str] = (),
    read_prefixes: Iterable[str] = (),
    write_prefixes: Iterable[str] = (),
    admin: bool = False,
) -> None:
    """Allow the request, or refuse it with 403 ``forbidden`` naming the first key or prefix
    its grant does not cover. Every handler calls it with everything the request may read or
    write, before it reads or writes anything."""
    grant = request.get(GRANT_KEY)
    if grant is None:
        return  # an open server
    if admin and not grant.admin:
        raise forbidden("This needs an admin token.")
    for key in read:
        if not grant.allows(key, "read"):
            raise forbidden(f"This token may not read the key {key!r}.")
    for key in write:
        if not grant.allows(key, "readwrite"):
            raise forbidden(f"This token may not write the key {key!r}.")
    for prefix in read_prefixes:
        if not grant.allows_prefix(prefix, "read"):
            raise forbidden(f"This token may not read the keys under {prefix!r}.")
    for prefix in write_prefixes:
        if not grant.allows_prefix(prefix, "readwrite"):
            raise forbidden(f"This token may not write the keys under {prefix!r}.")


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message + " Nothing was read or written.")


def grant_of(request: web.Request) -> Optional[Grant]:
    return request.get(GRANT_KEY)
