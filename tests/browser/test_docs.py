"""The API reference in headless Chromium, against the real stack through Nginx.

/docs/ is Swagger UI over docs/openapi.yaml: a tester logs in with "Try it out"
(or pastes a token into "Authorize") and then calls any endpoint, here
``GET /v1/me``. /docs/events is the AsyncAPI component over docs/asyncapi.yaml:
its frames and topics are on the page. Every request the browser makes is
recorded: none may leave the stack's origin (no CDN, no fonts, no validator).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from helper.stack import Stack
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support import User, unique_name

PASSWORD = "correct horse battery"
# The AsyncAPI bundle is 3 MB of JavaScript that parses the document in the page:
# give a loaded 2-core machine time (a passing test does not wait for it).
TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def docs_page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh page that records every request leaving the stack's origin and every uncaught JavaScript error."""
    # Wide enough for the AsyncAPI page to show its sidebar next to the content.
    ctx = browser.new_context(viewport={"width": 1600, "height": 900})
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    outside: list[str] = []
    errors: list[str] = []

    def on_request(url: str) -> None:
        if not url.startswith((stack.base_url + "/", "data:", "blob:")):
            outside.append(url)

    page.on("request", lambda r: on_request(r.url))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    ctx.close()
    assert not outside, f"the page fetched from outside the stack: {outside}"
    assert not errors, f"JavaScript errors in the page: {errors}"


def operation(page: Page, tag: str, operation_id: str) -> Locator:
    """An operation of Swagger UI, expanded, in "Try it out" mode."""
    block = page.locator(f"#operations-{tag}-{operation_id}")
    # Expanding sets the address's #fragment (a deep link): nothing to wait for.
    block.locator(".opblock-control-arrow").click(no_wait_after=True)
    block.locator(".try-out__btn").click()
    return block


def execute(block: Locator) -> dict[str, object]:
    """Press Execute; wait for the live response; return its status and JSON body."""
    block.locator("button.execute").click()
    row = block.locator(".live-responses-table tr.response")
    expect(row).to_be_visible(timeout=TIMEOUT_MS)
    status = row.locator(".response-col_status").inner_text().strip()
    body = row.locator(".response-col_description pre.microlight").first.inner_text()
    return {"status": status, "body": json.loads(body)}


def test_try_it_out_logs_in_then_calls_get_me(docs_page: Page, stack: Stack) -> None:
    username = unique_name("d")
    account = {"username": username, "password": PASSWORD, "name": "Dora"}
    r = requests.post(stack.base_url + "/v1/auth/signup", json=account, timeout=30)
    assert r.status_code == 201, r.text
    page = docs_page
    page.goto(stack.base_url + "/docs/")

    login = operation(page, "accounts", "login")
    login.locator("textarea.body-param__text").fill(
        json.dumps({"username": username, "password": PASSWORD, "device_type": "web"})
    )
    answer = execute(login)
    assert answer["status"] == "200"
    assert isinstance(answer["body"], dict) and answer["body"]["access_token"]
    # The page took the token: the Authorize button shows the closed lock.
    expect(page.locator(".auth-wrapper .btn.authorize")).to_have_class("btn authorize locked")

    answer = execute(operation(page, "profiles", "getMe"))
    assert answer == {"status": "200", "body": {"user_id": r.json()["user_id"], "username": username, "name": "Dora"}}


def test_a_pasted_token_authorizes_the_calls(docs_page: Page, stack: Stack, user: User) -> None:
    page = docs_page
    page.goto(stack.base_url + "/docs/")
    me = operation(page, "profiles", "getMe")
    assert execute(me)["status"] == "401"

    page.locator(".auth-wrapper .btn.authorize").click()
    page.fill("#auth-bearer-value", user.access_token)
    page.get_by_role("button", name="Apply credentials").click()
    page.locator(".auth-btn-wrapper .btn-done").click()

    me.locator("button.btn-clear").click()
    answer = execute(me)
    assert answer["status"] == "200"
    assert isinstance(answer["body"], dict) and answer["body"]["username"] == user.username


def test_events_page_shows_the_frames_and_the_topics(docs_page: Page, stack: Stack) -> None:
    page = docs_page
    page.goto(stack.base_url + "/docs/events")

    ack = page.locator("[id='message-server.ack']")
    expect(ack).to_be_visible(timeout=TIMEOUT_MS)
    expect(ack).to_contain_text("ack (server → client)")
    expect(ack).to_contain_text("durably stored")
    expect(page.locator("[id='message-client.message']")).to_contain_text("message (client → server)")

    topic = page.locator("[id='operation-send-publish.group.changes.v1']")
    expect(topic).to_contain_text("group.changes.v1")
    expect(topic).to_contain_text("compacted")
    expect(topic).to_contain_text("group.changed (GroupChanged)")

    # The sidebar leads to a message.
    page.locator("a[href='#message-server.ack']").first.click()
    expect(page).to_have_url(stack.base_url + "/docs/events#message-server.ack")
