"""Gateway rules: origin check, rate limit, client frame to event, device policy."""

from __future__ import annotations

import pytest
from chatlib.errors import ApiError
from chatlib.schemas import (
    InboundMessage,
    InboundReceipt,
    SessionDevice,
    TypingSignal,
    UserSessions,
    parse_client_frame,
)
from chatlib.topics import MESSAGES_IN, SIGNALS

from services.gateway.logic import (
    Identity,
    TokenBucket,
    frame_to_event,
    origin_allowed,
    parse_origins,
    primary_online,
)

WHO = Identity("alice", "dev1", "mobile", True)


# -- origin -----------------------------------------------------------------


def test_no_origin_is_a_non_browser_client_and_allowed() -> None:
    allowed = parse_origins("https://chat.example")
    assert origin_allowed(None, allowed)
    assert origin_allowed("", allowed)


def test_listed_origin_allowed_others_refused() -> None:
    allowed = parse_origins("https://chat.example, http://localhost:8080")
    assert origin_allowed("https://chat.example", allowed)
    assert origin_allowed("http://localhost:8080", allowed)
    assert origin_allowed("HTTPS://Chat.Example/", allowed)  # case and trailing slash do not matter
    assert not origin_allowed("https://evil.example", allowed)
    assert not origin_allowed("http://chat.example", allowed)  # scheme matters
    assert not origin_allowed("null", allowed)


def test_the_sites_own_origin_is_allowed_whatever_its_port() -> None:
    allowed = parse_origins("http://127.0.0.1:8080")
    assert origin_allowed("http://127.0.0.1:18080", allowed, host="127.0.0.1:18080")
    assert origin_allowed("https://chat.example", allowed, host="Chat.Example")  # default port
    assert origin_allowed("http://chat.example", allowed, host="chat.example:80")
    assert not origin_allowed("https://evil.example", allowed, host="chat.example")
    assert not origin_allowed("http://127.0.0.1:9999", allowed, host="127.0.0.1:18080")
    assert not origin_allowed("null", allowed, host="127.0.0.1:18080")


def test_star_allows_any_origin() -> None:
    assert origin_allowed("https://anything.example", parse_origins("*"))


def test_empty_list_refuses_every_browser() -> None:
    allowed = parse_origins("")
    assert allowed == frozenset()
    assert not origin_allowed("http://localhost:8080", allowed)
    assert origin_allowed(None, allowed)


# -- rate limit -------------------------------------------------------------


def test_bucket_allows_burst_of_twice_the_rate_then_refuses() -> None:
    b = TokenBucket(10, now=0.0)
    assert sum(b.take(0.0) for _ in range(25)) == 20


def test_bucket_refills_at_the_rate() -> None:
    b = TokenBucket(10, now=0.0)
    for _ in range(20):
        assert b.take(0.0)
    assert not b.take(0.0)
    assert not b.take(0.05)  # half a token
    assert b.take(0.1)  # one token after 0.1 s at 10/s
    assert not b.take(0.1)


def test_bucket_never_saves_more_than_the_burst() -> None:
    b = TokenBucket(5, now=0.0)
    assert sum(b.take(1000.0) for _ in range(50)) == 10


def test_zero_rate_is_unlimited() -> None:
    b = TokenBucket(0)
    assert all(b.take(0.0) for _ in range(1000))


# -- frames to events -------------------------------------------------------


def test_dm_message_becomes_inbound_message_keyed_by_conversation() -> None:
    frame = parse_client_frame('{"type":"message","id":"c1","to":"bob","body":"hi"}')
    topic, key, ev = frame_to_event(frame, WHO, "gw1", 123)
    assert topic == MESSAGES_IN
    assert key == "dm:alice:bob"
    assert isinstance(ev, InboundMessage)
    assert (
        ev.id,
        ev.conversation,
        ev.sender,
        ev.sender_device,
        ev.gateway,
        ev.to,
        ev.group,
        ev.body,
        ev.received_ts,
    ) == (
        "c1",
        "dm:alice:bob",
        "alice",
        "dev1",
        "gw1",
        "bob",
        None,
        "hi",
        123,
    )


def test_identity_comes_from_the_socket_never_the_frame() -> None:
    frame = parse_client_frame(
        '{"type":"message","id":"c1","to":"bob","body":"hi","from":"mallory","sender":"mallory"}'
    )
    _, _, ev = frame_to_event(frame, WHO, "gw1", 1)
    assert isinstance(ev, InboundMessage) and ev.sender == "alice" and ev.sender_device == "dev1"


def test_dm_conversation_id_is_sorted() -> None:
    frame = parse_client_frame('{"type":"message","id":"c1","to":"aaron","body":"hi"}')
    _, key, _ = frame_to_event(frame, WHO, "gw1", 1)
    assert key == "dm:aaron:alice"


def test_group_message_keyed_by_group_conversation() -> None:
    frame = parse_client_frame('{"type":"message","id":"c2","group":"g7","body":"hello"}')
    topic, key, ev = frame_to_event(frame, WHO, "gw1", 1)
    assert topic == MESSAGES_IN and key == "group:g7"
    assert isinstance(ev, InboundMessage) and ev.group == "g7" and ev.to is None


def test_message_to_self_refused() -> None:
    frame = parse_client_frame('{"type":"message","id":"c1","to":"alice","body":"hi"}')
    with pytest.raises(ApiError) as exc:
        frame_to_event(frame, WHO, "gw1", 1)
    assert exc.value.code.value == "invalid_request"


def test_message_to_malformed_recipient_refused() -> None:
    frame = parse_client_frame('{"type":"message","id":"c1","to":"bo:b","body":"hi"}')
    with pytest.raises(ApiError) as exc:
        frame_to_event(frame, WHO, "gw1", 1)
    assert exc.value.code.value == "invalid_request"


def test_receipt_becomes_inbound_receipt() -> None:
    frame = parse_client_frame('{"type":"receipt","conversation":"dm:alice:bob","status":"read","up_to_seq":4}')
    topic, key, ev = frame_to_event(frame, WHO, "gw1", 1)
    assert topic == MESSAGES_IN and key == "dm:alice:bob"
    assert isinstance(ev, InboundReceipt)
    assert (ev.user_id, ev.device_id, ev.gateway, ev.status, ev.up_to_seq) == ("alice", "dev1", "gw1", "read", 4)


def test_typing_becomes_signal() -> None:
    frame = parse_client_frame('{"type":"typing","conversation":"group:g1","state":"start"}')
    topic, key, ev = frame_to_event(frame, WHO, "gw1", 1)
    assert topic == SIGNALS and key == "group:g1"
    assert isinstance(ev, TypingSignal) and (ev.user_id, ev.device_id, ev.state) == ("alice", "dev1", "start")


@pytest.mark.parametrize("kind", ["receipt", "typing"])
def test_dm_of_others_is_forbidden(kind: str) -> None:
    extra = '"status":"read","up_to_seq":1' if kind == "receipt" else '"state":"stop"'
    frame = parse_client_frame(f'{{"type":"{kind}","conversation":"dm:bob:carol",{extra}}}')
    with pytest.raises(ApiError) as exc:
        frame_to_event(frame, WHO, "gw1", 1)
    assert exc.value.code.value == "forbidden"


@pytest.mark.parametrize("conv", ["nonsense", "dm:bob:alice", "dm:alice", "group:", "group:a:b", "chan:x"])
def test_unparsable_conversation_is_invalid(conv: str) -> None:
    frame = parse_client_frame(f'{{"type":"typing","conversation":"{conv}","state":"stop"}}')
    with pytest.raises(ApiError) as exc:
        frame_to_event(frame, WHO, "gw1", 1)
    assert exc.value.code.value == "invalid_request"


# -- device policy ----------------------------------------------------------


def _sessions(*primaries: bool) -> UserSessions:
    devices = [
        SessionDevice(device_id=f"d{i}", gateway="gw1", conn_id=f"c{i}", connected_at=1, primary=p)
        for i, p in enumerate(primaries)
    ]
    return UserSessions(user_id="alice", devices=devices, online=bool(devices), last_seen=1)


def test_primary_online_from_view_or_local_socket() -> None:
    assert primary_online(_sessions(False, True), local_primary=False)
    assert not primary_online(_sessions(False), local_primary=False)
    assert not primary_online(_sessions(), local_primary=False)
    assert not primary_online(None, local_primary=False)
    assert primary_online(None, local_primary=True)
