"""Reaching PostgreSQL: one URL per host and the race between them, the check that a
connection reaches a primary, the failures a call may meet and their translation into the
store's errors, and the redaction that keeps a password out of every message.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import asyncpg
import structlog

from ...settings import PostgresPooler
from ..base import (
    StoreError,
    StoreUnavailable,
)

log = structlog.get_logger("kv.store")

# The settings that say how PostgreSQL is reached (see the package docstring).
POOLER_SETTING = "KV_POSTGRES_POOLER"

# SQLSTATE classes that mean "not now" rather than "a bug": connection exceptions,
# insufficient resources, operator intervention (a shutdown, a restart), system errors.
_UNAVAILABLE_CLASSES = ("08", "53", "57", "58")
# A write on a server in recovery (a standby) or in a read-only session: not the primary,
# which a failover may have moved; the next connection goes through the URL's hosts again.
_READ_ONLY_TRANSACTION = "25006"
# A prepared statement that is not on this server connection (invalid_sql_statement_name), or
# one of another client's already is (duplicate_prepared_statement): the session changed
# under the connection, as a pooler in transaction mode does.
LOST_STATEMENT = ("26000", "42P05")
# Whether a connection can write: a standby is in recovery; a primary may also be made
# read-only (default_transaction_read_only), as a failover manager does to fence it.
WRITABLE = "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"
_CHECK_PRIMARY = "SELECT kv_check_primary()"


def redacted_url(url: str) -> str:
    """``url`` with its password replaced, for messages: postgresql://kv:***@db:5432/kv.

    Cut at the last "@" rather than parsed: a password that was not percent-encoded (a "/"
    or "@" in it) must not slip through a parser's idea of where the host begins.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    credentials, _, location = rest.rpartition("@")
    user, has_password, _ = credentials.partition(":")
    return f"{scheme}://{user}{':***' if has_password else ''}@{location}"


def describe(error: BaseException) -> str:
    """What went wrong, in words that never hold the URL's password (asyncpg's messages
    name the host and port, and the server's quote the SQL, which holds no data)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    name = type(error).__name__
    return f"{name}: {detail}" if detail else name


def translate(error: BaseException) -> StoreError:
    if isinstance(error, asyncpg.PostgresError):
        state = getattr(error, "sqlstate", "") or ""
        if state == _READ_ONLY_TRANSACTION:
            return StoreUnavailable(f"PostgreSQL is read-only (a standby?): {describe(error)}")
        if state in LOST_STATEMENT:
            # The hint first, in words without a quote: a log line keeps a message only up to
            # its first quote (errors.safe_message), and asyncpg's quotes the statement's name.
            return StoreUnavailable(
                f"PostgreSQL: {type(error).__name__} (SQLSTATE {state}): a connection pooler in "
                f"transaction mode (PgBouncer with pool_mode = transaction) in between? Set "
                f"{POOLER_SETTING}=transaction. {describe(error)}"
            )
        if state[:2] not in _UNAVAILABLE_CLASSES:
            return StoreError(f"PostgreSQL: {describe(error)}")
    if isinstance(error, ReadOnly):
        return StoreUnavailable(f"PostgreSQL: {error}")
    return StoreUnavailable(f"PostgreSQL: {describe(error)}")


def answerable(error: Exception) -> StoreError:
    """What the requests waiting on a grouped call that failed are told: its StoreError, or
    for anything else (a bug, or a failure of asyncpg's that _use does not know) a 503 at once,
    rather than the timeout; the unknown is logged with its traceback."""
    if isinstance(error, StoreError):
        return error
    log.error("store_call_failed", exc_info=error)
    return StoreUnavailable(f"PostgreSQL: {describe(error)}")


def log_crash(task: asyncio.Future[Any]) -> None:
    """A background task of the store ended by an exception: a bug (its failures are the
    requests' to answer), logged with its traceback rather than left for asyncio to find."""
    if not task.cancelled() and task.exception() is not None:
        log.error("store_task_failed", exc_info=task.exception())


def retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as seen: for futures whose waiter has already
    answered (a 503 after the timeout), so that asyncio does not report it as lost."""
    if not future.cancelled():
        future.exception()


class ReadOnly(Exception):
    """The server reached cannot write: a standby, or a primary made read-only."""

    def __init__(self) -> None:
        super().__init__("the server is read-only (in recovery: a standby?)")


# What a failed call to PostgreSQL can raise besides its own errors: no host of the URL is
# what its target_session_attrs asks for; the connection's protocol is in a state it cannot
# use (asyncpg's InternalClientError, as when the server ended the session while it was
# idle); the server is not a primary.
FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
    asyncpg.exceptions.InternalClientError,
    ReadOnly,
)


class Connection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's connection, whose close ends it whatever the server does. The pool closes
    the connections expire_connections() outdated in tasks of its own that nobody awaits;
    on a server that hangs that close times out, asyncpg aborts the connection, and the
    error it raises would be one nobody retrieves."""

    async def close(self, *, timeout: Optional[float] = None) -> None:
        try:
            await super().close(timeout=timeout)
        except FAILURES:
            self.terminate()  # already aborted by asyncpg; this only makes sure


class PrimaryCheck:
    """The pool's check of each connection it makes (its ``init``), before any use: the
    server must be a primary, and once the schema is there, kv_check_primary also enters the
    store into the server's timeline. Every connection to a newly promoted standby is a new
    one, so nothing is written there before the revision has jumped past the old timeline's
    (see _CREATE_TIMELINES)."""

    def __init__(self) -> None:
        self.schema_ready = False

    async def __call__(self, conn: Any) -> None:
        await check_primary(conn, _CHECK_PRIMARY if self.schema_ready else WRITABLE)


async def check_primary(conn: Any, query: str = _CHECK_PRIMARY) -> None:
    if not await conn.fetchval(query):
        raise ReadOnly


def _host_urls(url: str) -> list[str]:
    """One URL per host of a multi-host URL (postgresql://u:p@a:5432,b:5432/kv?...), in its
    order; the URL alone when it names one host (or gives its hosts another way)."""
    scheme, separator, rest = url.partition("://")
    at = rest.rfind("@")  # the password may hold an unencoded "@"; hosts never do
    credentials, hosts_and_path = rest[: at + 1], rest[at + 1 :]
    end = len(hosts_and_path)
    for delimiter in "/?":
        found = hosts_and_path.find(delimiter)
        if found != -1:
            end = min(end, found)
    hosts, path = hosts_and_path[:end].split(","), hosts_and_path[end:]
    if not separator or len(hosts) < 2:
        return [url]
    return [f"{scheme}://{credentials}{host}{path}" for host in hosts]


async def connect_any_host(url: str, **options: Any) -> asyncpg.Connection:
    """The pool's connect: every host of the URL at once, each within the connect timeout,
    the first usable one taken (one that its target_session_attrs accepts). asyncpg's own
    tries them one after the other within one timeout for all, so an old primary that a
    partition made hang, listed first, would take every attempt's whole time, and the new
    primary after it would never be reached."""
    urls = _host_urls(url)
    if len(urls) == 1:
        return await asyncpg.connect(url, **options)
    attempts = [asyncio.ensure_future(asyncpg.connect(host, **options)) for host in urls]
    chosen: Optional[asyncio.Future[Any]] = None
    try:
        pending = set(attempts)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in attempts:  # in the URL's order, among those done together
                if attempt in done and not attempt.cancelled() and attempt.exception() is None:
                    chosen = attempt
                    return attempt.result()
        # None could be used: the first host's failure, as asyncpg would report it.
        raise next(error for error in map(_failure_of, attempts) if error is not None)
    finally:
        for attempt in attempts:
            if attempt is not chosen:
                attempt.cancel()
                attempt.add_done_callback(_close_unused)


def connect_options(pooler: PostgresPooler) -> dict[str, Any]:
    """asyncpg's options for every connection: behind a pooler in transaction mode, no
    statement is kept prepared past its own query."""
    return {"statement_cache_size": 0} if pooler == "transaction" else {}


def _failure_of(attempt: asyncio.Future[Any]) -> Optional[BaseException]:
    return asyncio.CancelledError() if attempt.cancelled() else attempt.exception()


def _close_unused(attempt: asyncio.Future[Any]) -> None:
    """A connection that lost the race (or that nobody waited for): closed at once."""
    if attempt.cancelled():
        return
    if attempt.exception() is None:
        attempt.result().terminate()
