"""No log line of a real server process holds the token, a store token's secret or its hash,
a key or a value, whatever fails: bugs in handlers (JSON and console logs, one worker or two),
in the look-up of a secret, unparseable requests carrying the token, refusals, and a startup
that fails."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from mapmg_data_engineer_takehome.access import hash_secret, new_secret
from mapmg_data_engineer_takehome.store import SqliteStore
from mapmg_data_engineer_takehome.store.base import Token, TokenRule

from ..e2e_support import LOOPBACK_V4, REPO, Server, ServerPool, run_in_own_loop

TOKEN = "SuperSecretTok3n"
KEY = "patient:42-distinctive"
VAL = "value-of-a-distinctive-kind"
SECRETS = (TOKEN, KEY, VAL)
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


def output_of(server: Server) -> str:
    return server.stdout() + server.stderr()


def create_tokens(path: Path, *tokens: tuple[str, str, str]) -> None:
    """Tokens (name, secret, the prefix it may write) in the sqlite store at ``path``."""

    async def create() -> None:
        store = SqliteStore(path)
        try:
            for name, secret, prefix in tokens:
                rules = (TokenRule(prefix, "readwrite"),)
                token = Token(name, hash_secret(secret), rules, False, int(time.time() * 1000))
                await store.create_token(token)
        finally:
            await store.close()

    run_in_own_loop(create())


def send_raw(server: Server, data: bytes) -> bytes:
    with socket.create_connection((LOOPBACK_V4, server.port), timeout=5) as connection:
        connection.sendall(data)
        return connection.recv(65536)


@pytest.mark.parametrize(
    ("log_format", "workers"), [("json", "1"), ("console", "1"), ("json", "2")]
)
def test_bugs_in_a_real_process_log_no_token_key_or_value(
    servers: ServerPool, log_format: str, workers: str
) -> None:
    server = servers.start(
        module="tests.kv.slow.buggy_server",
        env={
            "PYTHONPATH": str(REPO),
            "KV_AUTH_TOKEN": TOKEN,
            "KV_LOG_FORMAT": log_format,
            "KV_WORKERS": workers,
            "KV_ACCESS_LOG": "true",
        },
    )
    scoped, narrow, unknown = new_secret(), new_secret(), new_secret()
    create_tokens(servers.data_path, ("scoped-one", scoped, ""), ("narrow-one", narrow, "x/"))
    for _ in range(int(workers) * 2):  # requests spread over the workers
        for secret in (TOKEN, scoped):
            headers = {"Authorization": f"Bearer {secret}"}
            assert server.request("GET", "/get/" + quote(KEY), headers=headers).status == 500
            body = json.dumps({"key": KEY, "val": VAL}).encode()
            assert server.request("POST", "/set", body, headers=headers).status == 500
        refused = server.request(
            "GET", "/get/" + quote(KEY), headers={"Authorization": f"Bearer {narrow}"}
        )
        assert refused.status == 403
        # The look-up of a secret no token has fails, naming its hash.
        failed = server.request("GET", "/get/k", headers={"Authorization": f"Bearer {unknown}"})
        assert failed.status == 500
    # Unparseable HTTP whose request line and headers carry all three.
    answer = send_raw(
        server,
        f"GET /get/{KEY}?{VAL} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n{VAL}\r\n\r\n".encode(),
    )
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert server.stop() == 0
    output = output_of(server)
    for secret in (*SECRETS, scoped, narrow, unknown):
        assert secret not in output
    for secret in (TOKEN, scoped, narrow, unknown):
        assert hash_secret(secret) not in output
    assert output.count("RuntimeError") >= 3 and "KeyError" in output
    assert "scoped-one" in output and "narrow-one" in output  # the access lines name them
    assert "bad_http_request" in output


def test_a_failed_start_logs_no_token(servers: ServerPool, tmp_path: Path) -> None:
    not_a_database = tmp_path / "input.db"
    not_a_database.write_text(f"{KEY} {VAL}")
    server = servers.spawn(input_db=not_a_database, env={"KV_AUTH_TOKEN": TOKEN})
    assert server.wait_exit() == 1
    output = output_of(server)
    assert str(not_a_database) in output
    assert TOKEN not in output
