"""The schema module: envelope round trips, forward compatibility, frame validation."""

from __future__ import annotations

import json

import pytest
from chatlib import schemas as s


def test_envelope_round_trip_keeps_type_and_payload() -> None:
    ev = s.UserRegistered(user_id="u1", username="alice", name="Alice")
    raw = s.to_bytes(ev, producer="profile")
    env = s.Envelope.from_bytes(raw)
    assert env.type == "user.registered"
    assert env.producer == "profile"
    assert env.version == 1
    assert len(env.event_id) == 32
    assert s.from_bytes(raw) == ev


def test_unknown_fields_are_ignored_and_unknown_types_skipped() -> None:
    raw = json.dumps(
        {
            "type": "user.registered",
            "version": 1,
            "event_id": "x",
            "occurred_at": 1,
            "producer": "future",
            "payload": {"user_id": "u", "username": "n", "name": "N", "added_later": [1, 2]},
        }
    ).encode()
    assert s.from_bytes(raw) == s.UserRegistered(user_id="u", username="n", name="N")
    unknown = json.dumps({"type": "not.a.type", "payload": {}}).encode()
    assert s.from_bytes(unknown) is None


def test_type_names_are_constants_not_class_names() -> None:
    assert s.MessageStored.TYPE == "chat.message_stored"
    assert all(name == cls.TYPE for name, cls in s._REGISTRY.items())


def test_stored_message_frame_has_contract_fields() -> None:
    m = s.StoredMessage.model_validate(
        {
            "message_id": "m1",
            "id": "c1",
            "conversation": "dm:a:b",
            "seq": 3,
            "from": "a",
            "from_device": "d1",
            "to": "b",
            "body": "hi",
            "ts": 5,
        }
    )
    frame = m.frame()
    assert frame == {
        "type": "message",
        "message_id": "m1",
        "id": "c1",
        "conversation": "dm:a:b",
        "seq": 3,
        "from": "a",
        "from_device": "d1",
        "body": "hi",
        "ts": 5,
        "to": "b",
    }
    again = s.MessageStored.model_validate(s.MessageStored(message=m).model_dump(mode="json"))
    assert again.message == m


def test_conversation_ids() -> None:
    assert s.dm_conversation("b", "a") == "dm:a:b"
    assert s.parse_conversation("dm:a:b") == ("dm", ["a", "b"])
    assert s.parse_conversation("group:g1") == ("group", ["g1"])
    for bad in ["dm:b:a", "dm:a", "dm:a:a", "group:", "chan:x", "dm:a:b:c", ""]:
        with pytest.raises(ValueError):
            s.parse_conversation(bad)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_request"),
        ("[1]", "invalid_request"),
        ('{"type": "nope"}', "invalid_request"),
        ('{"type": "message", "id": "1", "body": "x"}', "invalid_request"),
        ('{"type": "message", "id": "1", "to": "u", "group": "g", "body": "x"}', "invalid_request"),
        ('{"type": "message", "id": "1", "to": "u", "body": "   "}', "invalid_request"),
        ('{"type": "receipt", "conversation": "dm:a:b", "status": "seen", "up_to_seq": 1}', "invalid_request"),
        ('{"type": "receipt", "conversation": "dm:a:b", "status": "read", "up_to_seq": -1}', "invalid_request"),
        ('{"type": "typing", "conversation": "dm:a:b", "state": "maybe"}', "invalid_request"),
    ],
)
def test_bad_client_frames_get_contract_codes(frame: str, code: str) -> None:
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame(frame)
    assert err.value.code == code


def test_size_limits() -> None:
    body = "x" * (s.MAX_BODY_CHARS + 1)
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame(json.dumps({"type": "message", "id": "r1", "to": "u", "body": body}))
    assert err.value.code == "payload_too_large"
    assert err.value.ref == "r1"
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame("x" * (s.MAX_FRAME_BYTES + 1))
    assert err.value.code == "payload_too_large"
    ok = s.parse_client_frame(json.dumps({"type": "message", "id": "r1", "to": "u", "body": "y" * s.MAX_BODY_CHARS}))
    assert isinstance(ok, s.ClientMessage)


def test_valid_frames_parse() -> None:
    assert isinstance(s.parse_client_frame('{"type": "ping"}'), s.ClientPing)
    r = s.parse_client_frame('{"type": "receipt", "conversation": "dm:a:b", "status": "read", "up_to_seq": 4}')
    assert isinstance(r, s.ClientReceipt) and r.up_to_seq == 4
