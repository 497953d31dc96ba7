"""The www test page in headless Chromium (Debian's /usr/bin/chromium), against the real stack.

Each test drives one or two browser contexts (two contexts = two users, each
with its own sessionStorage) through Nginx at ``stack.base_url + "/"``, the way
a tester would. Screenshots of the main screens land in docs/screenshots/.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from helper.stack import Stack
from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support import Api, User, new_user, unique_name

PASSWORD = "correct horse battery"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
GATEWAYS = ("gateway-1", "gateway-2")

# Signing up hashes a password and a first socket waits for its initial sync:
# give the page more than Playwright's default 5 s on a loaded 2-core machine.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def open_page(browser: Browser, stack: Stack) -> Iterator[Callable[[], Page]]:
    """A factory of pages, each in its own context (its own sessionStorage: its own user)."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def make() -> Page:
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(ctx)
        page = ctx.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(stack.base_url + "/")
        return page

    yield make
    for ctx in contexts:
        ctx.close()
    # An uncaught exception in the page's JavaScript is a bug even if the UI looked right.
    assert not errors, f"JavaScript errors in the page: {errors}"


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))


def sign_up(page: Page, name: str | None = None) -> str:
    """Sign up a fresh user through the page (web device) and wait for the socket."""
    username = unique_name("w")
    page.click("#auth-tab-signup")
    page.fill("#auth-username", username)
    page.fill("#auth-password", PASSWORD)
    page.fill("#auth-name", name or username)
    page.select_option("#auth-device-type", "web")
    page.click("#btn-auth-submit")
    expect(page.locator("#app-view")).to_be_visible()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
    return username


def log_in(page: Page, username: str, device_type: str = "web") -> None:
    page.click("#auth-tab-login")
    page.fill("#auth-username", username)
    page.fill("#auth-password", PASSWORD)
    page.select_option("#auth-device-type", device_type)
    page.click("#btn-auth-submit")
    expect(page.locator("#app-view")).to_be_visible()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")


def session_of(page: Page) -> dict:
    return json.loads(page.evaluate("sessionStorage.getItem('chat.session')"))


def add_contact(page: Page, username: str) -> None:
    page.click("[data-testid=tab-contacts]")
    page.fill("#contacts-input", username)
    page.click("#btn-contacts-sync")
    expect(page.locator(f"[data-testid=contact][data-username='{username}']")).to_be_visible()


def dm_id(a: str, b: str) -> str:
    x, y = sorted((a, b))
    return f"dm:{x}:{y}"


def conversation_item(page: Page, conversation: str):
    return page.locator(f"[data-testid=conversation][data-conversation='{conversation}']")


def my_message(page: Page, body: str):
    return page.locator("[data-testid=message][data-mine=true]", has_text=body)


def ws_connections(port: int) -> float:
    """The ws_connections gauge of one gateway instance."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("ws_connections ") or line.startswith("ws_connections{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ---------------------------------------------------------------------------


def test_login_errors_signup_logout_and_login_again(open_page: Callable[[], Page], stack: Stack) -> None:
    page = open_page()
    expect(page.locator("#auth-view")).to_be_visible()
    shot(page, "login")

    # A user that does not exist: the contract's error shows on the form.
    page.fill("#auth-username", unique_name("nobody"))
    page.fill("#auth-password", PASSWORD)
    page.click("#btn-auth-submit")
    expect(page.locator("#auth-error")).not_to_be_empty()
    expect(page.locator("#app-view")).to_be_hidden()

    username = sign_up(page, name="Alice Example")
    expect(page.locator("#me-username")).to_have_text(f"@{username}")
    expect(page.locator("#me-name")).to_have_text("Alice Example")
    first = session_of(page)
    assert first["device_type"] == "web"

    page.click("#btn-logout")
    expect(page.locator("#auth-view")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('chat.session')") is None
    # Logging out ended that device's tokens.
    assert Api(stack.base_url).get("/v1/me", token=first["access_token"]).status_code == 401

    log_in(page, username, device_type="mobile")
    second = session_of(page)
    assert second["device_id"] != first["device_id"]
    expect(page.locator("#me-device-type")).to_have_text("(mobile)")


def test_tokens_are_refreshed_before_they_expire(open_page: Callable[[], Page], stack: Stack) -> None:
    page = open_page()
    sign_up(page)
    old = session_of(page)
    # Pretend the access token is about to expire, then reload: the page must
    # rotate its tokens (POST /v1/auth/refresh) before using them.
    page.evaluate(
        """() => {
            const s = JSON.parse(sessionStorage.getItem('chat.session'));
            s.expires_at = Date.now() + 2000;
            sessionStorage.setItem('chat.session', JSON.stringify(s));
        }"""
    )
    page.reload()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
    page.wait_for_function(
        "old => JSON.parse(sessionStorage.getItem('chat.session')).refresh_token !== old",
        arg=old["refresh_token"],
    )
    new = session_of(page)
    assert new["device_id"] == old["device_id"]
    assert new["expires_at"] > old["expires_at"]
    api = Api(stack.base_url)
    assert api.get("/v1/me", token=new["access_token"]).status_code == 200
    # Rotation: the old refresh token stopped working. (Last: presenting a rotated
    # token may, by design, revoke the whole session as a suspected theft.)
    assert api.post("/v1/auth/refresh", json={"refresh_token": old["refresh_token"]}).status_code == 401


def test_direct_message_typing_receipts_and_presence(open_page: Callable[[], Page]) -> None:
    alice, bob = open_page(), open_page()
    sign_up(alice, name="Alice")
    bob_name = sign_up(bob, name="Bob")
    alice_id, bob_id = session_of(alice)["user_id"], session_of(bob)["user_id"]
    conv = dm_id(alice_id, bob_id)

    add_contact(alice, bob_name)
    contact = alice.locator(f"[data-testid=contact][data-username='{bob_name}']")
    expect(contact.locator("[data-testid=presence]")).to_have_text("online")
    contact.click()
    expect(alice.locator("#conversation-view")).to_have_attribute("data-conversation", conv)
    expect(alice.locator("#conv-title")).to_have_text("Bob")

    alice.fill("#composer-input", "Hello Bob, this is Alice")
    alice.press("#composer-input", "Enter")
    sent = my_message(alice, "Hello Bob, this is Alice")
    expect(sent).to_have_count(1)

    # Bob's page has the conversation closed: it appears, unread, and Bob's page
    # acknowledges delivery, which Alice sees.
    item = conversation_item(bob, conv)
    expect(item.locator("[data-testid=unread]")).to_have_text("1")
    expect(item.locator("[data-testid=conversation-last]")).to_have_text("Hello Bob, this is Alice")
    expect(sent).to_have_attribute("data-state", "delivered")
    expect(sent).to_have_attribute("data-seq", re.compile(r"^\d+$"))

    # Bob opens it: the message is there and Alice sees it read.
    item.click()
    expect(bob.locator("[data-testid=message][data-mine=false]", has_text="Hello Bob, this is Alice")).to_have_count(1)
    expect(item.locator("[data-testid=unread]")).to_have_count(0)
    expect(sent).to_have_attribute("data-state", "read")

    # Typing: Bob types, Alice sees it; Bob's reply arrives and clears it.
    bob.click("#composer-input")
    bob.keyboard.type("Hi Al")
    expect(alice.locator("#typing-indicator")).to_have_attribute("data-typing", "true")
    expect(alice.locator("#typing-indicator")).to_contain_text("Bob is typing")
    bob.keyboard.type("ice!")
    bob.keyboard.press("Enter")
    expect(alice.locator("[data-testid=message][data-mine=false]", has_text="Hi Alice!")).to_have_count(1)
    expect(alice.locator("#typing-indicator")).to_have_attribute("data-typing", "false")
    # Alice has the conversation open: Bob's reply turns read on Bob's side.
    expect(my_message(bob, "Hi Alice!")).to_have_attribute("data-state", "read")
    # Every message shows once, in seq order.
    seqs = [int(s) for s in alice.locator("[data-testid=message]").evaluate_all("els => els.map(e => e.dataset.seq)")]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)) == 2
    shot(alice, "conversation")

    # Presence is live: Bob logs out, Alice's page shows him offline.
    bob.click("#btn-logout")
    expect(alice.locator("#conv-subtitle")).to_contain_text(re.compile("last seen|offline"))


def test_group_create_message_members_and_public_channel(open_page: Callable[[], Page]) -> None:
    alice, bob = open_page(), open_page()
    alice_name = sign_up(alice, name="Alice")
    bob_name = sign_up(bob, name="Bob")
    bob_id = session_of(bob)["user_id"]
    group_name = f"Team {unique_name('')}"

    # Bob knows Alice by name once she is his contact (the contract has no lookup by user id).
    add_contact(bob, alice_name)
    bob.click("[data-testid=tab-chats]")

    alice.click("[data-testid=tab-groups]")
    alice.fill("#group-name", group_name)
    alice.fill("#group-members", bob_name)
    alice.click("#btn-group-create")
    expect(alice.locator("#conv-title")).to_have_text(f"# {group_name}")
    conv = alice.locator("#conversation-view").get_attribute("data-conversation")
    assert conv and conv.startswith("group:")

    # Bob learns about the group from its group_event frame, without reloading.
    item = conversation_item(bob, conv)
    expect(item.locator("[data-testid=conversation-title]")).to_have_text(f"# {group_name}")

    alice.fill("#composer-input", "Welcome to the group")
    alice.press("#composer-input", "Enter")
    sent = my_message(alice, "Welcome to the group")
    expect(sent).to_have_attribute("data-state", re.compile("acked|delivered|read"))
    expect(item.locator("[data-testid=conversation-last]")).to_have_text("Welcome to the group")
    item.click()
    received = bob.locator("[data-testid=message][data-mine=false]", has_text="Welcome to the group")
    expect(received).to_have_count(1)
    expect(received.locator(".msg-from")).to_have_text("Alice")
    expect(sent).to_have_attribute("data-state", "read")
    bob.fill("#composer-input", "Thanks!")
    bob.press("#composer-input", "Enter")
    expect(alice.locator("[data-testid=message][data-mine=false]", has_text="Thanks!")).to_have_count(1)

    alice.click("#btn-group-info")
    members = alice.locator("[data-testid=group-member]")
    expect(members).to_have_count(2)
    bob_member = alice.locator(f"[data-testid=group-member][data-user-id='{bob_id}']")
    expect(bob_member).to_have_attribute("data-role", "member")
    shot(alice, "group")

    # The owner removes Bob: Bob's page sees the event and can no longer write.
    bob_member.locator("[data-testid=member-remove]").click()
    expect(members).to_have_count(1)
    expect(bob.locator("[data-testid=group-event][data-event=member_removed]")).to_have_count(1)
    expect(bob.locator("#composer-input")).to_be_disabled()

    # A public channel: Bob finds it and joins; Alice's page sees him join.
    channel = f"Channel {unique_name('')}"
    alice.click("[data-testid=tab-groups]")
    alice.fill("#group-name", channel)
    alice.check("#group-public")
    alice.click("#btn-group-create")
    expect(alice.locator("#conv-title")).to_have_text(f"# {channel}")
    channel_conv = alice.locator("#conversation-view").get_attribute("data-conversation")
    assert channel_conv
    bob.click("[data-testid=tab-groups]")
    bob.click("#btn-public-refresh")
    entry = bob.locator(f"[data-testid=public-group][data-group-id='{channel_conv.split(':', 1)[1]}']")
    entry.locator("[data-testid=join-group]").click()
    expect(bob.locator("#conversation-view")).to_have_attribute("data-conversation", channel_conv)
    expect(alice.locator("[data-testid=group-event][data-event=member_added]")).to_have_count(1)
    bob.fill("#composer-input", "Hello channel")
    bob.press("#composer-input", "Enter")
    expect(alice.locator("[data-testid=message][data-mine=false]", has_text="Hello channel")).to_have_count(1)

    # Bob leaves the channel himself.
    bob.click("#btn-group-info")
    bob.click("#btn-group-leave")
    expect(bob.locator("#composer-input")).to_be_disabled()
    expect(alice.locator("[data-testid=group-event][data-event=member_removed]")).to_have_count(1)


def test_history_pages_load_on_scroll_without_duplicates(open_page: Callable[[], Page], stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    page = open_page()
    log_in(page, alice.username)
    conv = dm_id(alice.user_id, bob.user_id)

    ws = bob.connect()
    try:
        for i in range(1, 46):
            ws.send_message(to=alice.user_id, body=f"history {i:02d}")
        last = max(a["seq"] for a in ws.collect("ack", 45, timeout=60))
        # The page takes them live, unopened, and acknowledges them all: once Bob
        # sees that receipt, the server has nothing left to replay to this device.
        expect(conversation_item(page, conv).locator("[data-testid=unread]")).to_have_text("45")
        ws.expect("receipt", user_id=alice.user_id, status="delivered", where=lambda f: f["up_to_seq"] >= last)
    finally:
        ws.close()

    # A reload starts from an empty store: the history comes from REST, page by page.
    page.reload()
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")
    conversation_item(page, conv).click()
    messages = page.locator("[data-testid=message]")
    expect(messages.last).to_contain_text("history 45")
    expect(messages).to_have_count(30)
    expect(page.locator("#btn-load-older")).to_be_visible()
    # Scrolling to the top loads the older page, keeping what is on screen.
    page.locator("#message-scroller").evaluate("el => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); }")
    expect(messages).to_have_count(45)
    bodies = messages.locator("[data-testid=message-body]").all_inner_texts()
    assert bodies == [f"history {i:02d}" for i in range(1, 46)]
    expect(page.locator("#history-start")).to_be_visible()
    expect(page.locator("#btn-load-older")).to_be_hidden()
    assert page.locator("#dup-count").inner_text() == "0"


def test_protocol_console_shows_frames_and_sends_raw(open_page: Callable[[], Page]) -> None:
    page = open_page()
    sign_up(page)
    page.click("#console summary")
    log = page.locator("#console-log")
    expect(log.locator("[data-testid=console-event][data-state=online]")).to_have_count(1)

    page.fill("#console-input", '{"type": "ping"}')
    page.click("#btn-console-send")
    expect(log.locator("[data-testid=console-frame][data-direction=out][data-type=ping]")).to_have_count(1)
    expect(log.locator("[data-testid=console-frame][data-direction=in][data-type=pong]")).to_have_count(1)

    # A bad frame gets an error frame, and the socket stays open.
    page.fill("#console-input", '{"type": "no_such_frame"}')
    page.click("#btn-console-send")
    error = log.locator("[data-testid=console-frame][data-direction=in][data-type=error]")
    expect(error).to_have_count(1)
    expect(error.locator(".console-json")).to_contain_text('"code": "invalid_request"')
    expect(page.locator("[data-testid=toast][data-kind=error]")).to_contain_text("invalid_request")
    expect(page.locator("#conn-state")).to_have_attribute("data-state", "online")

    page.fill("#console-input", "not json at all")
    page.click("#btn-console-send")
    expect(log.locator("[data-testid=console-frame][data-direction=in][data-type=error]")).to_have_count(2)
    shot(page, "console")


def test_devices_listed_and_removed(open_page: Callable[[], Page], stack: Stack) -> None:
    page = open_page()
    username = sign_up(page)
    api = Api(stack.base_url)
    logins = {}
    # The first mobile login becomes the primary device; the second web one is secondary.
    for kind in ("mobile", "web"):
        r = api.post("/v1/auth/login", json={"username": username, "password": PASSWORD, "device_type": kind})
        assert r.status_code == 200, r.text
        logins[kind] = r.json()

    page.click("[data-testid=tab-devices]")
    devices = page.locator("[data-testid=device]")
    expect(devices).to_have_count(3)
    expect(page.locator("[data-testid=device][data-current=true]")).to_have_count(1)
    shot(page, "devices")

    web = page.locator(f"[data-testid=device][data-device-id='{logins['web']['device_id']}']")
    web.locator("[data-testid=device-remove]").click()
    expect(devices).to_have_count(2)
    expect(web).to_have_count(0)
    assert api.get("/v1/me", token=logins["web"]["access_token"]).status_code == 401

    # This page is a secondary device: removing the primary is refused, and the page says so.
    primary = page.locator(f"[data-testid=device][data-device-id='{logins['mobile']['device_id']}']")
    primary.locator("[data-testid=device-remove]").click()
    expect(page.locator("[data-testid=toast][data-kind=error]")).to_contain_text("forbidden")
    expect(devices).to_have_count(2)


def _login_and_find_gateway(page: Page, user: User, stack: Stack) -> str:
    """Log the page in and return the gateway instance ("gateway-N") holding its socket.

    Compares every instance's ws_connections gauge before and after the page's
    socket opens; if another socket opened or closed meanwhile, logs out and
    tries again.
    """
    for _ in range(5):
        before = {k: ws_connections(stack.ports[k]) for k in GATEWAYS}
        log_in(page, user.username)
        after = {k: ws_connections(stack.ports[k]) for k in GATEWAYS}
        grown = [k for k in GATEWAYS if after[k] - before[k] == 1]
        if len(grown) == 1 and all(after[k] == before[k] for k in GATEWAYS if k not in grown):
            return grown[0]
        page.click("#btn-logout")
        expect(page.locator("#auth-view")).to_be_visible()
    raise AssertionError("could not tell which gateway instance holds the page's socket")


def test_reconnects_after_its_gateway_is_killed(open_page: Callable[[], Page], stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    page = open_page()
    key = _login_and_find_gateway(page, alice, stack)

    restart = threading.Thread(target=stack.restart, args=(key,), kwargs={"kill": True})
    restart.start()
    try:
        # The page notices the drop, shows it, and comes back through the other instance.
        expect(page.locator("#console-log [data-testid=console-event][data-state=reconnecting]").first).to_be_attached()
        expect(page.locator("#conn-state")).to_have_attribute("data-state", "online", timeout=60_000)
    finally:
        restart.join(timeout=120)
    assert not restart.is_alive()

    # A new message still arrives, and the page can still send.
    ws = bob.connect()
    try:
        ws.send_message(to=alice.user_id, body="after the gateway died")
        ws.expect("ack")
        conv = dm_id(alice.user_id, bob.user_id)
        item = conversation_item(page, conv)
        expect(item.locator("[data-testid=conversation-last]")).to_have_text("after the gateway died")
        item.click()
        received = page.locator("[data-testid=message][data-mine=false]", has_text="after the gateway died")
        expect(received).to_have_count(1)
        page.fill("#composer-input", "still here")
        page.press("#composer-input", "Enter")
        frame = ws.expect("message", body="still here", timeout=15)
        assert frame["from"] == alice.user_id
        expect(my_message(page, "still here")).to_have_attribute("data-state", re.compile("acked|delivered|read"))
    finally:
        ws.close()
