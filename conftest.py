"""pytest's command-line options for this repository's own suite (tests/kv/).

They are declared here, at the top level, because pytest reads options only from conftest files
it loads before parsing the command line; tests/ is left to whoever copies tests into it.

Plain ``pytest`` runs the quick suite. ``pytest --run-slow`` adds the tests marked ``slow``:
real server processes, kill -9, slow clients, Docker builds, anything needing root.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Optional

import pytest

# The template's python_files pattern, *test*.py, matches this very file (in `pytest .`).
collect_ignore = ["conftest.py"]
# Slow modules whose tests share one costly module-scoped set-up (the grader's virtualenv, a
# built image). Under pytest-xdist (`-n 4`) each goes to one worker, which builds the set-up
# once; every other test is a unit of its own, handed to whichever worker is free.
ONE_WORKER_MODULES = {"test_grader_flow.py", "test_docker.py"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (real processes, Docker, root); CI always does",
    )


@pytest.hookimpl(trylast=True)  # after tests/kv/conftest.py has marked its slow tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the slow tests unless --run-slow was given: shown as deselected, not skipped."""
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


# Optional: pytest knows this hook only when pytest-xdist (a dev extra) is installed.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Optional[Any]:
    """With ``-n`` and no ``--dist``: xdist's load balancing, but ONE_WORKER_MODULES whole.

    xdist's own ``--dist loadgroup`` would do it with a marker, but it renames test ids in a way
    pytest 9.2 no longer reads, and the grouping silently falls away.
    """
    if config.getoption("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if PurePosixPath(module).name in ONE_WORKER_MODULES else nodeid

    return OneWorkerModules(config, log)
