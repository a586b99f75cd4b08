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

import asyncio
import contextlib
import hashlib
import math
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import orjson
import structlog
from aiohttp import hdrs, web

from .errors import ApiError, safe_message
from .metrics import Metrics
from .state import METRICS_KEY, STORE_KEY
from .store.base import Store, StoreError, Token, TokenAccess, TokenRule

log = structlog.get_logger("kv.access")

# How often each process asks the store whether its tokens changed (a revocation, a rotation,
# a new token): twice a second, so that a revoked secret stops within 1 s on every worker and
# replica.
POLL_INTERVAL = 0.5
# Every this many polls (a few seconds), the tokens used since are written as last used.
TOUCH_EVERY_POLLS = 10

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
    # The prefixes each access covers, for str.startswith, which takes a tuple: one call in C
    # on every request, rather than a loop over the rules.
    _readable: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _writable: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        writable = tuple(rule.prefix for rule in self.rules if rule.access == "readwrite")
        object.__setattr__(self, "_readable", tuple(rule.prefix for rule in self.rules))
        object.__setattr__(self, "_writable", writable)

    def allows(self, key: str, access: TokenAccess) -> bool:
        """Whether a rule of ``access`` (read: either) covers ``key``."""
        return key.startswith(self._writable if access == "readwrite" else self._readable)

    def allows_prefix(self, prefix: str, access: TokenAccess) -> bool:
        """Whether a rule of ``access`` covers every key under ``prefix``, even those that do
        not exist yet: one whose own prefix ``prefix`` starts with."""
        return self.allows(prefix, access)


BOOTSTRAP = Grant("KV_AUTH_TOKEN", (TokenRule("", "readwrite"),), admin=True)

# The grant of the request, set by the request wrapper (middleware.py) once the token is
# known; absent on an open server (no KV_AUTH_TOKEN) and on public routes.
if TYPE_CHECKING or hasattr(web, "RequestKey"):
    GRANT_KEY = web.RequestKey("grant", Grant)
else:  # aiohttp 3.13, the last for Python 3.9, has no RequestKey: a request's storage by str
    GRANT_KEY = "kv.grant"


def _count_refusal(metrics: Optional[Metrics], reason: str) -> None:
    if metrics is not None:
        metrics.auth_refusals.labels(reason).inc()


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
        _count_refusal(request.app[METRICS_KEY], "not_admin")
        raise forbidden("This needs an admin token.")
    refusal = _refusal(grant, read, write, read_prefixes, write_prefixes)
    if refusal is not None:
        _count_refusal(request.app[METRICS_KEY], "forbidden")
        raise forbidden(refusal)


def _refusal(
    grant: Grant,
    read: Iterable[str],
    write: Iterable[str],
    read_prefixes: Iterable[str],
    write_prefixes: Iterable[str],
) -> Optional[str]:
    """Why ``grant`` does not cover every key and prefix, or None when it does. A prefix is
    covered as a key is (Grant.allows_prefix), so the four differ only in their message."""
    asked: tuple[tuple[Iterable[str], TokenAccess, str], ...] = (
        (read, "read", "read the key"),
        (write, "readwrite", "write the key"),
        (read_prefixes, "read", "read the keys under"),
        (write_prefixes, "readwrite", "write the keys under"),
    )
    for names, access, what in asked:
        for name in names:
            if not grant.allows(name, access):
                return f"This token may not {what} {_shown(name)}."
    return None


def _shown(text: str) -> str:
    """A key or prefix in a message, as JSON writes it (so that any character shows)."""
    return orjson.dumps(text).decode()


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message + " Nothing was read or written.")


def grant_of(request: web.Request) -> Optional[Grant]:
    return request.get(GRANT_KEY)


# --- authentication by the store's tokens -----------------------------------------------------

BEARER = "Bearer "


def unauthorized() -> ApiError:
    """The one answer to a missing, unknown, expired, revoked or rotated-out secret: which of
    them it was is for the metrics (kv_auth_refusals_total), never for the client."""
    return ApiError(
        401,
        "unauthorized",
        "This server needs the header 'Authorization: Bearer <token>' with its token.",
        {hdrs.WWW_AUTHENTICATE: 'Bearer realm="kv"'},
    )


@dataclass(frozen=True)
class _Known:
    """A secret found in the store: its grant, and when it stops (ms since the epoch; None
    for never): ``expires_at`` the token's expiry, ``retired_at`` the end of a rotation's
    grace when the secret is the one a rotation replaced."""

    grant: Grant
    expires_at: Optional[int]
    retired_at: Optional[int]


class Tokens:
    """This process's cache of the store's tokens, which turns a request's Authorization header
    into its grant.

    A hit costs a dict lookup on the header's exact text (``cached``, not even a coroutine, for
    a secret that never ends): no hash, no store read. A miss hashes the secret and reads the
    store (``token_by_hash``), so a token created a moment ago works at once. The whole cache
    is dropped when the store's tokens generation changes, which ``poll`` looks at every
    POLL_INTERVAL: a delete or rotation reaches every worker and replica within a second.
    Expiry and a rotation's grace are judged at each request, by the clock.

    Made with the app, so that the request wrapper holds it; its store is the app's, given by
    ``start`` once open (tokens_context).
    """

    _store: Store

    def __init__(self, clock: Callable[[], float], metrics: Optional[Metrics] = None) -> None:
        self._clock = clock
        self._metrics = metrics
        # Headers seen, by whether their secret ends (an expiry, a rotation's grace) or not.
        self._lasting: dict[str, Grant] = {}
        self._ending: dict[str, _Known] = {}
        self._by_hash: dict[str, Token] = {}
        self._generation: Optional[int] = None
        # Bumped at each drop, so that a store read begun before a drop is not cached after it.
        self._epoch = 0
        self._used: set[str] = set()  # names of the tokens used since the last touch

    def cached(self, header: str) -> Optional[Grant]:
        """The grant of a header seen before whose secret never ends, or None: ask ``grant``."""
        grant = self._lasting.get(header)
        if grant is not None:
            self._used.add(grant.name)
        return grant

    async def grant(self, header: str) -> Grant:
        """The grant of a request's Authorization header; 401 when it names no live token."""
        known = self._ending.get(header)
        if known is None:
            known = await self._look_up(header)
        self._check_time(known)
        self._used.add(known.grant.name)
        return known.grant

    def _check_time(self, known: _Known) -> None:
        now_ms = self._clock() * 1000
        if known.expires_at is not None and now_ms >= known.expires_at:
            raise self._refused("expired")
        if known.retired_at is not None and now_ms >= known.retired_at:
            raise self._refused("unknown")  # a rotated-out secret is an unknown one

    def _refused(self, reason: str) -> ApiError:
        _count_refusal(self._metrics, reason)
        return unauthorized()

    async def _look_up(self, header: str) -> _Known:
        if not header.startswith(BEARER) or len(header) == len(BEARER):
            raise self._refused("missing" if not header else "unknown")
        secret_hash = hash_secret(header[len(BEARER) :])
        token = self._by_hash.get(secret_hash)
        if token is None:
            epoch = self._epoch
            token = await self._store.token_by_hash(secret_hash)
            if token is None:
                raise self._refused("unknown")
            if epoch != self._epoch:  # dropped meanwhile: the token read may be stale
                return _known(token, secret_hash)
            self._by_hash[secret_hash] = token
        known = _known(token, secret_hash)
        if known.expires_at is None and known.retired_at is None:
            self._lasting[header] = known.grant
        else:
            self._ending[header] = known
        return known

    async def start(self, store: Store) -> None:
        """Read the tokens of ``store`` from now on; its generation is learnt before the
        first request, so that no change after it goes unnoticed."""
        self._store = store
        self._generation = await store.tokens_generation()

    async def poll(self) -> None:
        """Drop the cache when the store's tokens have changed since the last look."""
        generation = await self._store.tokens_generation()
        if generation != self._generation:
            self._lasting = {}
            self._ending = {}
            self._by_hash = {}
            self._epoch += 1
            self._generation = generation

    async def touch(self) -> None:
        """Write when the tokens used since the last touch were used (now, near enough)."""
        if not self._used:
            return
        used, self._used = self._used, set()
        now_ms = math.floor(self._clock() * 1000)
        await self._store.touch_tokens(dict.fromkeys(used, now_ms))

    async def poll_forever(self) -> None:
        """Poll, and now and then touch, until cancelled; a failure is logged and retried."""
        polls = 0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            polls += 1
            try:
                await self.poll()
                if polls % TOUCH_EVERY_POLLS == 0:
                    await self.touch()
            except StoreError as error:  # the store is away: the next poll tries again
                log.warning("tokens_poll_failed", reason=safe_message(error))
            except Exception as error:  # a bug: said, with its traceback; polling goes on
                log.error("tokens_poll_failed", exc_info=error)


def _known(token: Token, secret_hash: str) -> _Known:
    grant = Grant(token.name, token.rules, token.admin)
    if secret_hash == token.secret_hash:
        return _Known(grant, token.expires_at, None)
    # The secret a rotation replaced (a rotation without grace keeps none: 0, long past).
    return _Known(grant, token.expires_at, token.previous_until or 0)


TOKENS_KEY = web.AppKey("tokens", Tokens)


async def tokens_context(app: web.Application) -> AsyncIterator[None]:
    """With KV_AUTH_TOKEN, the store's tokens: cached, polled while the server runs, and
    their last use written at the end."""
    tokens = app[TOKENS_KEY]
    await tokens.start(app[STORE_KEY])
    task = asyncio.ensure_future(tokens.poll_forever())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        await tokens.touch()
    except StoreError as error:
        log.warning("tokens_touch_failed", reason=safe_message(error))
