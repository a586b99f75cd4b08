"""The docs page (/docs) in a real headless browser: it renders every operation, "Try it out"
with the token from its Authorize button reads a seeded key, and nothing is fetched from
anywhere but the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mapmg_data_engineer_takehome.openapi import build_document

from ..e2e_support import Server, ServerPool, write_input_db
from .browser_support import browser_page, screenshot_dir

TOKEN = "docs-page-tok3n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    seed = write_input_db(tmp_path / "input.db", [("greeting", "hello from the seed")])
    pool = ServerPool(tmp_path / "e2e")
    try:
        yield pool.start(input_db=seed, env={"KV_AUTH_TOKEN": TOKEN})
    finally:
        pool.close()


def test_the_docs_page_works_offline_with_the_token(server: Server, tmp_path: Path) -> None:
    origin = f"http://127.0.0.1:{server.port}"
    operations = sum(len(methods) for methods in build_document()["paths"].values())
    with browser_page() as (page, traffic):
        page.goto(f"{origin}/docs")
        page.wait_for_selector(".opblock", timeout=20_000)
        assert page.locator(".opblock").count() == operations

        page.click("button.authorize")
        page.fill(".modal-ux input[type=text], .modal-ux input[type=password]", TOKEN)
        page.click(".modal-ux button.authorize")
        page.click(".modal-ux button.btn-done")

        operation = page.locator("#operations-default-get")
        operation.locator(".opblock-summary").click()
        try_it = operation.locator("button.try-out__btn")
        try_it.wait_for()
        if try_it.inner_text().strip() == "Try it out":  # docs.js opens the page with it on
            try_it.click()
        key = operation.locator("input[placeholder='key']:enabled")
        key.wait_for()
        key.fill("greeting")
        operation.locator("button.execute").click()
        answer = operation.locator(".live-responses-table .response-col_description pre")
        answer.first.wait_for(timeout=10_000)
        assert "hello from the seed" in answer.first.inner_text()
        status = operation.locator(".live-responses-table tr.response .response-col_status")
        assert status.first.inner_text().strip() == "200"

        # The operation from its title to the live answer (docs/api.md shows it).
        top = operation.bounding_box()
        bottom = operation.locator(".live-responses-table").first.bounding_box()
        assert top is not None and bottom is not None
        page.screenshot(
            path=str(screenshot_dir(tmp_path) / "docs.png"),
            full_page=True,
            clip={
                "x": top["x"],
                "y": top["y"],
                "width": top["width"],
                "height": bottom["y"] + bottom["height"] - top["y"],
            },
        )

    assert traffic.requests and all(url.startswith(origin) for url in traffic.requests), [
        url for url in traffic.requests if not url.startswith(origin)
    ]
    assert traffic.console_errors == []
