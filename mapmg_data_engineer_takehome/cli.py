"""The kv command: the key-value service from a shell, over HTTP, through the Python client.

    kv set greeting hello                  # prints the new version
    kv get greeting                        # hello
    kv --url http://a:8000 export | kv --url http://b:8000 import -

Scripts call kv in loops, so it starts fast: at first this module imports argparse and little
else; the client (httpx) only once a command runs; the server's modules (aiohttp, pydantic,
structlog) never. ``bench/cli_start.py`` measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, Callable, NoReturn, Optional

if TYPE_CHECKING:
    import subprocess

    from .client import Client, Entry, Event, KVError, Token

DEFAULT_URL = "http://127.0.0.1:8000"

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_PRECONDITION = 3
EXIT_UNAVAILABLE = 4
EXIT_UNAUTHORIZED = 5
EXIT_LOCK_LOST = 6
EXIT_CANNOT_RUN = 126  # as a shell: COMMAND is there but cannot be run
EXIT_NO_COMMAND = 127  # as a shell: COMMAND was not found
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: what `yes | head` reports for yes

EPILOG = """\
environment:
  KV_URL     the server, when --url is not given (default http://127.0.0.1:8000)
  KV_TOKEN   the bearer token, when --token-file is not given (a token is never a
             flag's value: other users of the machine can read command lines)

output:
  Line output (get, ls, watch) is for people: a key or value holding a newline or a tab
  spans lines or columns, and $(kv get k) drops trailing newlines. --json is exact: one
  JSON object a line, in UTF-8.

exit status:
  0    done
  1    the key (kv token: the token) was not found
  2    usage: a wrong command line, a file that cannot be read or written, or a request
       the server refused as invalid (a bad --ttl, key or import line; a watch --since
       that the server's history does not hold)
  3    a precondition failed (--if-version, --create; a txn whose compares failed; kv
       token create: the name is taken)
  4    the server is unreachable, or unavailable (it answered 5xx)
  5    unauthorized: no token, or a wrong one; or forbidden: the token may not do this
  6    kv lock: the lock was lost while COMMAND ran, and COMMAND was sent SIGTERM
  126  kv lock: COMMAND cannot be run; 127: it was not found
       (otherwise kv lock exits with COMMAND's status, 128+N if signal N ended it)
  130  interrupted (Ctrl-C)
  141  stdout was closed by its reader (kv ls | head -1)
"""

# An export to stdout that fails ends with a line of this code, which no import accepts (it
# has no "key"): a pipe cannot carry an error, and `kv export | kv import --replace -` must
# not take a cut export, or an empty one from a server that was down, for a whole one.
EXPORT_FAILED = "export_incomplete"
# How often a progress bar is redrawn, at most: faster than the eye only costs writes.
PROGRESS_REDRAW = 0.1
PROGRESS_WIDTH = 30
MIB = 1 << 20


class UsageError(Exception):
    """A problem kv finds before asking the server: exit 2 with this message."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line as all of kv's are."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


# --- output -----------------------------------------------------------------------------------


def write_line(text: str, flush: bool = False) -> None:
    """``text`` and a newline on stdout, in UTF-8 whatever the locale says."""
    sys.stdout.buffer.write(text.encode("utf-8") + b"\n")
    if flush:
        sys.stdout.buffer.flush()


def json_line(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def report(message: str) -> None:
    """One line on stderr, whatever ``message`` holds."""
    sys.stderr.write(f"kv: {' '.join(message.splitlines())}\n")
    sys.stderr.flush()


def listing_line(entry: Entry, long: bool, values: bool) -> str:
    columns = []
    if long:
        columns += [str(entry.version), entry.to_json()["expires_at"] or "-"]
    columns.append(entry.key)
    if values:
        columns.append(entry.val or "")
    return "\t".join(columns)


def event_line(event: Event) -> str:
    columns = [str(event.revision), event.type, event.key]
    if event.type == "set":
        columns.append(event.val or "")
    return "\t".join(columns)


class ProgressBar:
    """Bytes moved so far, on one line of stderr redrawn in place; a bar when the total is
    known (an import from a file), a count when not (an export, an import from a pipe)."""

    def __init__(self, verb: str, total: Optional[int]) -> None:
        self.verb = verb
        self.total = total
        self.done = 0
        self.drawn_at: Optional[float] = None

    def __call__(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if self.drawn_at is None or now - self.drawn_at >= PROGRESS_REDRAW:
            self.drawn_at = now
            self.draw()

    def draw(self) -> None:
        done = f"{self.done / MIB:.1f}"
        if self.total:
            fraction = min(1.0, self.done / self.total)
            filled = round(fraction * PROGRESS_WIDTH)
            bar = "#" * filled + " " * (PROGRESS_WIDTH - filled)
            text = f"{self.verb} [{bar}] {fraction:4.0%} {done}/{self.total / MIB:.1f} MiB"
        else:
            text = f"{self.verb} {done} MiB"
        sys.stderr.write(f"\r{text}\x1b[K")  # \x1b[K: erase what a longer line left
        sys.stderr.flush()

    def finish(self) -> None:
        """Show the final count and end the line, so that what follows starts on its own."""
        if self.drawn_at is not None:
            self.draw()
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextlib.contextmanager
def progress_bar(verb: str, total: Optional[int]) -> Iterator[Optional[Callable[[int], None]]]:
    """A progress callback when stderr is a terminal; None otherwise (a log, a pipe)."""
    if not sys.stderr.isatty():
        yield None
        return
    bar = ProgressBar(verb, total)
    try:
        yield bar
    finally:
        bar.finish()


# --- the commands -----------------------------------------------------------------------------


def run_get(kv: Client, args: argparse.Namespace) -> None:
    entry = kv.get(args.key)
    write_line(json_line(entry.to_json()) if args.json else entry.val or "")


def run_set(kv: Client, args: argparse.Namespace) -> None:
    val = read_stdin() if args.value == "-" else args.value
    version = kv.set(args.key, val, ttl=args.ttl, if_version=args.if_version, create=args.create)
    write_line(str(version))


def read_stdin() -> str:
    """stdin's exact bytes as text: a trailing newline is part of the value."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"the value on stdin is not UTF-8 text ({error.reason})") from None


def run_delete(kv: Client, args: argparse.Namespace) -> None:
    kv.delete(args.key, if_version=args.if_version)


def run_ls(kv: Client, args: argparse.Namespace) -> None:
    for entry in kv.keys(args.prefix, values=args.values):
        write_line(
            json_line(entry.to_json()) if args.json else listing_line(entry, args.long, args.values)
        )


def token_line(token: Token) -> str:
    listed = token.to_json()
    rules = " ".join(f"{rule.access}:{rule.prefix}" for rule in token.rules)
    columns = [token.name, "admin" if token.admin else "-"]
    columns += [listed["expires_at"] or "-", listed["last_used_at"] or "-", rules or "-"]
    return "\t".join(columns)


def run_token_create(kv: Client, args: argparse.Namespace) -> None:
    token = kv.create_token(args.name, args.rules, admin=args.admin, expires_in=args.expires)
    write_line(token.secret or "")  # the secret alone, so that > FILE holds just it


def run_token_ls(kv: Client, args: argparse.Namespace) -> None:
    for token in kv.tokens():
        write_line(json_line(token.to_json()) if args.json else token_line(token))


def run_token_rotate(kv: Client, args: argparse.Namespace) -> None:
    write_line(kv.rotate_token(args.name, grace=args.grace).secret or "")


def run_token_revoke(kv: Client, args: argparse.Namespace) -> None:
    kv.revoke_token(args.name)


def run_watch(kv: Client, args: argparse.Namespace) -> None:
    for event in kv.watch(args.prefix, since=args.since):
        write_line(json_line(event.to_json()) if args.json else event_line(event), flush=True)


def run_export(kv: Client, args: argparse.Namespace) -> None:
    with progress_bar("export", None) as progress:
        if args.output in (None, "-"):
            export_to_stdout(kv, args.prefix, progress)
            return
        revision = export_to_file(kv, args.prefix, args.output, progress)
    write_line(str(revision))


def export_to_stdout(kv: Client, prefix: str, progress: Optional[Callable[[int], None]]) -> None:
    out = sys.stdout.buffer
    try:
        kv.export(out, prefix, progress=progress)
    except BrokenPipeError:
        raise  # nobody is reading: nothing to warn
    except BaseException as error:
        reason = str(error) or type(error).__name__  # Ctrl-C says nothing of itself
        failed = {"error": EXPORT_FAILED, "message": f"kv export failed: {reason}"}
        with contextlib.suppress(OSError):
            out.write(b"\n" + json_line(failed).encode("utf-8") + b"\n")
            out.flush()
        raise


def export_to_file(
    kv: Client, prefix: str, path: str, progress: Optional[Callable[[int], None]]
) -> int:
    """Export into a new file beside ``path``, renamed to it once whole: a failed export
    leaves no file that looks like one (and an earlier export at ``path`` stays)."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        handle, partial = tempfile.mkstemp(dir=directory, prefix=".kv-export-", suffix=".part")
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror}") from None
    try:
        with os.fdopen(handle, "wb") as out:
            revision = kv.export(out, prefix, progress=progress)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return revision


def run_import(kv: Client, args: argparse.Namespace) -> None:
    with open_source(args.file) as source, progress_bar("import", size_of(source)) as progress:
        result = kv.import_(source, replace=args.replace, prefix=args.prefix, progress=progress)
    write_line(
        json_line(
            {"imported": result.imported, "skipped": result.skipped, "revision": result.revision}
        )
    )


@contextlib.contextmanager
def open_source(path: str) -> Iterator[IO[bytes]]:
    """The file to import, or stdin for "-"."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        source = open(path, "rb")  # noqa: SIM115 (closed below; the open's error is ours)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None
    with source:
        yield source


def size_of(source: IO[bytes]) -> Optional[int]:
    """The bytes left in a regular file (stdin may be one: kv import - < backup.ndjson)."""
    try:
        info = os.fstat(source.fileno())
        if stat.S_ISREG(info.st_mode):
            return max(0, info.st_size - source.tell())
    except (OSError, ValueError):
        pass
    return None


def run_health(kv: Client, args: argparse.Namespace) -> None:
    write_line(json_line(kv.health()))


def run_txn(kv: Client, args: argparse.Namespace) -> int:
    text = read_stdin() if args.body == "-" else args.body
    try:
        body = json.loads(text)
    except ValueError as error:
        raise UsageError(f"the transaction is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise UsageError('the transaction is a JSON object: {"compare", "success", "failure"}')
    result = kv.txn(body.get("compare"), body.get("success"), body.get("failure"))
    write_line(json_line(vars(result)))
    return EXIT_OK if result.succeeded else EXIT_PRECONDITION


# The signals kv lock passes on to COMMAND, so that stopping kv stops COMMAND first and the
# lock is released only once COMMAND has ended. SIGINT is not among them: from a terminal,
# COMMAND gets it too, being in the same foreground process group.
FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def run_lock(kv: Client, args: argparse.Namespace) -> int:
    argv = args.command
    if not argv:
        raise UsageError("give the command to run: kv lock NAME -- COMMAND [ARG ...]")
    from .client import LockLost

    command = Command(argv)
    try:
        with kv.lock(args.name, ttl=args.ttl, on_lost=command.stop) as lock:
            return command.run(KV_LOCK_KEY=lock.key, KV_LOCK_TOKEN=str(lock.token))
    except LockLost as error:
        report(f"{error.message}: COMMAND was sent SIGTERM")
        return EXIT_LOCK_LOST


class Command:
    """The COMMAND of kv lock. ``stop`` comes from the lock's keep-alive thread, at any time:
    before COMMAND starts too, which then stops it as soon as it has started."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self.process is not None:
            self.process.terminate()

    def run(self, **env: str) -> int:
        """Run COMMAND to its end, passing FORWARDED signals on; its status as a shell
        gives it."""
        import subprocess

        try:
            self.process = subprocess.Popen(self.argv, env={**os.environ, **env})
        except FileNotFoundError:
            report(f"{self.argv[0]}: command not found")
            return EXIT_NO_COMMAND
        except PermissionError:
            report(f"{self.argv[0]}: permission denied")
            return EXIT_CANNOT_RUN
        if self.stopped:
            self.process.terminate()
        process = self.process
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        try:
            while True:
                try:
                    status = process.wait()
                    break
                except KeyboardInterrupt:
                    continue  # COMMAND got Ctrl-C too: the lock is held until it ends
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 128 - status if status < 0 else status

    def _forward(self, sig: int, frame: object) -> None:
        if self.process is not None:
            self.process.send_signal(sig)


# --- the command line -------------------------------------------------------------------------


KEY_HELP = "any string; after -- if it starts with -"
PREFIX_HELP = "only keys that start with it (default: every key)"


def seconds(text: str) -> float:
    """A number of seconds as typed: 60 is sent as 60, so that the server's messages
    quote what the user wrote rather than 60.0."""
    try:
        return int(text)
    except ValueError:
        return float(text)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """A time as typed: 30s, 15m, 12h, 30d, or a number of seconds."""
    unit = DURATION_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    try:
        return seconds(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is no duration: a number with s, m, h or d (30s, 15m, 12h, 30d)"
        ) from None


def add_connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--url", default=default, help=f"the server's URL (default: $KV_URL, else {DEFAULT_URL})"
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=default,
        help="read the bearer token from this file (default: $KV_TOKEN)",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="kv",
        description="Read, write, list, watch, export and import the keys of a kv server.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_options(parser, default=None)
    commands = parser.add_subparsers(metavar="COMMAND", required=True)

    def command(
        name: str,
        run: Optional[Callable[[Client, argparse.Namespace], Optional[int]]],
        summary: str,
        under: Any = commands,
    ) -> Parser:
        sub: Parser = under.add_parser(
            name,
            help=summary,
            description=summary,
            epilog="Exit status and environment: see kv --help.",
        )
        # Also after the command (kv get k --url ...); SUPPRESS keeps a value given before it.
        add_connection_options(sub, default=argparse.SUPPRESS)
        if run is not None:
            sub.set_defaults(run=run)
        return sub

    get = command("get", run_get, "Print a key's value and a newline.")
    get.add_argument("key", metavar="KEY", help=KEY_HELP)
    get.add_argument(
        "--json", action="store_true", help='print {"key", "val", "version", "expires_at"}'
    )

    set_ = command("set", run_set, "Write a key's value; print its new version.")
    set_.add_argument("key", metavar="KEY", help=KEY_HELP)
    set_.add_argument(
        "value", metavar="VALUE", help="the value; - reads stdin's exact bytes (UTF-8)"
    )
    set_.add_argument("--ttl", type=seconds, metavar="SECONDS", help="expire after this long")
    condition = set_.add_mutually_exclusive_group()
    condition.add_argument(
        "--if-version", type=int, metavar="V", help="only if the key is at version V"
    )
    condition.add_argument("--create", action="store_true", help="only if the key is absent")

    delete = command("delete", run_delete, "Delete a key.")
    delete.add_argument("key", metavar="KEY", help=KEY_HELP)
    delete.add_argument(
        "--if-version", type=int, metavar="V", help="only if the key is at version V"
    )

    ls = command("ls", run_ls, "List the keys under a prefix, one a line, in key order.")
    ls.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help=PREFIX_HELP)
    ls.add_argument(
        "--long", "-l", action="store_true", help="version, expiry (or -) and key, tab-separated"
    )
    ls.add_argument("--values", action="store_true", help="add each value after its key")
    ls.add_argument(
        "--json", action="store_true", help='one {"key", "val", "version", "expires_at"} a line'
    )

    watch = command("watch", run_watch, "Print each change under a prefix as it happens.")
    watch.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help=PREFIX_HELP)
    watch.add_argument(
        "--since", type=int, metavar="REV", help="the changes after revision REV (default: now)"
    )
    watch.add_argument(
        "--json",
        action="store_true",
        help='one {"revision", "type", "key"} (plus "val", "expires_at" for a set) a line',
    )
    watch.epilog = (
        "A line is revision, type (set, delete, expire), key and, for a set, value, "
        "tab-separated, printed as it comes. A watch resumes by itself after a lost connection "
        "or a server restart, right after the last change it printed (even inside a revision), "
        "missing nothing and repeating nothing; when the server's history does not hold that "
        "point, exit 2: list again. Exit status: see kv --help."
    )

    export = command("export", run_export, "Write every key under a prefix as NDJSON.")
    export.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help=PREFIX_HELP)
    export.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE (created whole, or not at all) and print the export's revision",
    )
    export.epilog = (
        "An export to stdout that fails ends with a line that kv import refuses, so that "
        "`kv export | kv import -` never imports a cut export. Exit status: see kv --help."
    )

    import_ = command("import", run_import, "Load NDJSON (an export) into the store.")
    import_.add_argument("file", metavar="FILE", help="the file, or - for stdin")
    import_.add_argument(
        "--replace", action="store_true", help="remove the keys (under --prefix) the file lacks"
    )
    import_.add_argument(
        "--prefix", default="", metavar="P", help="every line's key must start with P"
    )
    import_.epilog = (
        'All or nothing. Prints {"imported", "skipped", "revision"}. Exit status: see kv --help.'
    )

    command("health", run_health, "Print the server's /health answer.")

    txn = command("txn", run_txn, "Run one transaction (POST /txn); print its answer.")
    txn.add_argument(
        "body",
        metavar="JSON",
        help='{"compare": [...], "success": [...], "failure": [...]}; - reads stdin',
    )
    txn.epilog = (
        'Prints {"succeeded", "revision", "failed", "results"} as one JSON line; exits 3 when '
        "a compare failed (the failure branch ran). Exit status: see kv --help."
    )

    add_token_commands(command("token", None, "Manage access tokens (admin only)."), command)

    lock = command("lock", run_lock, "Run a command while holding a lock.")
    lock.add_argument("name", metavar="NAME", help="the lock: its owners are keys NAME/<lease>")
    lock.add_argument(
        "--ttl",
        type=seconds,
        default=10,
        metavar="SECONDS",
        help="the lease's time to live: a holder that dies frees the lock after it (default 10)",
    )
    # The words after "--" (see parse); without it, the words after NAME that are no option.
    lock.add_argument("command", nargs="*", metavar="-- COMMAND [ARG ...]")
    lock.epilog = (
        "Waits for the lock (in turn with other waiters), runs COMMAND with KV_LOCK_KEY and "
        "KV_LOCK_TOKEN (the fencing token) in its environment, and exits with COMMAND's "
        "status once it ends, releasing the lock. If the lock is lost (its lease could not "
        "be renewed within SECONDS), COMMAND is sent SIGTERM and kv exits 6. SIGTERM and "
        "SIGHUP sent to kv are passed on to COMMAND. Exit status: see kv --help."
    )
    return parser


def add_token_commands(token: Parser, command: Callable[..., Parser]) -> None:
    """kv token create, ls, rotate and revoke."""
    actions = token.add_subparsers(metavar="ACTION", required=True)
    token.epilog = (
        "A secret is printed once, alone on stdout: kv token create ci --read cfg/ > ci.token, "
        "then kv --token-file ci.token ... Exit status: see kv --help."
    )
    name_help = "the token's name: 1 to 64 of A-Z a-z 0-9 . _ -"
    create = command("create", run_token_create, "Create a token; print its secret.", actions)
    create.add_argument("name", metavar="NAME", help=name_help)
    # Both append to one list of rules, in the order given, as the token will list them.
    create.add_argument(
        "--read",
        dest="rules",
        action="append",
        default=[],
        type=lambda prefix: (prefix, "read"),
        metavar="PREFIX",
        help='it may read the keys under PREFIX ("" for every key); repeatable',
    )
    create.add_argument(
        "--write",
        dest="rules",
        action="append",
        type=lambda prefix: (prefix, "readwrite"),
        metavar="PREFIX",
        help="it may read and write the keys under PREFIX; repeatable",
    )
    create.add_argument(
        "--admin", action="store_true", help="it may manage tokens, /config and /metrics"
    )
    create.add_argument(
        "--expires", type=duration, metavar="DURATION", help="it stops after 30s, 15m, 12h, 30d"
    )

    ls = command("ls", run_token_ls, "List the tokens, one a line, by name.", actions)
    ls.add_argument(
        "--json",
        action="store_true",
        help='one {"name", "rules", "admin", "created_at", "expires_at", "last_used_at"} a line',
    )
    ls.epilog = (
        "A line is name, admin (or -), expiry, last use (each a time or -) and the rules "
        "as access:prefix separated by spaces, tab-separated. Never a secret."
    )

    rotate = command("rotate", run_token_rotate, "Give a token a new secret; print it.", actions)
    rotate.add_argument("name", metavar="NAME", help=name_help)
    rotate.add_argument(
        "--grace",
        type=duration,
        metavar="DURATION",
        help="the old secret keeps working this long (at most 1d; default: it stops now)",
    )

    revoke = command("revoke", run_token_revoke, "Revoke a token: it stops at once.", actions)
    revoke.add_argument("name", metavar="NAME", help=name_help)


def server_url(args: argparse.Namespace) -> str:
    url: str = args.url or os.environ.get("KV_URL") or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"the URL must start with http:// or https://, not {url!r}")
    return url


def bearer_token(args: argparse.Namespace) -> Optional[str]:
    if args.token_file is None:
        return os.environ.get("KV_TOKEN") or None
    try:
        with open(args.token_file, encoding="utf-8") as file:
            # A file written by echo or an editor ends with a newline; a token has no spaces.
            text = file.read().strip()
    except OSError as error:
        raise UsageError(
            f"cannot read the token file {args.token_file}: {error.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"the token file {args.token_file} is not UTF-8 text") from None
    if not text:
        raise UsageError(f"the token file {args.token_file} is empty")
    return text


def exit_status(error: KVError) -> int:
    from . import client

    statuses = (
        (client.KeyNotFound, EXIT_NOT_FOUND),
        (client.TokenNotFound, EXIT_NOT_FOUND),
        (client.PreconditionFailed, EXIT_PRECONDITION),
        (client.TokenExists, EXIT_PRECONDITION),
        (client.Unauthorized, EXIT_UNAUTHORIZED),
        (client.Forbidden, EXIT_UNAUTHORIZED),
        (client.InvalidRequest, EXIT_USAGE),
        (client.HistoryGone, EXIT_USAGE),
    )
    for kind, status in statuses:
        if isinstance(error, kind):
            return status
    return EXIT_UNAVAILABLE  # Unavailable, and anything newer: no answer to act on


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """The command line; for kv lock, every word after its first "--" is COMMAND's, whatever
    it looks like, and the words before are kv's (kv lock NAME --ttl 5 -- COMMAND). argparse
    alone cannot say so: its REMAINDER takes the options after NAME as COMMAND's too."""
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--" in words and command_of(words[: words.index("--")]) == "lock":
        cut = words.index("--")
        args = parser.parse_args(words[:cut])
        args.command = words[cut + 1 :]
        return args
    return parser.parse_args(words)


def command_of(words: Sequence[str]) -> Optional[str]:
    """The command among kv's first words: the first that is not an option or its value."""
    takes_a_value = {"--url", "--token-file"}
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in takes_a_value:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def run(argv: Optional[Sequence[str]]) -> int:
    args = parse(argv)
    try:
        url, token = server_url(args), bearer_token(args)
        skip_httpx_command_line()
        from .client import Client, KVError

        try:
            with Client(url, token=token) as kv:
                status = args.run(kv, args)
        except KVError as error:
            report(error.message)
            return exit_status(error)
        sys.stdout.flush()  # here, where a closed pipe is still ours to report
    except UsageError as error:
        report(str(error))
        return EXIT_USAGE
    except BrokenPipeError:
        raise
    except OSError as error:  # a local file or stream; the client's own are KVErrors
        report(f"{error.strerror or error}" + (f": {error.filename}" if error.filename else ""))
        return EXIT_USAGE
    except Exception as error:  # a bug: still one line, never a traceback
        report(f"unexpected error: {type(error).__name__}: {error}")
        return EXIT_UNAVAILABLE
    return EXIT_OK if status is None else status


def skip_httpx_command_line() -> None:
    """httpx imports its own command line (rich, click) whenever they are installed: work at
    every start of kv for nothing kv uses. Where that import fails, as it does without them,
    httpx defines a stub instead; so kv makes it fail. (test_cli.py checks that kv imports
    neither rich nor click.)"""
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run kv; the exit status is one of those EPILOG lists."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader left (kv ls | head -1). Point stdout at /dev/null so that the flush at
        # exit does not fail again, noisily.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
