"""The image built from a context without an input.db: a build of its own, in a module of its
own, so that under pytest-xdist it runs beside test_docker.py's tests of the shared image
rather than after them (test_docker.py says what the tests need of the machine).
"""

from __future__ import annotations

from pathlib import Path

from .test_docker import (  # docker_engine: the same skip without an engine
    Container,
    build_image,
    containers,
    docker,
    docker_engine,
    make_context,
    start,
)

__all__ = ["containers", "docker_engine"]  # fixtures, used by name


def test_the_image_builds_and_starts_without_an_input_db(
    tmp_path: Path, containers: list[Container]
) -> None:
    tag = build_image(make_context(tmp_path / "context", None))
    try:
        container = start(containers, tag)
        assert container.request("GET", "/get/baked")[0] == 404
        assert "seed_not_found" in container.logs()
    finally:
        for started in containers:
            started.remove()
        docker("rmi", "-f", tag, check=False)
