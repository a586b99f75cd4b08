"""Debian's chromium, headless, driven by Playwright for Python: for the pages' tests.

Playwright's own browser download is not used (this machine reaches no such host); its
``executable_path`` points at the system's chromium instead. Without chromium, or without
Playwright, the tests skip; CI installs both and fails on any skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest

# Flags for a machine with no network beyond this one: no background services to call home.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


def chromium_path() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot_dir(default: Path) -> Path:
    """Where the tests save screenshots: KV_TEST_SCREENSHOTS if set, else ``default``."""
    directory = Path(os.environ.get("KV_TEST_SCREENSHOTS", default))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@dataclass
class Traffic:
    """What the page asked for and complained about."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


@contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[tuple[Any, Traffic]]:
    """A fresh page (its own context: no storage shared between tests) and its traffic."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    traffic = Traffic()
    with playwright_api.sync_playwright() as playwright:
        args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()

            def on_console(message: Any) -> None:
                if message.type == "error":
                    traffic.console_errors.append(message.text)

            page.on("request", lambda request: traffic.requests.append(request.url))
            page.on("console", on_console)
            page.on("pageerror", lambda error: traffic.console_errors.append(str(error)))
            yield page, traffic
        finally:
            browser.close()
