"""The schema module: envelope round trips, forward compatibility, frame validation."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from chatlib import schemas as s
from chatlib.errors import ApiError, ErrorCode


def test_envelope_round_trip_keeps_type_and_payload() -> None:
    ev = s.UserRegistered(user_id="u1", username="alice", name="Alice")
    raw = s.to_bytes(ev, producer="profile")
    env = s.Envelope.from_bytes(raw)
    assert env.type == "user.registered"
    assert env.producer == "profile"
    assert env.version == 1
    assert len(env.event_id) == 32
    assert s.from_bytes(raw) == ev


def test_to_bytes_writes_what_the_envelope_model_writes() -> None:
    """to_bytes builds the envelope around the event's own JSON: the same document as the
    model would write (aliases, nulls, non-ASCII and quotes included), every event id new."""
    message = s.StoredMessage(
        message_id="m1", id="c1", conversation="dm:a:b", seq=3, sender="u1", from_device="d1", to="u2",
        body='say "hi" — ça va ✓', ts=5,
    )  # fmt: skip
    for ev in (s.MessageStored(message=message), s.UserRegistered(user_id="u1", username="a", name="Ä")):
        for producer in ("persistence", 'odd "name"\n'):
            fast = json.loads(s.to_bytes(ev, producer))
            model = json.loads(s.Envelope.wrap(ev, producer).to_bytes())
            assert [k for k in fast] == [k for k in model]
            assert {k: v for k, v in fast.items() if k not in ("event_id", "occurred_at")} == {
                k: v for k, v in model.items() if k not in ("event_id", "occurred_at")
            }
            assert len(fast["event_id"]) == 32 and int(fast["event_id"], 16) >= 0
            assert abs(fast["occurred_at"] - model["occurred_at"]) < 5_000
            assert s.from_bytes(s.to_bytes(ev, producer)) == ev
    ids = {
        s.Envelope.from_bytes(s.to_bytes(s.UserRegistered(user_id="u", username="n", name="N"))).event_id
        for _ in range(100)
    }
    assert len(ids) == 100


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
        # Found by frame fuzzing (tests/e2e/test_frame_fuzz.py): the decoder's stack, and lone surrogates.
        ("[" * 5000 + "]" * 5000, "invalid_request"),
        ('{"type": "ping", "x": ' + '{"a": ' * 3000 + "1" + "}" * 3000 + "}", "invalid_request"),
        ('{"type": "message", "id": "1", "to": "u", "body": "\\ud800"}', "invalid_request"),
        ('{"type": "typing", "conversation": "dm:a:\\uDFFF", "state": "start"}', "invalid_request"),
        ('{"type": "ping", "\\udbff": 1}', "invalid_request"),
    ],
)
def test_bad_client_frames_get_contract_codes(frame: str, code: str) -> None:
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame(frame)
    assert err.value.code == code


def test_a_lone_surrogate_is_refused_with_ref_unless_the_id_holds_it() -> None:
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame('{"type": "message", "id": "c1", "to": "u", "body": "a\\ud83d"}')
    assert err.value.ref == "c1"
    with pytest.raises(s.FrameError) as err:
        s.parse_client_frame('{"type": "message", "id": "c\\ude00", "to": "u", "body": "a"}')
    assert err.value.ref is None
    # A surrogate pair is one valid character (U+1F600).
    ok = s.parse_client_frame('{"type": "message", "id": "c1", "to": "u", "body": "\\ud83d\\ude00"}')
    assert isinstance(ok, s.ClientMessage) and ok.body == "\U0001f600"


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


def _server_frames() -> list[dict[str, Any]]:
    """One frame from every way the server builds one (docs/asyncapi.yaml describes them by SERVER_FRAMES)."""
    owner = s.GroupMember(user_id="u1", role="owner", joined_ts=5)
    group = s.GroupSnapshot(group_id="g1", name="G", owner="u1", members=[owner], created_ts=1)
    change = s.GroupChanged(group=group, event="member_added", users=["u2"], actor="u1", ts=2)
    dm = s.StoredMessage(
        message_id="m1", id="c1", conversation="dm:a:b", seq=1, sender="a", from_device="d1", to="b", body="hi", ts=3
    )
    in_group = dm.model_copy(update={"to": None, "group": "g1", "conversation": "group:g1"})
    return [
        s.ack_frame("c1", "m1", "dm:a:b", 1, 3),
        dm.frame(),
        in_group.frame(),
        s.receipt_frame("dm:a:b", "b", "read", 1),
        s.typing_frame("dm:a:b", "a", "start"),
        s.presence_frame("a", True, 4),
        s.group_event_frame(change),
        s.group_event_frame(change.model_copy(update={"actor": None})),
        s.error_frame("invalid_request", "bad", ref="c2"),
        s.error_frame("unavailable", "later"),
        ApiError(ErrorCode.FORBIDDEN, "no", {"why": "muted"}).to_frame("c3"),
        s.PONG_FRAME,
    ]


def test_every_server_frame_builder_is_covered() -> None:
    """A new builder needs a model in SERVER_FRAMES and a line in _server_frames (so the docs show its frame)."""
    builders = {
        n
        for n, f in vars(s).items()
        if inspect.isfunction(f) and f.__module__ == s.__name__ and n.endswith("_frame") and not n.startswith("parse_")
    }
    covered = {"ack_frame", "receipt_frame", "typing_frame", "presence_frame", "group_event_frame", "error_frame"}
    assert builders == covered
    assert {f["type"] for f in _server_frames()} == set(s.SERVER_FRAMES)


@pytest.mark.parametrize("frame", _server_frames(), ids=lambda f: f["type"])
def test_server_frame_models_describe_the_built_frames(frame: dict[str, Any]) -> None:
    """Each built frame is exactly its model: no key the model lacks, every value of the model's type."""
    model = s.SERVER_FRAMES[frame["type"]]
    parsed = model.model_validate(frame)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == frame


def test_member_ids_are_built_once_per_members_list() -> None:
    snap = s.GroupSnapshot(
        group_id="g",
        name="n",
        owner="a",
        members=[s.GroupMember(user_id=u, role="member") for u in ("a", "b")],
        created_ts=1,
    )
    assert snap.member_ids() == {"a", "b"} and snap.member_ids() is snap.member_ids()
    # a copy with other members builds its own; the cache is not a field
    grown = snap.model_copy(update={"members": [*snap.members, s.GroupMember(user_id="c", role="member")]})
    assert grown.member_ids() == {"a", "b", "c"} and snap.member_ids() == {"a", "b"}
    fresh = s.GroupSnapshot.model_validate(snap.model_dump())
    assert fresh == snap and "_member_ids" not in snap.model_dump() and "_member_ids" not in snap.model_dump_json()
