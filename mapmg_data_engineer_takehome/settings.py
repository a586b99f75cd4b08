"""Settings: the one place a default lives.

Each setting comes, in falling priority, from a command-line flag, an environment variable
prefixed ``KV_``, an optional env file, and the default written here.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from dotenv import dotenv_values
from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KV_"
ENV_FILE_VARIABLE = "KV_ENV_FILE"

StoreKind = Literal["sqlite", "memory", "postgres"]
Durability = Literal["normal", "full"]
# How PostgreSQL is reached: directly (or through a pooler in session mode), or through a
# pooler in transaction mode (see store/postgres/store.py).
PostgresPooler = Literal["none", "transaction"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
# A time in seconds that must pass before something happens, and one that may be none at all.
Seconds = Annotated[float, Field(gt=0)]
Wait = Annotated[float, Field(ge=0)]
# A number of things (bytes, rows, connections) of which there must be one at least.
Count = Annotated[int, Field(ge=1)]


class Settings(BaseSettings):
    """Effective configuration of one server process."""

    # Annotations here are evaluated at runtime by pydantic, so they keep Python 3.9 syntax
    # (Optional, List) even though the module uses postponed evaluation.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # Unrelated variables in a shared env file are not ours to reject; misspelt KV_
        # names are caught by check_env_file.
        extra="ignore",
        frozen=True,
        case_sensitive=False,
        populate_by_name=True,
    )

    host: str = Field(
        default="localhost",
        description="Interface to listen on. 'localhost' means 127.0.0.1 and ::1 where the "
        "machine has it; '0.0.0.0' means every IPv4 interface.",
    )
    port: Annotated[int, Field(ge=1, le=65535)] = Field(
        default=8000,
        validation_alias=AliasChoices("KV_PORT", "PORT"),
        description="TCP port to listen on. Plain PORT is honoured when KV_PORT is unset.",
    )
    input_db: Optional[Path] = Field(
        default=None,
        description="SQLite file to seed from. Unset: ./input.db, else input.db beside the "
        "package; none found is a warning. A set path that does not exist is an error.",
    )
    store: StoreKind = Field(
        default="sqlite",
        description="Storage backend: 'sqlite' (durable, one file), 'memory' (lost on exit) or "
        "'postgres' (KV_POSTGRES_URL; any number of servers can share it).",
    )
    postgres_url: Optional[SecretStr] = Field(
        default=None,
        description="The PostgreSQL store's database, as a libpq URL "
        "(postgresql://user:password@host:5432/db). A secret: never logged or shown.",
    )
    postgres_pool_size: Annotated[Count, Field(le=1000)] = Field(
        default=10,
        description="Connections each server process keeps to PostgreSQL, at most.",
    )
    postgres_timeout: Seconds = Field(
        default=2.0,
        description="Seconds a request waits for PostgreSQL (a connection, then a query) "
        "before it is answered 503.",
    )
    postgres_pooler: PostgresPooler = Field(
        default="none",
        description="'transaction' when KV_POSTGRES_URL reaches PostgreSQL through a pooler in "
        "transaction mode (PgBouncer's pool_mode = transaction, most hosted poolers): no "
        "statement stays prepared, and other servers' writes are found by polling every "
        "0.2 s, or by LISTEN on KV_POSTGRES_LISTEN_URL. 'none' directly, or through a pooler "
        "in session mode.",
    )
    postgres_listen_url: Optional[SecretStr] = Field(
        default=None,
        description="A URL of the same database (and schema) that reaches PostgreSQL itself, "
        "not through a pooler in transaction mode, for the one connection per server that "
        "LISTENs for other servers' writes. By default KV_POSTGRES_URL, or none (polling) with "
        "KV_POSTGRES_POOLER=transaction. A secret: never logged or shown.",
    )
    postgres_startup_wait: Wait = Field(
        default=30.0,
        description="Seconds a starting server retries an unreachable or read-only PostgreSQL "
        "(with backoff, logging each attempt) before it exits with status 1.",
    )
    data_path: Path = Field(
        default=Path("data/kv.sqlite3"),
        description="Data file of the sqlite store; its directory is created if missing.",
    )
    durability: Durability = Field(
        default="normal",
        description="'normal': every acknowledged write survives a crash or kill of the "
        "server. 'full': it also survives power loss (fsync per commit, group commit).",
    )
    max_body_bytes: Annotated[int, Field(ge=64)] = Field(
        default=1024 * 1024,
        description="Largest request body accepted; larger bodies get 413.",
    )
    max_import_bytes: Annotated[int, Field(ge=64)] = Field(
        default=1024 * 1024 * 1024,
        description="Largest body of POST /import (streamed, never held whole); larger "
        "gets 413 and stores nothing.",
    )
    max_key_bytes: Count = Field(
        default=4096,
        description="Longest key, in bytes of UTF-8; longer keys get 422.",
    )
    max_value_bytes: Annotated[int, Field(ge=0)] = Field(
        default=1024 * 1024,
        description="Longest value, in bytes of UTF-8; longer values get 413. The body "
        "limit applies too.",
    )
    max_txn_ops: Count = Field(
        default=1000,
        description="Most compares of a POST /txn, and most operations in each of its "
        "branches; more get 422. The body limit applies too.",
    )
    client_timeout: Seconds = Field(
        default=30.0,
        description="Seconds a client may take to send a whole request (headers and body; "
        "an import's body may pause this long between reads), "
        "and may stay idle between requests; then its connection is closed.",
    )
    auth_token: Optional[SecretStr] = Field(
        default=None,
        description="If set, every route but /health needs 'Authorization: Bearer <token>'. "
        "Never logged or shown.",
    )
    access_log: bool = Field(
        default=False,
        description="Log one line per request (method, route, status, duration, request id).",
    )
    metrics: bool = Field(
        default=True,
        description="Serve Prometheus metrics at /metrics (recording them costs about 2% "
        "of the throughput).",
    )
    log_level: LogLevel = Field(default="info", description="Lowest level logged.")
    log_format: LogFormat = Field(
        default="auto",
        description="'json' lines, 'console' for people, or 'auto': console on a terminal, "
        "JSON otherwise.",
    )
    workers: Union[Literal["auto"], Annotated[int, Field(ge=1, le=256)]] = Field(
        default=1,
        description="Server processes sharing the port (SO_REUSEPORT) and the sqlite store; "
        "'auto' is one per core. The memory store allows only 1.",
    )
    purge_interval: Seconds = Field(
        default=1.0,
        description="Seconds between sweeps that delete the rows of expired keys. An expired "
        "key reads as absent at once either way; this bounds how long its row stays.",
    )
    changes_heartbeat: Annotated[Seconds, Field(le=3600)] = Field(
        default=15.0,
        description="Seconds an idle /changes stream (Server-Sent Events) waits before it "
        "writes a progress event: proxies keep the stream open, and the watcher's resume "
        "point moves forward. A stream whose watcher takes nothing of what waits for it for "
        "this long is closed.",
    )
    changes_retention: Seconds = Field(
        default=3600.0,
        description="Seconds the history of changes is kept; a watcher further behind is told "
        "to list again (410).",
    )
    changes_max: Count = Field(
        default=1_000_000,
        description="Changes the history keeps at most (the oldest go first).",
    )
    changes_backlog: Annotated[int, Field(ge=64 * 1024)] = Field(
        default=1024 * 1024,
        description="Bytes of a /changes stream that wait for a watcher to take them, at "
        "most: past it the stream waits for the watcher (one that takes nothing for "
        "KV_CHANGES_HEARTBEAT seconds is closed, and resumes from its last event id).",
    )
    shutdown_timeout: Wait = Field(
        default=5.0,
        description="Seconds SIGTERM waits for in-flight requests before closing the store.",
    )

    @model_validator(mode="after")
    def _auth_token_is_not_empty(self) -> Settings:
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError("KV_AUTH_TOKEN: an empty token would let anyone in; unset it instead")
        return self

    @model_validator(mode="after")
    def _postgres_store_has_a_url(self) -> Settings:
        if self.store == "postgres" and self.postgres_url is None:
            raise ValueError("KV_STORE=postgres needs KV_POSTGRES_URL, the database's URL")
        return self

    @model_validator(mode="after")
    def _memory_store_has_one_worker(self) -> Settings:
        if self.store == "memory" and self.worker_count > 1:
            raise ValueError(
                "KV_WORKERS: the memory store lives in one process and cannot be shared by "
                f"{self.worker_count} workers; use KV_STORE=sqlite or one worker"
            )
        return self

    @model_validator(mode="after")
    def _workers_can_share_a_port(self) -> Settings:
        if self.worker_count > 1 and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError(
                f"KV_WORKERS: {self.worker_count} workers share one port with SO_REUSEPORT, "
                "which this system does not have (Windows); use 1 worker"
            )
        return self

    @property
    def worker_count(self) -> int:
        """How many server processes to run: ``workers`` with 'auto' resolved."""
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)

    def public_view(self) -> dict[str, Any]:
        """Settings as JSON-ready values, for /config and the startup log."""
        # SecretStr dumps as "**********", so the token never leaves the process this way.
        view = self.model_dump(mode="json")
        view["auth_token"] = None if self.auth_token is None else "**********"
        view["postgres_url"] = None if self.postgres_url is None else "**********"
        view["postgres_listen_url"] = None if self.postgres_listen_url is None else "**********"
        return view


class SettingsError(Exception):
    """A setting has an invalid value; the message names the setting."""


def env_name(field_name: str) -> str:
    """The environment variable that sets ``field_name``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """The command-line flag that sets ``field_name``."""
    return "--" + field_name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """A parser with one flag per setting, generated so that --help can never drift."""
    parser = argparse.ArgumentParser(
        prog="python -m mapmg_data_engineer_takehome",
        description="A key-value store served as a REST API. Every flag can also be set "
        "with the environment variable shown; flags win.",
    )
    parser.add_argument(
        "--env-file",
        metavar="PATH",
        help=f"Read settings from this env file too [env: {ENV_FILE_VARIABLE}]",
    )
    for name, field in Settings.model_fields.items():
        default = field.default
        help_text = (
            f"{field.description} [env: {env_name(name)}; "
            f"default: {'unset' if default is None else default}]"
        ).replace("%", "%%")  # argparse formats help with %
        if field.annotation is bool:
            parser.add_argument(
                flag_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(name), dest=name, metavar=name.upper(), default=None, help=help_text
            )
    return parser


def load_settings(
    argv: Optional[Sequence[str]] = None, environ: Optional[dict[str, str]] = None
) -> Settings:
    """Parse flags, then build Settings from flags, environment and env file.

    Raises SettingsError naming the offending setting.
    """
    args = vars(build_parser().parse_args(argv))
    env_file = args.pop("env_file") or (environ or os.environ).get(ENV_FILE_VARIABLE)
    if env_file is not None and not Path(env_file).is_file():
        raise SettingsError(f"env file {env_file} does not exist")
    if env_file is not None:
        check_env_file(Path(env_file))
    # A field with aliases is passed by its first alias, which every pydantic-settings
    # version ranks above the environment.
    overrides = {_init_name(name): value for name, value in args.items() if value is not None}
    args_given = {name for name, value in args.items() if value is not None}
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg]
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error, set(args_given))) from None


def _init_name(field_name: str) -> str:
    alias = Settings.model_fields[field_name].validation_alias
    return str(alias.choices[0]) if isinstance(alias, AliasChoices) else field_name


def check_env_file(path: Path) -> None:
    """Reject KV_ names in an env file that match no setting: a typo must not pass silently."""
    known = {env_name(name) for name in Settings.model_fields}
    unknown = sorted(
        name
        for name in dotenv_values(path)
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    )
    if unknown:
        raise SettingsError(f"env file {path} sets unknown setting(s): {', '.join(unknown)}")


def describe_validation_error(error: ValidationError, from_flags: set[str]) -> str:
    """One line per invalid setting, naming the flag or environment variable it came from."""
    problems: dict[str, list[str]] = {}
    for problem in error.errors():
        message = str(problem["msg"]).removeprefix("Value error, ")
        if not problem["loc"]:  # a rule across settings; its message names them
            problems.setdefault("invalid settings", []).append(message)
            continue
        name = _field_of(str(problem["loc"][0]))
        if name in from_flags:
            source = flag_name(name)
        elif name == "port":
            source = "KV_PORT (or PORT)"
        else:
            source = env_name(name)
        # A union (KV_WORKERS: 'auto' or a number) reports once per alternative.
        problems.setdefault(f"invalid setting {source}", []).append(message)
    return "; ".join(f"{where}: {' or '.join(messages)}" for where, messages in problems.items())


def _field_of(location: str) -> str:
    """Map a pydantic error location (field name or alias) back to the field name."""
    lowered = location.lower()
    if lowered in Settings.model_fields:
        return lowered
    if (
        lowered.startswith(ENV_PREFIX.lower())
        and lowered[len(ENV_PREFIX) :] in Settings.model_fields
    ):
        return lowered[len(ENV_PREFIX) :]
    return lowered
