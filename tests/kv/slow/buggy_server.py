"""``python -m tests.kv.slow.buggy_server``: the real server, with bugs planted in its store.

Reading a key raises an exception whose message names the key; writing raises a KeyError of
the value; looking up a secret that no token has raises an exception naming its hash. Their
frames hold the key, the value and (in the middleware's) the token or secret.
"""

from __future__ import annotations

import sys

from mapmg_data_engineer_takehome.__main__ import main
from mapmg_data_engineer_takehome.store import SqliteStore
from mapmg_data_engineer_takehome.store.base import Token

token_by_hash = SqliteStore.token_by_hash


async def broken_get(self: SqliteStore, key: str) -> None:
    raise RuntimeError(f"a bug that names {key}")


async def broken_set(self: SqliteStore, key: str, val: str, *conditions: object) -> None:
    raise KeyError(val)


async def broken_token_by_hash(self: SqliteStore, secret_hash: str) -> Token:
    token = await token_by_hash(self, secret_hash)
    if token is None:
        raise RuntimeError(f"a bug that names {secret_hash}")
    return token


# At import, not under the __main__ guard: worker processes import this module too (as
# __mp_main__), and must have the same bugs.
setattr(SqliteStore, "get", broken_get)  # noqa: B010 (mypy refuses a method assignment)
setattr(SqliteStore, "set", broken_set)  # noqa: B010
setattr(SqliteStore, "token_by_hash", broken_token_by_hash)  # noqa: B010

if __name__ == "__main__":
    sys.exit(main())
