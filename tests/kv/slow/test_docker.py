"""The container image, built and run for real: what `docker build` and `docker run` users get.

Needs a Docker engine; skips without one (CI starts one and fails on any skip). Two variables
adapt it to a machine without a registry or a bridge network, as CI's is:
- KV_TEST_PYTHON_IMAGE: passed as ``--build-arg PYTHON_IMAGE=...``;
- KV_TEST_DOCKER_NETWORK=host: containers share the host's network and get KV_PORT instead
  of a published port.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from ..e2e_support import REPO, free_port, sha256_of, write_input_db
from ..postgres_support import PASSWORD, PostgresCluster

# What the Dockerfile needs from the build context; the rest is .dockerignored anyway.
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "setup.py", "README.md")
PACKAGE = "mapmg_data_engineer_takehome"
BUILD_TIMEOUT = 900
READY_TIMEOUT = 60.0
NETWORK = os.environ.get("KV_TEST_DOCKER_NETWORK")
BASE_IMAGE = os.environ.get("KV_TEST_PYTHON_IMAGE")


def docker(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=check
    )


def engine_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return docker("info", timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module", autouse=True)
def docker_engine() -> None:
    """Looked for when these tests run, never while collecting: `pytest` never waits on Docker."""
    if not engine_available():
        pytest.skip("no Docker engine reachable")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def build_image(context: Path) -> str:
    tag = unique("kv-test")
    command = ["build", "-t", tag]
    if NETWORK:
        command.append(f"--network={NETWORK}")
    if BASE_IMAGE:
        command += ["--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}"]
    result = docker(*command, str(context), timeout=BUILD_TIMEOUT, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tag


def make_context(directory: Path, input_db_rows: Optional[list[tuple[str, str]]]) -> Path:
    directory.mkdir()
    for name in CONTEXT_FILES:
        shutil.copy2(REPO / name, directory / name)
    shutil.copytree(
        REPO / PACKAGE, directory / PACKAGE, ignore=shutil.ignore_patterns("__pycache__")
    )
    if input_db_rows is not None:
        write_input_db(directory / "input.db", input_db_rows)
    return directory


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image built from a context with an input.db at its top level."""
    context = make_context(
        tmp_path_factory.mktemp("docker") / "context", [("baked", "from-the-image")]
    )
    tag = build_image(context)
    yield tag
    docker("rmi", "-f", tag, check=False)


@pytest.fixture
def volume() -> Iterator[str]:
    name = unique("kv-test-data")
    docker("volume", "create", name)
    yield name
    docker("volume", "rm", "-f", name, check=False)


class Container:
    """One running container of the image, reached over HTTP from the host."""

    def __init__(self, image: str, *run_args: str) -> None:
        self.port = free_port()
        network = (
            ["--network", NETWORK, "-e", f"KV_PORT={self.port}"]
            if NETWORK
            else ["-p", f"127.0.0.1:{self.port}:8000"]
        )
        self.name = unique("kv-test")
        docker("run", "-d", "--name", self.name, *network, *run_args, image)

    def request(self, method: str, path: str, body: Optional[dict[str, str]] = None) -> Any:
        """(status, JSON body) of one request."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=data, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            assert self.state()["Running"] or self.state()["Status"] == "created", self.logs()
            time.sleep(0.2)
        raise AssertionError("container never became ready:\n" + self.logs())

    def state(self) -> dict[str, Any]:
        output = docker("inspect", "--format", "{{json .State}}", self.name).stdout
        return json.loads(output)  # type: ignore[no-any-return]

    def logs(self) -> str:
        result = docker("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stop(self) -> float:
        """Seconds `docker stop` took (with Docker's default 10 s grace)."""
        started = time.monotonic()
        docker("stop", self.name, timeout=60)
        return time.monotonic() - started

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.remove()


def start(containers: list[Container], image: str, *run_args: str) -> Container:
    container = Container(image, *run_args)
    containers.append(container)
    container.wait_ready()
    return container


def test_serves_the_baked_seed_stops_cleanly_and_keeps_data_on_the_volume(
    image: str, volume: str, containers: list[Container]
) -> None:
    first = start(containers, image, "-v", f"{volume}:/data")
    assert first.request("GET", "/health") == (200, {"status": "ok", "store": "sqlite"})
    status, document = first.request("GET", "/openapi.json")  # the package's data is there
    assert status == 200 and document["openapi"].startswith("3.1")
    assert first.request("GET", "/get/baked") == (200, {"key": "baked", "val": "from-the-image"})
    written = {"key": "written", "val": "in the first container"}
    assert first.request("POST", "/set", written) == (200, written)
    assert first.request("GET", "/get/written") == (200, written)

    seconds = first.stop()
    state = first.state()
    assert state["ExitCode"] == 0, first.logs()
    assert seconds < 5, f"docker stop took {seconds:.1f} s"
    assert '"stopped"' in first.logs()

    second = start(containers, image, "-v", f"{volume}:/data")
    assert second.request("GET", "/get/written") == (200, written)
    assert second.request("GET", "/get/baked")[0] == 200


def test_a_mounted_input_db_takes_the_place_of_the_baked_one(
    image: str, containers: list[Container], tmp_path: Path
) -> None:
    mounted = write_input_db(tmp_path / "input.db", [("mounted", "from-the-host")])
    mounted.chmod(0o644)
    before = sha256_of(mounted)
    container = start(containers, image, "-v", f"{mounted}:/app/input.db:ro")
    assert container.request("GET", "/get/mounted") == (
        200,
        {"key": "mounted", "val": "from-the-host"},
    )
    assert container.request("GET", "/get/baked")[0] == 404
    container.stop()
    assert sha256_of(mounted) == before


def test_the_server_does_not_run_as_root(image: str, containers: list[Container]) -> None:
    container = start(containers, image)
    status = docker("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids and all(uid != "0" for uid in uids), status
    cmdline = docker("exec", container.name, "cat", "/proc/1/cmdline").stdout
    assert PACKAGE in cmdline  # the server itself is PID 1 and receives SIGTERM


def test_the_healthcheck_uses_what_the_image_has(image: str, containers: list[Container]) -> None:
    configured = json.loads(
        docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", image).stdout
    )
    assert f"{PACKAGE}.healthcheck" in " ".join(configured)
    container = start(containers, image)
    assert docker("exec", container.name, *configured[1:], check=False).returncode == 0
    container.stop()
    # Against a server that is not there, the same command reports unhealthy.
    probe = docker(
        "run", "--rm", "--network", NETWORK or "bridge", "-e", f"KV_PORT={free_port()}",
        image, *configured[1:], check=False,
    )  # fmt: skip
    assert probe.returncode != 0


def test_the_image_holds_no_build_tools_sources_or_caches(image: str) -> None:
    script = (
        "import os, shutil, sys; "
        "found = [p for p in ('/src', '/context', '/root/.cache/pip', '/app/tests', '/.git') "
        "if os.path.exists(p)]; "
        "found += [t for t in ('gcc', 'cc', 'make') if shutil.which(t)]; "
        "print(found); sys.exit(1 if found else 0)"
    )
    result = docker("run", "--rm", "--entrypoint", "python", image, "-c", script, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_serves_from_postgres(
    image: str, containers: list[Container], postgres_cluster: PostgresCluster
) -> None:
    """`docker run` of the image against a database: the driver is in the image."""
    if NETWORK != "host":
        pytest.skip("the test database is on this host's loopback: KV_TEST_DOCKER_NETWORK=host")
    url = postgres_cluster.url(postgres_cluster.create_database())
    container = start(containers, image, "-e", "KV_STORE=postgres", "-e", f"KV_POSTGRES_URL={url}")
    assert container.request("GET", "/health") == (200, {"status": "ok", "store": "postgres"})
    written = {"key": "in postgres", "val": "from a container"}
    assert container.request("POST", "/set", written) == (200, written)
    assert container.request("GET", "/get/in%20postgres") == (200, written)
    configured = json.loads(
        docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}", image).stdout
    )
    assert docker("exec", container.name, *configured[1:], check=False).returncode == 0
    assert container.stop() < 5
    assert PASSWORD not in container.logs()
