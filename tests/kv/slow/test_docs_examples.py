"""Every example in the README and in docs/*.md runs against a live server, so that none rots.

Each page (README.md, then docs/*.md in name order) gets a fresh server of its own: the sqlite
store in a temporary directory, an empty input.db, a free port. The page's fenced ``sh`` and
``python`` blocks run in page order, in one working directory (so a file one block writes, such
as backup.ndjson, is there for the next), with ``localhost:8000`` and ``127.0.0.1:8000``
rewritten to that server and ``KV_URL`` pointing at it for ``kv``. Where a page moves data to
``localhost:8001``, that is a second fresh server. Port 8000 itself is never used: a grader's own
server may be on it.

- A shell block runs in ``bash -e -o pipefail``. Its commands are its lines that are not
  comments, with their ``\\`` continuations. When the comment at the end of a command, or else
  the comment lines right under it, are a JSON object or array (or one a line, as NDJSON), they
  are what the command prints: its standard output must be that JSON, compared as data, where a
  documented timestamp (RFC 3339) stands for any timestamp, and a documented lease id (32
  hex digits, random) for any lease id. Any other comment is prose.
- A python block runs in this interpreter, in the same directory and environment.
- ``<!-- not run: REASON -->`` on the line before a block (blank lines between allowed) skips
  it: it installs, needs Docker or PostgreSQL, starts a server of its own on port 8000, runs
  pytest.
- ``<!-- runs until stopped: REASON -->`` marks a block whose last command follows the change
  feed until it is stopped (``curl -N``, ``kv watch``, a watch loop): it passes once the server
  counts a watcher and the block is still running, every command before the last done; then
  it is stopped.
- Every fenced block names its language; every sh or python block is run or marked, and a
  marker that is not right before such a block fails its page.
- ``<!-- server: KV_NAME=value ... -->``, a line of its own anywhere in a page, starts that
  page's servers with those settings too: docs/security.md's have a bootstrap admin token
  (``KV_AUTH_TOKEN``), which no flag of a block could give a server already running.

The server runs with a purge interval of an hour, so that no key expiring while a page runs
takes a revision the page's documented versions do not show, and a heartbeat of half a second,
so that a stopped stream leaves the server's count of watchers at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

from ..e2e_support import REPO, Server, ServerPool, write_input_db

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = frozenset({"sh", "bash", "shell"})
PYTHON = frozenset({"python", "py"})
NOT_RUN = "not run"
UNTIL_STOPPED = "runs until stopped"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(
    r"^\s*<!--\s*(?P<kind>not run|runs until stopped)\s*:\s*(?P<reason>\S.*?)\s*-->\s*$"
)
MARKER_LIKE = re.compile(r"<!--\s*(not run|runs until stopped)", re.IGNORECASE)
# A URL of this machine on the documented ports: 8000 is the server, 8001 a second one.
LOCAL_ADDRESS = re.compile(r"\b(localhost|127\.0\.0\.1|\[::1\]):(800[01])\b")
DOCUMENTED_PORT = re.compile(r"\b800[01]\b")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
# A revision (a version, an event id) as it really is: a life of a store begins at the clock
# in microseconds, so revisions have 16 digits, and which ones depends on when the page runs.
REVISION = re.compile(r"\b[1-9]\d{15}\b")
LEASE_ID = re.compile(r"[0-9a-f]{32}")
# A page's settings for its servers: <!-- server: KV_AUTH_TOKEN=x KV_STORE=memory -->.
SERVER_SETTINGS = re.compile(r"^<!--\s*server:\s*(?P<settings>(KV_[A-Z_]+=\S+\s+)+)-->$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ENDPOINTS_HEADER = "| Method and path | Success | Errors |"

BLOCK_TIMEOUT = 60.0  # seconds a block may take
WATCH_TIMEOUT = 30.0  # seconds a "runs until stopped" block has to become a watcher
QUIET_TIMEOUT = 40.0  # seconds the watchers of an earlier block have to leave (a long-poll: 30)
SERVER_ENV = {"KV_PURGE_INTERVAL": "3600", "KV_CHANGES_HEARTBEAT": "0.5"}


# --- reading the pages ------------------------------------------------------------------------


@dataclass
class Block:
    """A fenced code block of a page."""

    page: Path
    line: int  # of its opening fence, counting from 1
    language: str
    text: str
    marker: Optional[str] = None  # NOT_RUN, UNTIL_STOPPED or None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in SHELL or self.language in PYTHON


def read_blocks(page: Path) -> tuple[list[Block], list[str]]:
    """The page's fenced blocks, with their markers, and what is wrong with the page's
    markers and fences."""
    lines = page.read_text(encoding="utf-8").splitlines()
    name = page.relative_to(REPO)
    blocks: list[Block] = []
    problems: list[str] = []
    pending: Optional[tuple[int, re.Match[str]]] = None  # a marker waiting for its block
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        if fence is None:
            marker = MARKER.match(line)
            if marker is not None or MARKER_LIKE.search(line):
                if pending is not None:
                    problems.append(f"{name}:{pending[0]}: a marker without a block under it")
                pending = None
                if marker is None:
                    problems.append(
                        f"{name}:{index + 1}: a marker is a line of its own, with a reason: "
                        "<!-- not run: REASON --> or <!-- runs until stopped: REASON -->"
                    )
                else:
                    pending = (index + 1, marker)
            elif line.strip() and pending is not None:
                problems.append(f"{name}:{pending[0]}: a marker without a block under it")
                pending = None
            index += 1
            continue
        indent, chars = fence["indent"], fence["fence"]
        info = fence["info"].strip().strip("{}").lstrip(".").split()
        language = info[0].lower() if info else ""
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(chars) and set(closing) == {chars[0]}:
                break
            text = lines[end]
            body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
            end += 1
        else:
            problems.append(f"{name}:{index + 1}: a fence that is never closed")
        block = Block(page, index + 1, language, "\n".join(body))
        if not language:
            problems.append(
                f"{block.where}: a block without a language: name it (sh, python, yaml, text)"
            )
        if pending is not None:
            block.marker, block.reason = pending[1]["kind"], pending[1]["reason"]
            if not block.runnable:
                problems.append(f"{block.where}: a marker on a {language} block, never run")
            pending = None
        blocks.append(block)
        index = end + 1
    if pending is not None:
        problems.append(f"{name}:{pending[0]}: a marker without a block under it")
    return blocks, problems


@dataclass
class Expected:
    """What a command is documented to print: one JSON value, or one a line (NDJSON)."""

    values: list[Any]
    ndjson: bool


@dataclass
class Step:
    """One command of a shell block, and the comments that document it."""

    line: int  # in the page
    command: str
    trailing: Optional[str] = None  # the comment at the end of its last line
    following: list[str] = field(default_factory=list)  # the comment lines right under it

    @property
    def documentation(self) -> list[str]:
        """The comment that shows its output: the one at its end when that is JSON, else
        the lines under it."""
        if self.trailing is not None and expected_json([self.trailing]) is not None:
            return [self.trailing]
        return self.following

    @property
    def expected(self) -> Optional[Expected]:
        return expected_json(self.documentation)


def split_comment(line: str) -> tuple[str, Optional[str]]:
    """The line's code and its comment, as bash splits them: a ``#`` that starts a word,
    outside quotes."""
    quote: Optional[str] = None
    escaped = False
    for position, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char == "#" and (position == 0 or line[position - 1] in " \t"):
            return line[:position].rstrip(), line[position:]
    return line, None


def expected_json(comments: Sequence[str]) -> Optional[Expected]:
    """The JSON that comment lines show, or None when they are prose."""
    texts = [re.sub(r"^#\s?", "", comment.strip()) for comment in comments]
    if not texts:
        return None
    try:
        whole = json.loads("\n".join(texts))
    except ValueError:
        pass
    else:
        return Expected([whole], ndjson=False) if isinstance(whole, (dict, list)) else None
    values = []
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, (dict, list)):
            return None
        values.append(value)
    return Expected(values, ndjson=True)


def shell_steps(block: Block, text: str) -> list[Step]:
    """The commands of a shell block, each with the comments that follow it."""
    lines = text.split("\n")
    steps: list[Step] = []
    current: Optional[Step] = None  # the step whose comment lines may follow
    index = 0
    while index < len(lines):
        stripped = lines[index].strip()
        if not stripped:
            current = None
        elif stripped.startswith("#"):
            if current is not None:
                current.following.append(stripped)
        else:
            start = index
            while lines[index].rstrip().endswith("\\") and index + 1 < len(lines):
                index += 1
            code, trailing = split_comment(lines[index])
            command = "\n".join([*lines[start:index], code])
            current = Step(block.line + 1 + start, command, trailing)
            steps.append(current)
        index += 1
    return steps


def matches(expected: Any, actual: Any) -> bool:
    """Equal as JSON data; a documented timestamp matches any timestamp, a documented lease
    id any lease id, and a documented revision (16 digits, alone or in a string) any
    revision."""
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(expected[key], actual[key]) for key in expected)
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(one, other) for one, other in zip(expected, actual))
        )
    if isinstance(expected, str) and TIMESTAMP.fullmatch(expected):
        return isinstance(actual, str) and TIMESTAMP.fullmatch(actual) is not None
    if isinstance(expected, str) and LEASE_ID.fullmatch(expected):
        return isinstance(actual, str) and LEASE_ID.fullmatch(actual) is not None
    if isinstance(expected, int) and REVISION.fullmatch(str(expected)):
        return isinstance(actual, int) and REVISION.fullmatch(str(actual)) is not None
    if isinstance(expected, str) and REVISION.search(expected):
        pattern = REVISION.sub(r"\\d{16}", re.escape(expected).replace(r"\ ", " "))
        return isinstance(actual, str) and re.fullmatch(pattern, actual) is not None
    return type(expected) is type(actual) and bool(expected == actual)


def output_problem(expected: Expected, output: str) -> Optional[str]:
    """Why ``output`` is not what was documented, or None when it is."""
    try:
        if expected.ndjson:
            actual = [json.loads(line) for line in output.splitlines() if line.strip()]
        else:
            actual = [json.loads(output)]
    except ValueError:
        return "it prints something that is not JSON"
    if matches(expected.values, actual):
        return None
    return "it prints other JSON"


def endpoint_table(page: Path) -> str:
    """The page's table of endpoints, its links as if written from docs/."""
    text = page.read_text(encoding="utf-8")
    start = text.index(ENDPOINTS_HEADER)
    end = text.find("\n\n", start)
    return text[start : end if end != -1 else len(text)].replace("](docs/", "](")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings."""
    found = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            title = line.lstrip("#").strip().replace("`", "").lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


# --- running them -----------------------------------------------------------------------------


def tools(directory: Path) -> Path:
    """A directory for the front of PATH: ``python`` is this interpreter, ``kv`` the
    installed command (or, without one, the same entry point run by this interpreter)."""
    directory.mkdir(parents=True, exist_ok=True)
    installed = Path(sysconfig.get_path("scripts")) / "kv"
    python = shlex.quote(sys.executable)
    commands = {"python": f'exec {python} "$@"', "python3": f'exec {python} "$@"'}
    if installed.exists():
        commands["kv"] = f'exec {shlex.quote(str(installed))} "$@"'
    else:
        entry = "import sys; from mapmg_data_engineer_takehome.cli import main; sys.exit(main())"
        commands["kv"] = f'exec {python} -c {shlex.quote(entry)} "$@"'
    for name, command in commands.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{command}\n", encoding="utf-8")
        path.chmod(0o755)
    return directory


def run_group(
    args: Sequence[str], cwd: Path, env: dict[str, str], timeout: float
) -> tuple[Optional[int], str, str]:
    """Run a command in a process group of its own; its exit status (None when it ran out of
    time, and was killed with its children), standard output and standard error."""
    process = subprocess.Popen(
        list(args),
        cwd=str(cwd),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(process)
        out, err = process.communicate()
        return None, out.decode(errors="replace"), err.decode(errors="replace")
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group, then SIGKILL what is left of it."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
            return


def watchers(server: Server) -> float:
    """The watchers of /changes the server counts, streams and long-polls."""
    answer = server.request("GET", "/metrics")
    assert answer.status == 200, answer.body
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in answer.body.decode().splitlines()
        if line.startswith("kv_watchers{")
    )


def tail(text: str, lines: int = 30) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    " + line for line in kept) if kept else "    (nothing)"


class PageRun:
    """The blocks of one page, run in order against its servers."""

    def __init__(self, page: Path, root: Path, server: Server, second: Optional[Server]) -> None:
        self.page = page
        self.root = root
        self.server = server
        self.ports = {"8000": server.port, "8001": second.port if second else None}
        self.workdir = root / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            name: value
            for name, value in os.environ.items()
            if not name.upper().startswith("KV_") and name.upper() != "PORT"
        }
        bin_dir = tools(root / "bin")
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', os.defpath)}"
        self.env["KV_URL"] = f"http://127.0.0.1:{server.port}"
        self.env["NO_PROXY"] = self.env["no_proxy"] = "localhost,127.0.0.1,::1"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.problems: list[str] = []
        self.report: list[str] = []
        self.count = 0

    def rewrite(self, text: str) -> str:
        def local(match: re.Match[str]) -> str:
            port = self.ports[match[2]]
            assert port is not None, "no second server was started for this page"
            return f"{match[1]}:{port}"

        return LOCAL_ADDRESS.sub(local, text)

    def run(self, block: Block) -> None:
        if block.marker == NOT_RUN:
            self.report.append(f"{block.where}: not run ({block.reason})")
            return
        text = self.rewrite(block.text)
        if DOCUMENTED_PORT.search(text):
            self.problems.append(
                f"{block.where}: names port 8000 or 8001 other than as localhost:PORT, "
                "which the test cannot point at its server; write it so, or mark the block"
            )
            return
        self.count += 1
        directory = self.root / f"block-{self.count}"
        directory.mkdir()
        before = len(self.problems)
        if block.language in PYTHON:
            self.run_python(block, text, directory)
        else:
            self.run_shell(block, directory)
        outcome = "ran" if len(self.problems) == before else "FAILED"
        until = ", until stopped" if block.marker == UNTIL_STOPPED else ""
        self.report.append(f"{block.where}: {block.language}{until}: {outcome}")

    def run_python(self, block: Block, text: str, directory: Path) -> None:
        script = directory / "example.py"
        script.write_text(text + "\n", encoding="utf-8")
        args = [sys.executable, str(script)]
        if block.marker == UNTIL_STOPPED:
            self.run_until_stopped(block, args, directory, lambda: True)
            return
        status, out, err = run_group(args, self.workdir, self.env, BLOCK_TIMEOUT)
        if status != 0:
            self.problems.append(
                f"{block.where}: the python block "
                + (f"exits {status}" if status is not None else f"outlives {BLOCK_TIMEOUT} s")
                + f"\n  stdout:\n{tail(out)}\n  stderr:\n{tail(err)}"
            )

    def run_shell(self, block: Block, directory: Path) -> None:
        steps = shell_steps(block, block.text)
        if not steps:
            self.problems.append(f"{block.where}: a shell block without a command")
            return
        outputs = directory / "outputs"
        outputs.mkdir()
        done = directory / "done"
        script = "".join(
            f"{{\n{self.rewrite(step.command)}\n}} >{shlex.quote(str(outputs / str(number)))}\n"
            f"echo {number} >>{shlex.quote(str(done))}\n"
            for number, step in enumerate(steps)
        )
        (directory / "example.sh").write_text(script, encoding="utf-8")
        args = ["bash", "-e", "-o", "pipefail", str(directory / "example.sh")]

        def finished() -> int:
            return len(done.read_text().split()) if done.exists() else 0

        if block.marker == UNTIL_STOPPED:
            self.run_until_stopped(block, args, directory, lambda: finished() >= len(steps) - 1)
            err = ""
            status: Optional[int] = 0
        else:
            status, _, err = run_group(args, self.workdir, self.env, BLOCK_TIMEOUT)
        completed = finished()
        for number, step in enumerate(steps[:completed]):
            expected = step.expected
            if expected is None:
                continue
            output = (outputs / str(number)).read_text(encoding="utf-8", errors="replace")
            problem = output_problem(expected, output)
            if problem is not None:
                shown = "\n".join(step.documentation)
                self.problems.append(
                    f"{block.where}: line {step.line}, {problem} than documented:\n"
                    f"  {step.command}\n  documented:\n{tail(shown)}\n  printed:\n{tail(output)}"
                )
        if status != 0 and completed < len(steps):
            step = steps[completed]
            output = (outputs / str(completed)).read_text(encoding="utf-8", errors="replace")
            self.problems.append(
                f"{block.where}: line {step.line} "
                + (f"fails (bash exits {status})" if status is not None else "never ends")
                + f":\n  {step.command}\n  stdout:\n{tail(output)}\n  stderr:\n{tail(err)}"
            )

    def run_until_stopped(
        self,
        block: Block,
        args: Sequence[str],
        directory: Path,
        ready: Callable[[], bool],
    ) -> None:
        """Start the block; once the server counts a watcher and ``ready()`` (every command
        before the last done), it must still be running; then stop it."""
        deadline = time.monotonic() + QUIET_TIMEOUT
        while watchers(self.server) > 0:  # an earlier block's watcher, still leaving
            if time.monotonic() > deadline:
                self.problems.append(f"{block.where}: a watcher of an earlier block stays")
                return
            time.sleep(0.1)
        out_path, err_path = directory / "stdout", directory / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            process = subprocess.Popen(
                list(args),
                cwd=str(self.workdir),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + WATCH_TIMEOUT
            problem = None
            while True:
                if process.poll() is not None:
                    problem = f"ends by itself (exit status {process.returncode})"
                    break
                if ready() and watchers(self.server) > 0:
                    time.sleep(0.5)
                    if process.poll() is not None:
                        problem = f"ends by itself (exit status {process.returncode})"
                    break
                if time.monotonic() > deadline:
                    problem = f"is no watcher of the server after {WATCH_TIMEOUT} s"
                    break
                time.sleep(0.1)
        finally:
            stop_group(process)
        if problem is not None:
            self.problems.append(
                f"{block.where}: the block marked {UNTIL_STOPPED!r} {problem}\n"
                f"  stdout:\n{tail(out_path.read_text(errors='replace'))}\n"
                f"  stderr:\n{tail(err_path.read_text(errors='replace'))}"
            )


def server_settings(page: Path) -> dict[str, str]:
    """The settings the page asks its servers to have (SERVER_SETTINGS)."""
    settings: dict[str, str] = {}
    for line in page.read_text(encoding="utf-8").splitlines():
        match = SERVER_SETTINGS.match(line.strip())
        if match is not None:
            for word in match["settings"].split():
                name, value = word.split("=", 1)
                settings[name] = value
    return settings


@contextlib.contextmanager
def page_servers(
    root: Path, second: bool, settings: Optional[dict[str, str]] = None
) -> Iterator[tuple[Server, Optional[Server]]]:
    """A fresh server (and a second one) on free ports, each with its own data file, an
    empty input.db and ``settings``; killed on the way out."""
    root.mkdir(parents=True, exist_ok=True)
    input_db = write_input_db(root / "input.db", [])
    pools = [ServerPool(root / "server-8000")]
    if second:
        pools.append(ServerPool(root / "server-8001"))
    try:
        env = {**SERVER_ENV, **(settings or {})}
        started = [pool.start(input_db=input_db, env=env) for pool in pools]
        yield started[0], (started[1] if second else None)
    finally:
        for pool in pools:
            pool.close()


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_the_examples_of_the_page_run_as_documented(page: Path, tmp_path: Path) -> None:
    blocks, problems = read_blocks(page)
    assert not problems, "\n".join(problems)
    runnable = [block for block in blocks if block.runnable]
    if not any(block.marker != NOT_RUN for block in runnable):
        return  # nothing to run: no server needed
    for tool, package in (("bash", "bash"), ("curl", "curl")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: apt-get install {package})")
    second = any(
        match[2] == "8001"
        for block in runnable
        if block.marker != NOT_RUN
        for match in LOCAL_ADDRESS.finditer(block.text)
    )
    with page_servers(tmp_path / "servers", second, server_settings(page)) as (server, other):
        run = PageRun(page, tmp_path / "run", server, other)
        for block in runnable:
            run.run(block)
        if not server.running:
            run.problems.append("the server stopped while the page ran:\n" + server.describe())
    print("\n".join(run.report))
    assert not run.problems, "\n\n".join(run.problems)


def test_the_readme_lists_the_endpoints_of_the_api_page() -> None:
    """The README's table of endpoints is docs/api.md's, so that neither drifts."""
    assert endpoint_table(REPO / "README.md") == endpoint_table(REPO / "docs" / "api.md")


def test_the_links_between_the_pages_resolve() -> None:
    """Every relative link of the README and docs/ names a file that exists and, with an
    anchor, a heading of it."""
    broken = []
    for page in PAGES:
        in_fence = False
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if FENCE.match(line):
                in_fence = not in_fence
            if in_fence:
                continue
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # http:, https:, mailto:
                path, _, anchor = target.partition("#")
                linked = (page.parent / path).resolve() if path else page
                if not linked.exists():
                    broken.append(f"{page.relative_to(REPO)}:{number}: {target}: no such file")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{page.relative_to(REPO)}:{number}: {target}: no such heading")
    assert not broken, "\n".join(broken)
