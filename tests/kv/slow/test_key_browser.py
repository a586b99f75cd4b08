"""The key browser (/ui/) in Debian's chromium, headless, driven by Playwright: browsing by
prefix and page, reading, editing with If-Match and its conflicts, creating with a TTL,
deleting, keys that look like HTML, the token, and nothing fetched from elsewhere."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..e2e_support import Server, ServerPool, write_input_db
from .browser_support import Traffic, browser_page, screenshot_dir

XSS_KEY = "<img src=x onerror=alert(1)>"
SEEDED = [
    *((f"user:{n:03}/profile", json.dumps({"name": f"user {n}", "n": n})) for n in range(60)),
    ("config/feature", "on"),
    (XSS_KEY, "<script>alert(2)</script>"),
    ("odd/%?#\nkey 🔑", "a value\nwith lines"),
    ("big", "x" * 30_000),
]
TOKEN = "browser-tok3n"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    seed = write_input_db(tmp_path / "input.db", SEEDED)
    pool = ServerPool(tmp_path / "e2e")
    try:
        yield pool.start(input_db=seed)
    finally:
        pool.close()


def origin(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def set_from_another_client(server: Server, key: str, val: str, **headers: str) -> Any:
    body = json.dumps({"key": key, "val": val}).encode()
    return server.request("POST", "/set", body, {"Content-Type": "application/json", **headers})


# Chromium logs every non-2xx fetch as a console error; these are the API's answers that the
# flows provoke on purpose and the page handles (a conflict, an expired key, a wrong token, a
# refusal of a scoped token).
EXPECTED_ANSWERS = re.compile(r"^Failed to load resource: .* status of (401|403|404|412) ")


def assert_clean(server: Server, traffic: Traffic) -> None:
    assert traffic.requests, "the page made no request"
    outside = [url for url in traffic.requests if not url.startswith(origin(server))]
    assert outside == []
    errors = [error for error in traffic.console_errors if not EXPECTED_ANSWERS.match(error)]
    assert errors == []


def expect(locator: Any) -> Any:
    """Playwright's assertions, which wait; imported here, as Playwright may be missing."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def key_button(page: Any, key: str) -> Any:
    return page.locator("#keys button.key", has_text=key).first


def test_browse_read_edit_conflict_create_expire_delete(server: Server, tmp_path: Path) -> None:
    shots = screenshot_dir(tmp_path)
    with browser_page() as (page, traffic):
        page.on("dialog", lambda dialog: pytest.fail(f"a dialog opened: {dialog.message}"))
        page.goto(f"{origin(server)}/ui/")
        page.locator("#keys li").first.wait_for()
        assert page.locator("#keys li").count() == 50  # the first page of all keys
        assert page.locator("#more").is_visible()

        # The key that looks like HTML is text, and ran nothing.
        page.fill("#prefix", "<img")
        key_button(page, XSS_KEY).wait_for()
        assert key_button(page, XSS_KEY).inner_text() == XSS_KEY
        assert page.locator("img[src=x]").count() == 0
        key_button(page, XSS_KEY).click()
        expect(page.locator("#detail-key")).to_have_text(XSS_KEY)
        assert page.locator("#value").inner_text() == "<script>alert(2)</script>"

        # Find by prefix, page past the first page.
        page.fill("#prefix", "user:")
        expect(page.locator("#keys li").first).to_contain_text("user:000/profile")
        expect(page.locator("#keys li")).to_have_count(50)
        page.click("#more")
        expect(page.locator("#keys li")).to_have_count(60)
        assert page.locator("#more").is_hidden()

        # Narrow by a segment of a key.
        page.locator("#keys li", has_text="user:007/profile").locator(
            "button.segment"
        ).first.click()
        expect(page.locator("#prefix")).to_have_value("user:")

        expect(page.locator("#keys li")).to_have_count(50)

        # Open one: pretty JSON, raw on demand.
        key_button(page, "user:007/profile").click()
        expect(page.locator("#detail-key")).to_have_text("user:007/profile")
        assert '"name": "user 7"' in page.locator("#value").inner_text()
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "key-browser.png"))
        page.click("#raw-toggle")
        assert page.locator("#value").inner_text() == '{"name": "user 7", "n": 7}'
        version = page.locator("#detail-meta").inner_text()

        # Edit and save: a new version.
        page.fill("#edit-value", '{"name": "seven"}')
        page.click("#save")
        expect(page.locator("#status")).to_have_text(re.compile("^Saved user:007/profile: now"))
        assert page.locator("#detail-meta").inner_text() != version
        assert '"name": "seven"' in page.locator("#value").inner_text()
        stored = json.loads(server.request("GET", "/get/user:007%2Fprofile").body)
        assert stored["val"] == '{"name": "seven"}'

        # Someone else writes meanwhile: the save is refused, theirs is shown.
        set_from_another_client(server, "user:007/profile", "theirs")
        page.fill("#edit-value", "mine")
        page.click("#save")
        page.locator("#conflict").wait_for()
        assert page.locator("#conflict-value").inner_text() == "theirs"
        assert json.loads(server.request("GET", "/get/user:007%2Fprofile").body)["val"] == "theirs"
        page.screenshot(path=str(shots / "key-browser-conflict.png"))
        page.click("#overwrite")
        page.locator("#conflict").wait_for(state="hidden")
        assert json.loads(server.request("GET", "/get/user:007%2Fprofile").body)["val"] == "mine"

        # Create with a TTL and watch it expire.
        page.click("#new-key")
        page.fill("#create-key", "session:short")
        page.fill("#create-value", "soon gone")
        page.fill("#create-ttl", "2")
        page.click("#create-form button[type=submit]")
        expect(page.locator("#detail-key")).to_have_text("session:short")
        assert "expires" in page.locator("#detail-meta").inner_text()
        page.fill("#prefix", "session:")
        key_button(page, "session:short").wait_for()
        time.sleep(2.2)
        key_button(page, "session:short").click()
        expect(page.locator("#status")).to_contain_text("no value any more")
        expect(page.locator("#keys li")).to_have_count(0)

        # An expiry is shown in the edit form, kept by a save, and removed by emptying it.
        page.click("#new-key")
        page.fill("#create-key", "session:long")
        page.fill("#create-value", "v1")
        page.fill("#create-ttl", "3600")
        page.click("#create-form button[type=submit]")
        expect(page.locator("#detail-key")).to_have_text("session:long")
        assert 3590 <= float(page.locator("#edit-ttl").input_value()) <= 3600
        page.fill("#edit-value", "v2")
        page.click("#save")
        expect(page.locator("#status")).to_have_text(re.compile("^Saved session:long"))
        answer = server.request("GET", "/get/session:long")
        assert answer.json()["val"] == "v2"
        assert answer.headers["KV-Expires-At"] is not None
        page.fill("#edit-ttl", "")
        page.click("#save")
        expect(page.locator("#detail-meta")).to_contain_text("never expires")
        assert server.request("GET", "/get/session:long").headers["KV-Expires-At"] is None

        # Delete, after confirming.
        page.fill("#prefix", "config/")
        key_button(page, "config/feature").click()
        expect(page.locator("#detail-key")).to_have_text("config/feature")
        page.click("#delete")
        page.click("#confirm-yes")
        expect(page.locator("#status")).to_have_text(re.compile("^Deleted"))
        assert server.request("GET", "/get/config%2Ffeature").status == 404

        # Awkward keys round-trip through the page.
        page.fill("#prefix", "odd/")
        key_button(page, "odd/%?#").click()
        expect(page.locator("#detail-key")).to_have_text(re.compile("^odd/"))
        assert page.locator("#detail-key").inner_text() == "odd/%?#\nkey 🔑"

        # A long value is cut, with "Show all".
        page.fill("#prefix", "big")
        key_button(page, "big").click()
        page.locator("#show-all").wait_for()
        assert len(page.locator("#value").inner_text()) < 11_000
        page.click("#show-all")
        assert len(page.locator("#value").inner_text()) == 30_000
    assert_clean(server, traffic)


def test_a_narrow_screen(server: Server, tmp_path: Path) -> None:
    with browser_page(width=390, height=844) as (page, traffic):
        page.goto(f"{origin(server)}/ui/")
        page.locator("#keys li").first.wait_for()
        key_button(page, "big").scroll_into_view_if_needed()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width  # nothing wider than the screen
        page.screenshot(path=str(screenshot_dir(tmp_path) / "key-browser-390.png"))
    assert_clean(server, traffic)


def test_the_token_is_asked_for_once_and_a_wrong_one_is_said(tmp_path: Path) -> None:
    pool = ServerPool(tmp_path / "e2e")
    try:
        locked = pool.start(
            input_db=write_input_db(tmp_path / "input.db", [("secret:1", "v")]),
            env={"KV_AUTH_TOKEN": TOKEN},
        )
        with browser_page() as (page, traffic):
            page.goto(f"{origin(locked)}/ui/")
            page.locator("#token-dialog").wait_for()
            page.fill("#token-input", "wrong")
            page.click("#token-form button")
            expect(page.locator("#token-error")).to_contain_text("refused")
            page.fill("#token-input", TOKEN)
            page.click("#token-form button")
            key_button(page, "secret:1").wait_for()
            # Kept for the session: a reload does not ask again.
            page.reload()
            key_button(page, "secret:1").wait_for()
            assert page.locator("#token-dialog").is_hidden()
        # The wrong token's 401s are the expected answers, not page errors.
        traffic.console_errors = [error for error in traffic.console_errors if "401" not in error]
        assert_clean(locked, traffic)
    finally:
        pool.close()


def test_a_read_only_token_browses_its_prefix_and_every_refusal_is_shown(tmp_path: Path) -> None:
    """A token that may only read cfg/: the page says so, starts at cfg/, opens a key there;
    a save, a delete and a create are refused and each refusal is shown where it was tried; a
    listing outside cfg/ shows its refusal, not an empty list; and nothing changed."""
    pool = ServerPool(tmp_path / "e2e")
    try:
        locked = pool.start(
            input_db=write_input_db(
                tmp_path / "input.db", [("cfg/a", "1"), ("cfg/b", "2"), ("other/x", "3")]
            ),
            env={"KV_AUTH_TOKEN": TOKEN},
        )
        admin = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        body = {"name": "reader", "rules": [{"prefix": "cfg/", "access": "read"}]}
        created = locked.request("POST", "/tokens", json.dumps(body).encode(), admin)
        assert created.status == 200, created.body
        before = locked.request("GET", "/keys?prefix=cfg/", headers=admin).json()
        assert [item["key"] for item in before["items"]] == ["cfg/a", "cfg/b"]

        with browser_page() as (page, traffic):
            page.goto(f"{origin(locked)}/ui/")
            page.fill("#token-input", created.json()["secret"])
            page.click("#token-form button")
            expect(page.locator("#access")).to_have_text(
                "Token reader: read-only under cfg/. Anything else is refused."
            )
            expect(page.locator("#prefix")).to_have_value("cfg/")
            expect(page.locator("#keys li")).to_have_count(2)
            assert page.locator("#list-error").is_hidden()

            key_button(page, "cfg/a").click()
            expect(page.locator("#detail-key")).to_have_text("cfg/a")
            assert page.locator("#value").inner_text() == "1"
            assert page.locator("#read-only").is_visible()

            refused = 'This token may not write the key "cfg/a". Nothing was read or written.'
            page.fill("#edit-value", "changed")
            page.click("#save")
            expect(page.locator("#edit-error")).to_have_text(refused)
            expect(page.locator("#status")).to_have_text(refused)
            page.click("#delete")
            page.click("#confirm-yes")
            expect(page.locator("#confirm-delete")).to_be_hidden()
            expect(page.locator("#edit-error")).to_have_text(refused)

            page.click("#new-key")
            page.fill("#create-key", "cfg/new")
            page.click("#create-form button[type=submit]")
            expect(page.locator("#create-error")).to_have_text(
                'This token may not write the key "cfg/new". Nothing was read or written.'
            )

            page.fill("#prefix", "other/")
            expect(page.locator("#list-error")).to_have_text(
                'This token may not read the keys under "other/". Nothing was read or written.'
            )
            expect(page.locator("#keys li")).to_have_count(0)
            assert page.locator("#empty").is_hidden()  # not "No keys."
        assert_clean(locked, traffic)
        after = locked.request("GET", "/keys?prefix=cfg/", headers=admin).json()
        assert after == before  # same keys, same versions
        assert locked.request("GET", "/get/cfg%2Fa", headers=admin).json()["val"] == "1"
        assert locked.request("GET", "/get/cfg%2Fnew", headers=admin).status == 404
    finally:
        pool.close()


def test_a_browser_asking_for_html_at_the_root_is_sent_to_the_page(server: Server) -> None:
    answer = server.request("GET", "/", headers={"Accept": "text/html"})
    assert answer.status == 302 and answer.headers["Location"] == "/ui/"
    assert json.loads(server.request("GET", "/").body)["error"] == "not_found"
    page = server.request("GET", "/ui/")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    with browser_page() as (browser, traffic):
        browser.goto(origin(server))
        assert browser.url == f"{origin(server)}/ui/"
        browser.locator("#keys li").first.wait_for()
    assert_clean(server, traffic)


def test_keyboard_alone_finds_and_opens_a_key_and_every_control_is_labelled(
    server: Server,
) -> None:
    with browser_page() as (page, traffic):
        page.goto(f"{origin(server)}/ui/")
        page.locator("#keys li").first.wait_for()
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll("input, textarea, button")]
                .filter((control) => !(control.labels && control.labels.length)
                    && !control.textContent.trim() && !control.getAttribute("aria-label"))
                .map((control) => control.outerHTML)"""
        )
        assert unnamed == []
        page.focus("#prefix")
        page.keyboard.type("config/")
        expect(page.locator("#keys li")).to_have_count(1)
        # Tab from the search box, past the prefix crumbs, to the key; Enter opens it.
        for _ in range(10):
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.classList.contains('key')"):
                break
        page.keyboard.press("Enter")
        expect(page.locator("#detail-key")).to_have_text("config/feature")
        assert page.locator("#value").inner_text() == "on"
    assert_clean(server, traffic)


def test_the_live_switch_follows_changes_under_the_prefix_without_a_reload(
    tmp_path: Path,
) -> None:
    """Behind a token (the stream is fetched with it): keys written by another client appear
    in their place, changed ones update, deleted and expired ones go; a key under another
    prefix does not show; switched off, nothing more moves."""
    pool = ServerPool(tmp_path / "e2e")
    try:
        locked = pool.start(
            input_db=write_input_db(tmp_path / "input.db", SEEDED),
            env={"KV_AUTH_TOKEN": TOKEN, "KV_PURGE_INTERVAL": "0.2"},
        )
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with browser_page() as (page, traffic):
            page.goto(f"{origin(locked)}/ui/")
            page.fill("#token-input", TOKEN)
            page.click("#token-form button")
            page.fill("#prefix", "config/")
            expect(page.locator("#keys li")).to_have_count(1)
            page.check("#live")
            expect(page.locator("#status")).to_contain_text("Live: following changes")
            rows = page.locator("#keys li")

            assert set_from_another_client(locked, "config/zz-new", "1", **auth).status == 200
            expect(rows).to_have_count(2)
            expect(rows.nth(1)).to_contain_text("config/zz-new")
            assert set_from_another_client(locked, "config/a-first", "1", **auth).status == 200
            expect(rows.nth(0)).to_contain_text("config/a-first")  # in key order

            changed = set_from_another_client(locked, "config/feature", "off", **auth)
            version = changed.headers["ETag"].strip('"')
            expect(page.locator("#keys li", has_text="config/feature")).to_contain_text(
                f"version {version}"
            )
            assert locked.request("DELETE", "/delete/config%2Fzz-new", headers=auth).status == 200
            expect(key_button(page, "config/zz-new")).to_have_count(0)
            body = json.dumps({"key": "config/brief", "val": "1", "ttl": 0.5}).encode()
            locked.request("POST", "/set", body, {"Content-Type": "application/json", **auth})
            expect(key_button(page, "config/brief")).to_have_count(1)
            expect(key_button(page, "config/brief")).to_have_count(0, timeout=10_000)  # expired

            set_from_another_client(locked, "user:999/profile", "{}", **auth)
            page.uncheck("#live")
            set_from_another_client(locked, "config/after-off", "1", **auth)
            time.sleep(1.0)
            expect(rows).to_have_count(2)  # config/a-first, config/feature
            assert key_button(page, "user:999/profile").count() == 0
        assert_clean(locked, traffic)
    finally:
        pool.close()


# Started, not awaited: the promise is kept in the page, and read once the events are due.
EVENT_SOURCE = """(count) => { window.watching = new Promise((resolve) => {
    const source = new EventSource("/changes?since=0");
    const seen = [];
    for (const type of ["set", "delete"]) {
        source.addEventListener(type, (event) => {
            seen.push([type, event.lastEventId, JSON.parse(event.data).key]);
            if (seen.length === count) {
                source.close();
                resolve(seen);
            }
        });
    }
}); }"""


def event_ids(events: list[dict[str, Any]]) -> list[str]:
    """The id each event is streamed with: ``<revision>.<n>`` on the n-th of a revision's
    events, the bare revision on its last."""
    ids = []
    place = 0
    for index, event in enumerate(events):
        place += 1
        following = events[index + 1]["revision"] if index + 1 < len(events) else None
        if following == event["revision"]:
            ids.append(f"{event['revision']}.{place}")
        else:
            ids.append(str(event["revision"]))
            place = 0
    return ids


def test_a_browsers_event_source_follows_and_resumes_across_a_restart(tmp_path: Path) -> None:
    """A plain EventSource (a server without a token: it cannot send one) reads the events,
    each with the id of its place, and after the server restarts it reconnects by itself with
    Last-Event-ID: nothing missed, nothing twice."""
    pool = ServerPool(tmp_path / "e2e")
    try:
        first = pool.start()
        port = first.port
        body = json.dumps({"items": [{"key": "a", "val": "1"}, {"key": "b", "val": "2"}]})
        assert first.request("POST", "/mset", body.encode()).status == 200  # one revision
        with browser_page() as (page, traffic):
            page.goto(f"{origin(first)}/ui/")
            page.locator("#keys li").first.wait_for()
            page.evaluate(EVENT_SOURCE, 5)
            time.sleep(0.5)
            assert first.stop() == 0  # the stream ends; EventSource reconnects in 1 s
            second = pool.start(port=port)
            set_from_another_client(second, "c", "3")
            assert second.request("DELETE", "/delete/a").status == 200
            set_from_another_client(second, "d", "4")
            seen = page.evaluate("() => window.watching")
            history = second.request("GET", "/changes?since=0&timeout=0").json()["events"]
        assert [(event["type"], event["key"]) for event in history] == [
            ("set", "a"),
            ("set", "b"),
            ("set", "c"),
            ("delete", "a"),
            ("set", "d"),
        ]
        assert seen == [
            [event["type"], event_id, event["key"]]
            for event, event_id in zip(history, event_ids(history))
        ]
        assert seen[0][1].endswith(".1")  # the first of the batch's two
        # Reconnecting while the server was down was refused: that is the restart, not a fault.
        traffic.console_errors = [
            error for error in traffic.console_errors if "ERR_CONNECTION_REFUSED" not in error
        ]
        assert_clean(second, traffic)
    finally:
        pool.close()
