"""The kv command against real servers, run as a user types it (the installed script, in a
subprocess): every command's output and exit status, tokens, odd keys, a server that is down,
a watch across a kill -9 and restart, a pipe from a sqlite server into a PostgreSQL one, and
the progress bar that only a terminal gets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote

import httpx
import pytest

from ..e2e_support import Server, ServerPool, free_port
from ..postgres_support import PostgresCluster
from ..watch_support import client, poll, post, set_key

KV = str(Path(sys.executable).with_name("kv"))
TOKEN = "s3cret-token"
# Keys that a URL, a shell or a terminal treats specially: each must round-trip exactly.
ODD_KEYS = [
    "a/b/../c",
    "100% ?x=1&y=2 #top",
    "line\nbreak",
    "tab\there",
    "🔑 ключ",
    ".",
    "..",
    " spaced ",
    "-looks-like-a-flag",
    "quote'\"\\",
]
# Every status the epilog documents, as its line begins.
EXIT_STATUSES = ["0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "130 ", "141 "]
# Modules kv must not import: the server's, and httpx's own command line.
HEAVY_MODULES = {"aiohttp", "pydantic", "pydantic_settings", "structlog", "rich", "click"}


@dataclass
class Ran:
    """A finished kv: its exit status, stdout and stderr (UTF-8)."""

    status: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()


def environment(url: Optional[str], extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The tests' environment without any KV_* of the developer's, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("KV_")}
    if url is not None:
        env["KV_URL"] = url
    env.update(extra or {})
    return env


def url_of(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def kv(
    server: Optional[Server],
    *args: str,
    stdin: bytes = b"",
    env: Optional[Mapping[str, str]] = None,
    timeout: float = 30,
) -> Ran:
    """Run ``kv args`` against ``server`` (through KV_URL) and wait for it."""
    done = subprocess.run(
        [KV, *args],
        input=stdin,
        capture_output=True,
        env=environment(None if server is None else url_of(server), env),
        timeout=timeout,
    )
    return Ran(done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8"))


def assert_one_error_line(ran: Ran, status: int, *fragments: str) -> None:
    """kv failed with ``status`` and said so in exactly one line, starting "kv", with no
    output."""
    assert ran.status == status, ran
    assert len(ran.err_lines) == 1, ran.err
    assert ran.err.startswith("kv"), ran.err
    assert ran.err.endswith("\n")
    assert ran.out == ""
    for fragment in fragments:
        assert fragment in ran.err, ran.err


def mset(server: Server, items: list[dict[str, Any]]) -> int:
    """Write ``items`` in one /mset; their version."""
    answer = post(server, "/mset", {"items": items})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["version"])


def revision_of(server: Server) -> int:
    return int(poll(server, timeout=0).json()["next"])


def export_of(server: Server, prefix: str = "") -> bytes:
    answer = client().get(f"{url_of(server)}/export", params={"prefix": prefix})
    assert answer.status_code == 200, answer.text
    return answer.content


def events_since(server: Server, since: int) -> list[dict[str, Any]]:
    """Every event the server's history holds after ``since``."""
    events: list[dict[str, Any]] = []
    while True:
        answer = poll(server, since=since, timeout=0).json()
        events += answer["events"]
        since = answer["next"]
        if not answer["more"]:
            return events


@pytest.fixture
def server(servers: ServerPool) -> Server:
    return servers.start()


@pytest.fixture
def database(postgres_cluster: PostgresCluster) -> str:
    return postgres_cluster.url(postgres_cluster.create_database())


# --- get, set, delete ---------------------------------------------------------------------------


def test_set_get_and_delete_print_what_they_did(server: Server) -> None:
    ran = kv(server, "set", "greeting", "hello")
    assert ran == Ran(0, f"{revision_of(server)}\n", "")
    version = int(ran.out)
    assert kv(server, "get", "greeting") == Ran(0, "hello\n", "")
    got = json.loads(kv(server, "get", "greeting", "--json").out)
    assert got == {"key": "greeting", "val": "hello", "version": version, "expires_at": None}
    ran = kv(server, "set", "session", "ada", "--ttl", "3600")
    assert ran.status == 0
    expires = json.loads(kv(server, "get", "--json", "session").out)["expires_at"]
    assert expires.endswith("Z")
    assert expires == server.request("GET", "/get/session").headers["KV-Expires-At"]
    assert kv(server, "delete", "greeting") == Ran(0, "", "")
    assert_one_error_line(kv(server, "get", "greeting"), 1, "no value")
    assert_one_error_line(kv(server, "delete", "greeting"), 1)


def test_conditional_writes_exit_3_when_their_condition_fails(server: Server) -> None:
    version = int(kv(server, "set", "counter", "1").out)
    assert_one_error_line(kv(server, "set", "counter", "2", "--create"), 3)
    assert_one_error_line(kv(server, "set", "counter", "2", "--if-version", str(version + 9)), 3)
    assert_one_error_line(kv(server, "delete", "counter", "--if-version", str(version + 9)), 3)
    assert kv(server, "get", "counter").out == "1\n"  # none of them wrote
    ran = kv(server, "set", "counter", "2", "--if-version", str(version))
    assert ran.status == 0 and int(ran.out) > version
    assert kv(server, "set", "fresh", "v", "--create").status == 0
    assert kv(server, "delete", "counter", "--if-version", ran.out.strip()).status == 0
    assert kv(server, "get", "counter").status == 1


def test_usage_errors_and_refused_requests_exit_2_on_one_line(server: Server) -> None:
    for args in (
        [],
        ["get"],
        ["frobnicate"],
        ["set", "k", "v", "--ttl", "soon"],
        ["set", "k", "v", "--create", "--if-version", "3"],
        ["import", "no-such-file.ndjson"],
        ["--token-file", "no-such-token", "get", "k"],
        ["--url", "localhost:8000", "get", "k"],
    ):
        ran = kv(server, *args)
        assert ran.status == 2, (args, ran)
        assert len(ran.err_lines) == 1, (args, ran.err)
        assert ran.out == ""
    # Refused by the server as invalid: its own message, on one line.
    assert_one_error_line(kv(server, "set", "k", "v", "--ttl", "0"), 2, "ttl")
    assert_one_error_line(kv(server, "set", "", "v"), 2)
    assert_one_error_line(kv(server, "set", "k", "-", stdin=b"a\x00b"), 2)  # not storable
    assert_one_error_line(kv(server, "set", "k", "-", stdin=b"\xff\xfe"), 2, "UTF-8")
    assert kv(server, "get", "k").status == 1  # nothing was written


def test_values_round_trip_through_stdin_and_the_shell(server: Server) -> None:
    exact = "two lines\r\nand a trailing newline 🙂\n"
    assert kv(server, "set", "k", "-", stdin=exact.encode()).status == 0
    assert json.loads(kv(server, "get", "--json", "k").out)["val"] == exact
    assert kv(server, "get", "k").out == exact + "\n"
    assert kv(server, "set", "empty", "-", stdin=b"").status == 0
    assert kv(server, "get", "empty").out == "\n"
    assert kv(server, "set", "word", "hello world").status == 0
    shell = subprocess.run(
        ["bash", "-c", 'value="$("$KV" get word)"; printf "[%s]" "$value"'],
        capture_output=True,
        env=environment(url_of(server), {"KV": KV}),
        timeout=30,
    )
    assert shell.stdout == b"[hello world]", shell.stderr


def test_odd_keys_round_trip_exactly(server: Server) -> None:
    values = {key: f"value {number}" for number, key in enumerate(ODD_KEYS)}
    typed = ["-looks-like-a-flag", "line\nbreak", "🔑 ключ"]  # through argv
    mset(server, [{"key": key, "val": val} for key, val in values.items() if key not in typed])
    for key in typed:
        assert kv(server, "set", "--", key, values[key]).status == 0, key
        path = "/get/" + quote(key, safe="")
        assert server.request("GET", path).json() == {"key": key, "val": values[key]}
    for key, val in values.items():  # each in the URL of a GET
        got = json.loads(kv(server, "get", "--json", "--", key).out)
        assert (got["key"], got["val"]) == (key, val)
    listed = [json.loads(line) for line in kv(server, "ls", "--json", "--values").out.splitlines()]
    assert {entry["key"]: entry["val"] for entry in listed} == values
    for key in (".", "..", "a/b/../c"):  # what URL clients would rewrite
        assert kv(server, "delete", "--", key).status == 0
        del values[key]
    assert sorted(kv(server, "ls").out.split("\n"))[1:] == sorted(
        "\n".join(values).split("\n")
    )  # line output: a key with a newline spans two lines


# --- ls ---------------------------------------------------------------------------------------


def test_ls_lists_every_page_in_each_format(server: Server) -> None:
    items = [{"key": f"k/{number:05}", "val": f"v{number}"} for number in range(2500)]
    version = mset(server, items)
    assert post(server, "/set", {"key": "other", "val": "x\ny", "ttl": 3600}).status_code == 200
    keys = [item["key"] for item in items]
    assert kv(server, "ls", "k/").out.splitlines() == keys  # three pages of 1000
    assert kv(server, "ls").out.splitlines() == [*keys, "other"]
    long = kv(server, "ls", "--long", "k/0000").out.splitlines()
    assert long == [f"{version}\t-\tk/0000{digit}" for digit in range(10)]
    expires = server.request("GET", "/get/other").headers["KV-Expires-At"]
    other_version = revision_of(server)
    assert kv(server, "ls", "-l", "--values", "other").out == (
        f"{other_version}\t{expires}\tother\tx\ny\n"  # line output is for people
    )
    assert kv(server, "ls", "--values", "k/0000").out.splitlines()[:2] == [
        "k/00000\tv0",
        "k/00001\tv1",
    ]
    exact = [json.loads(line) for line in kv(server, "ls", "--json", "--values").out.splitlines()]
    assert exact[-1] == {"key": "other", "val": "x\ny", "version": other_version,
                         "expires_at": expires}  # fmt: skip
    assert exact[0] == {"key": "k/00000", "val": "v0", "version": version, "expires_at": None}
    assert len(exact) == 2501
    without_values = json.loads(kv(server, "ls", "--json", "k/").out.splitlines()[0])
    assert without_values == {"key": "k/00000", "val": None, "version": version,
                              "expires_at": None}  # fmt: skip


def test_ls_into_a_reader_that_leaves_exits_quietly(server: Server) -> None:
    """kv ls | head -1: the rest of the listing (more than a pipe holds) has no reader."""
    items = [{"key": f"k/{number:05}/" + "x" * 60, "val": "v"} for number in range(3000)]
    mset(server, items)
    shell = subprocess.run(
        ["bash", "-c", '"$KV" ls | head -1; echo "${PIPESTATUS[0]}" >&2'],
        capture_output=True,
        env=environment(url_of(server), {"KV": KV}),
        timeout=30,
    )
    assert shell.stdout.decode() == items[0]["key"] + "\n"
    assert shell.stderr.decode() == "141\n"  # kv's status, and nothing else on stderr


# --- tokens -----------------------------------------------------------------------------------


def test_a_token_from_a_file_or_kv_token_and_exit_5_without(
    servers: ServerPool, tmp_path: Path
) -> None:
    server = servers.start(env={"KV_AUTH_TOKEN": TOKEN})
    assert_one_error_line(kv(server, "set", "k", "v"), 5)
    assert_one_error_line(kv(server, "get", "k", env={"KV_TOKEN": "wrong"}), 5)
    assert kv(server, "set", "k", "v", env={"KV_TOKEN": TOKEN}).status == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as echo writes it
    assert kv(server, "--token-file", str(token_file), "get", "k") == Ran(0, "v\n", "")
    assert kv(server, "get", "k", "--token-file", str(token_file)).out == "v\n"
    # The file wins over the environment.
    assert kv(server, "--token-file", str(token_file), "get", "k", env={"KV_TOKEN": "x"}).out == (
        "v\n"
    )
    (tmp_path / "empty").write_text("\n")
    assert_one_error_line(kv(server, "--token-file", str(tmp_path / "empty"), "get", "k"), 2)
    health = kv(server, "health", env={"KV_TOKEN": TOKEN})
    assert json.loads(health.out)["status"] == "ok"


# --- kv token -----------------------------------------------------------------------------------


def test_kv_token_creates_lists_rotates_and_revokes_with_the_secret_alone_on_stdout(
    servers: ServerPool, tmp_path: Path
) -> None:
    server = servers.start(env={"KV_AUTH_TOKEN": TOKEN})
    admin = {"KV_TOKEN": TOKEN}
    created = kv(
        server,
        "token",
        "create",
        "ci",
        "--read",
        "cfg/",
        "--write",
        "ci/",
        "--read",
        "",
        "--expires",
        "30d",
        env=admin,
    )
    assert created.status == 0 and created.err == "", created
    secret = created.out.removesuffix("\n")
    assert created.out == secret + "\n" and secret.startswith("kv_") and len(secret) == 46
    assert kv(server, "token", "create", "ops", "--admin", env=admin).status == 0

    listed = kv(server, "token", "ls", env=admin)
    assert listed.status == 0 and listed.err == ""
    lines = [line.split("\t") for line in listed.out.splitlines()]
    assert [line[0] for line in lines] == ["ci", "ops"]
    ci, ops = lines
    assert ci[1] == "-" and ci[3] == "-" and ci[4] == "read:cfg/ readwrite:ci/ read:"
    assert ops[1:] == ["admin", "-", "-", "-"]
    as_json = [
        json.loads(line) for line in kv(server, "token", "ls", "--json", env=admin).out.splitlines()
    ]
    created_at = datetime.fromisoformat(as_json[0]["created_at"].replace("Z", "+00:00"))
    expires_at = datetime.fromisoformat(as_json[0]["expires_at"].replace("Z", "+00:00"))
    assert expires_at - created_at == timedelta(days=30) and ci[2] == as_json[0]["expires_at"]
    assert as_json[0]["rules"] == [
        {"prefix": "cfg/", "access": "read"},
        {"prefix": "ci/", "access": "readwrite"},
        {"prefix": "", "access": "read"},
    ]
    assert secret not in listed.out + json.dumps(as_json)

    # The secret, as `> ci.token` wrote it, is the token: its rules, and no more.
    (tmp_path / "ci.token").write_text(created.out)
    as_ci = ("--token-file", str(tmp_path / "ci.token"))
    assert kv(server, *as_ci, "set", "ci/run", "1").status == 0
    assert_one_error_line(kv(server, *as_ci, "set", "cfg/mode", "x"), 5, "cfg/mode")

    rotated = kv(server, "token", "rotate", "ci", "--grace", "1h", env=admin)
    assert rotated.status == 0 and rotated.err == ""
    assert rotated.out.startswith("kv_") and rotated.out.strip() != secret
    assert kv(server, *as_ci, "get", "ci/run").out == "1\n"  # the old secret, in its grace
    assert kv(server, "token", "revoke", "ci", env=admin) == Ran(0, "", "")
    names = kv(server, "token", "ls", env=admin).out.splitlines()
    assert [line.split("\t")[0] for line in names] == ["ops"]
    deadline = time.monotonic() + 1.5  # a revocation reaches every process within a second
    while kv(server, *as_ci, "get", "ci/run").status != 5:
        assert time.monotonic() < deadline, "the revoked token still works"


def test_kv_token_refusals_exit_as_documented_on_one_line(servers: ServerPool) -> None:
    server = servers.start(env={"KV_AUTH_TOKEN": TOKEN})
    admin = {"KV_TOKEN": TOKEN}
    assert kv(server, "token", "create", "ci", env=admin).status == 0
    assert_one_error_line(kv(server, "token", "create", "ci", env=admin), 3, "exists")
    for action in ("revoke", "rotate"):
        assert_one_error_line(kv(server, "token", action, "nobody", env=admin), 1, "nobody")
    assert_one_error_line(kv(server, "token", "create", "a b", env=admin), 2, "name")
    assert_one_error_line(kv(server, "token", "create", "x", "--expires", "3w"), 2, "3w")
    assert_one_error_line(kv(server, "token", "rotate", "ci", "--grace", "2d", env=admin), 2)
    assert_one_error_line(kv(server, "token", env=admin), 2)
    assert_one_error_line(kv(server, "token", "ls"), 5)
    open_server = servers.start()
    assert_one_error_line(kv(open_server, "token", "ls"), 5, "KV_AUTH_TOKEN")
    # Nothing was created by a refusal.
    assert kv(server, "token", "ls", env=admin).out.split("\t")[0] == "ci"


def test_a_server_that_is_down_is_exit_4_on_one_line(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    for args in (
        ["get", "k"],
        ["set", "k", "v"],
        ["set", "k", "v", "--create"],
        ["delete", "k"],
        ["ls"],
        ["health"],
        ["import", os.devnull],
        ["export", "-o", str(tmp_path / "backup.ndjson")],
    ):
        ran = kv(None, "--url", down, *args)
        assert_one_error_line(ran, 4, "cannot reach")
    assert not list(tmp_path.iterdir())  # a failed export leaves no file


def test_health_prints_the_servers_json(server: Server) -> None:
    ran = kv(server, "health")
    assert ran.status == 0 and ran.err == ""
    assert json.loads(ran.out) == client().get(f"{url_of(server)}/health").json()


# --- watch ------------------------------------------------------------------------------------


class Watch:
    """A running ``kv watch``; its stdout lines are collected as they come."""

    def __init__(self, server: Server, *args: str) -> None:
        self.process = subprocess.Popen(
            [KV, "watch", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment(url_of(server)),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.decode("utf-8"))

    def wait_for_lines(self, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            assert time.monotonic() < deadline, (count, self.lines)
            assert self.process.poll() is None, self.stop()
            time.sleep(0.02)
        return list(self.lines)

    def stop(self) -> tuple[int, str]:
        """Ctrl-C: its exit status and stderr."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=10)
        finally:
            self.process.kill()
        self._reader.join(timeout=5)
        return self.process.returncode, err.decode()


def test_watch_prints_each_change_as_it_comes(server: Server) -> None:
    since = set_key(server, "cfg/seed", "0")
    watch = Watch(server, "cfg/", "--since", str(since))
    try:
        first = set_key(server, "cfg/a", "1")
        set_key(server, "elsewhere", "x")
        assert server.request("DELETE", "/delete/cfg%2Fseed").status == 200
        lines = watch.wait_for_lines(2)
    finally:
        status, err = watch.stop()
    assert lines == [f"{first}\tset\tcfg/a\t1\n", f"{first + 2}\tdelete\tcfg/seed\n"]
    assert (status, err) == (130, "")  # Ctrl-C: quietly
    # From now on (no --since), in JSON.
    watch = Watch(server, "--json")
    written: dict[int, str] = {}
    try:
        while not watch.lines:  # writes before it has read where "now" is are not its
            assert len(written) < 50, "the watch printed nothing"
            val = f"v{len(written)}"
            written[set_key(server, "k", val)] = val
            time.sleep(0.2)
    finally:
        watch.stop()
    first = json.loads(watch.lines[0])
    assert first == {
        "revision": first["revision"], "type": "set", "key": "k",
        "val": written[first["revision"]], "expires_at": None,
    }  # fmt: skip
    # A revision the history does not hold.
    assert_one_error_line(kv(server, "watch", "--since", "999999"), 2, "revision")


def test_watch_prints_every_change_once_across_a_kill_9_and_restart(
    servers: ServerPool,
) -> None:
    server = servers.start()
    since = revision_of(server)
    watch = Watch(server, "--json", "--since", str(since))
    acknowledged: list[int] = []
    stop = threading.Event()

    def write_on() -> None:
        """Write through the kill and the restart; only what was answered is recorded."""
        number = 0
        while not stop.is_set():
            number += 1
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                acknowledged.append(set_key(server, f"during/{number}", str(number)))
            time.sleep(0.005)

    try:
        for number in range(20):
            acknowledged.append(set_key(server, f"before/{number}", str(number)))
        watch.wait_for_lines(20)
        writer = threading.Thread(target=write_on)
        writer.start()
        try:
            time.sleep(0.3)
            server.kill()
            server = servers.start(port=server.port)  # the same data file
            time.sleep(0.3)
        finally:
            stop.set()
            writer.join()
        for number in range(20):
            acknowledged.append(set_key(server, f"after/{number}", str(number)))
        expected = events_since(server, since)
        lines = watch.wait_for_lines(len(expected))
        time.sleep(0.2)  # nothing more comes
        assert watch.process.poll() is None
    finally:
        status, err = watch.stop()
    assert (status, err) == (130, "")
    assert [json.loads(line) for line in watch.lines] == expected  # each once, in order
    assert set(acknowledged) <= {event["revision"] for event in expected}
    assert sum(1 for line in lines if '"during/' in line) > 5  # writes went on meanwhile


# --- export and import ------------------------------------------------------------------------


def test_export_and_import_files_and_pipes(server: Server, tmp_path: Path) -> None:
    items = [{"key": f"user/{number}", "val": f"name {number}"} for number in range(50)]
    mset(server, [*items, {"key": "odd\n🔑", "val": "\n"}])
    ran = kv(server, "export")
    assert ran.status == 0 and ran.err == ""
    assert ran.out.encode() == export_of(server)
    backup = tmp_path / "backup.ndjson"
    ran = kv(server, "export", "user/", "-o", str(backup))
    assert ran == Ran(0, f"{revision_of(server)}\n", "")
    assert backup.read_bytes() == export_of(server, "user/")
    # Replace what is under user/ with the backup: the key added since goes.
    set_key(server, "user/new", "x")
    ran = kv(server, "import", "--replace", "--prefix", "user/", str(backup))
    assert ran.status == 0 and ran.err == ""
    result = json.loads(ran.out)
    assert result == {"imported": 50, "skipped": 0, "revision": revision_of(server)}
    assert kv(server, "get", "user/new").status == 1
    assert kv(server, "get", "odd\n🔑").out == "\n\n"  # outside the prefix: kept
    # From stdin; a bad line imports nothing.
    body = b'{"key":"piped","val":"1"}\n'
    assert json.loads(kv(server, "import", "-", stdin=body).out)["imported"] == 1
    bad = body.replace(b"piped", b"never") + b'{"key":"x"}\n'
    assert_one_error_line(kv(server, "import", "-", stdin=bad), 2, "Line 2")
    assert kv(server, "get", "never").status == 1


def test_an_export_that_fails_is_never_imported(server: Server) -> None:
    """kv export from a server that is down, piped into kv import --replace: the importer
    refuses the stream instead of emptying its store."""
    set_key(server, "precious", "keep me")
    down = f"http://127.0.0.1:{free_port()}"
    exporter = subprocess.Popen(
        [KV, "--url", down, "export"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(None),
    )
    assert exporter.stdout is not None
    importer = subprocess.run(
        [KV, "import", "--replace", "-"],
        stdin=exporter.stdout,
        capture_output=True,
        env=environment(url_of(server)),
        timeout=30,
    )
    exporter.stdout.close()
    _, export_err = exporter.communicate(timeout=30)
    assert exporter.returncode == 4 and len(export_err.splitlines()) == 1, export_err
    assert importer.returncode == 2, importer
    assert len(importer.stderr.splitlines()) == 1, importer.stderr
    assert kv(server, "get", "precious").out == "keep me\n"


def test_an_export_piped_from_sqlite_into_postgres_leaves_identical_exports(
    servers: ServerPool, database: str
) -> None:
    sqlite = servers.start()
    items: list[dict[str, Any]] = [
        {"key": f"k/{number:04}", "val": f"value {number}"} for number in range(3000)
    ]
    items += [{"key": key, "val": key * 3} for key in ODD_KEYS]
    items += [{"key": f"expiring/{n}", "val": "v", "ttl": 3600} for n in range(10)]
    mset(sqlite, items)
    postgres = servers.start(env={"KV_STORE": "postgres", "KV_POSTGRES_URL": database})
    shell = subprocess.run(
        ["bash", "-c", 'set -o pipefail; "$KV" --url "$A" export | "$KV" --url "$B" import -'],
        capture_output=True,
        env=environment(None, {"KV": KV, "A": url_of(sqlite), "B": url_of(postgres)}),
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert json.loads(shell.stdout)["imported"] == len(items)
    exports = [kv(source, "export") for source in (sqlite, postgres)]
    assert exports[0].status == exports[1].status == 0
    assert exports[0].out == exports[1].out
    assert exports[0].out.encode() == export_of(sqlite)


# --- progress bars ----------------------------------------------------------------------------


def run_on_a_terminal(args: Sequence[str], server: Server) -> tuple[int, bytes, bytes]:
    """Run kv with stderr on a pseudo-terminal: its status, stdout, and what the terminal
    showed."""
    controller, terminal = os.openpty()
    shown = bytearray()

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once kv has exited
            while chunk := os.read(controller, 65536):
                shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        done = subprocess.run(
            [KV, *args], stdout=subprocess.PIPE, stderr=terminal, env=environment(url_of(server)),
            timeout=60,
        )  # fmt: skip
    finally:
        os.close(terminal)
        reader.join(timeout=5)
        os.close(controller)
    return done.returncode, done.stdout, bytes(shown)


def test_a_progress_bar_only_when_stderr_is_a_terminal(server: Server, tmp_path: Path) -> None:
    items = [{"key": f"k/{number:05}", "val": "v" * 500} for number in range(1500)]
    mset(server, items)
    status, out, shown = run_on_a_terminal(["export"], server)
    assert status == 0 and out == export_of(server)
    # Redrawn in place, then the line ended (the terminal shows "\n" as "\r\n").
    assert shown.startswith(b"\rexport ") and shown.endswith(b" MiB\x1b[K\r\n"), shown
    backup = tmp_path / "backup.ndjson"
    backup.write_bytes(out)
    status, out, shown = run_on_a_terminal(["import", str(backup)], server)
    assert status == 0 and json.loads(out)["imported"] == 1500
    assert b"import [" in shown and b"100%" in shown, shown
    # Not a terminal: stderr stays empty.
    assert kv(server, "export", "-o", str(backup)).err == ""
    assert kv(server, "import", str(backup)).err == ""


# --- the command itself -----------------------------------------------------------------------


def test_help_documents_every_exit_status() -> None:
    ran = kv(None, "--help")
    assert ran.status == 0
    statuses = ran.out.split("exit status:")[1].splitlines()
    for status in EXIT_STATUSES:
        assert any(line.strip().startswith(status) for line in statuses), status
    for command in ("get", "set", "delete", "ls", "watch", "export", "import", "health"):
        assert kv(None, command, "--help").status == 0


def test_kv_imports_nothing_of_the_server_and_runs_as_a_module() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "mapmg_data_engineer_takehome.cli",
         "--url", down, "get", "k"],
        capture_output=True, env=environment(None), timeout=30,
    )  # fmt: skip
    assert done.returncode == 4
    lines = done.stderr.decode().splitlines()
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "httpx" in imported  # the measure works
    assert not {name.split(".")[0] for name in imported} & HEAVY_MODULES
    errors = [line for line in lines if not line.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("kv: cannot reach"), errors
