"""pytest's command-line options for this repository's own suite (tests/kv/).

They are declared here, at the top level, because pytest reads options only from conftest files
it loads before parsing the command line; tests/ is left to whoever copies tests into it.

Plain ``pytest`` runs the quick suite. ``pytest --run-slow`` adds the tests marked ``slow``:
real server processes, kill -9, slow clients, Docker builds, anything needing root.
"""

from __future__ import annotations

import pytest

# The template's python_files pattern, *test*.py, matches this very file (in `pytest .`).
collect_ignore = ["conftest.py"]


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
