"""Push notifications for offline devices (recording sink), black-box through Nginx plus a look at push_outcomes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.collection import Collection

from helper.stack import Stack
from tests.e2e.test_groups import create, online
from tests.support import new_user


@pytest.fixture(scope="module")
def outcomes(stack: Stack) -> Iterator[Collection[dict[str, Any]]]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    yield client[stack.env.get("MONGO_DB", "chat")]["push_outcomes"]
    client.close()


def wait_outcomes(
    col: Collection[dict[str, Any]], query: dict[str, Any], count: int, timeout: float = 15
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(col.find(query))
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} push outcomes for {query}: {list(col.find(query))}")


def test_offline_member_gets_push_and_the_message_on_reconnect(
    stack: Stack, outcomes: Collection[dict[str, Any]]
) -> None:
    a, b = new_user(stack.base_url), new_user(stack.base_url)
    phone = b.login_device("mobile", push_token=f"fcm-{uuid.uuid4().hex}")  # offline, has a token
    b_first = online(b)  # b's first device, online: excluded from pushes
    wa = online(a)
    try:
        gid = create(a, [b])["group_id"]
        wa.expect("group_event", group_id=gid, event="created")
        cid = wa.send_message(group=gid, body="are you there?")
        ack = wa.expect("ack", id=cid)
        b_first.expect("message", id=cid)

        (record,) = wait_outcomes(outcomes, {"message_id": ack["message_id"]}, 1)
        assert record["user_id"] == b.user_id and record["device_id"] == phone.device_id
        assert record["status"] == "recorded" and record["conversation"] == f"group:{gid}"
        assert isinstance(record["ts"], int)
        assert "token" not in record and "preview" not in record

        ws = phone.connect()
        try:
            m = ws.expect("message", id=cid)
            assert m["seq"] == ack["seq"] and m["body"] == "are you there?"
        finally:
            ws.close()
    finally:
        wa.close()
        b_first.close()


def test_a_burst_gives_one_outcome_per_message_and_device(stack: Stack, outcomes: Collection[dict[str, Any]]) -> None:
    a, b = new_user(stack.base_url), new_user(stack.base_url)
    phone = b.login_device("mobile", push_token=f"fcm-{uuid.uuid4().hex}")
    wa = online(a)
    try:
        gid = create(a, [b])["group_id"]
        wa.expect("group_event", group_id=gid, event="created")
        cids = [wa.send_message(group=gid, body=f"burst {i}") for i in range(3)]
        acks = [wa.expect("ack", id=cid) for cid in cids]
        records = wait_outcomes(outcomes, {"user_id": b.user_id}, 3)
        by_message = {r["message_id"]: r for r in records}
        assert set(by_message) == {ack["message_id"] for ack in acks}
        assert {r["device_id"] for r in records} == {phone.device_id}
        first = min(acks, key=lambda x: x["seq"])
        # The first of a burst is recorded (would be sent); later ones within the window are collapsed.
        assert by_message[first["message_id"]]["status"] == "recorded"
        assert {r["status"] for r in records} <= {"recorded", "collapsed"}
    finally:
        wa.close()


def test_muted_conversation_is_not_pushed(stack: Stack, outcomes: Collection[dict[str, Any]]) -> None:
    a, b = new_user(stack.base_url), new_user(stack.base_url)
    phone = b.login_device("mobile", push_token=f"fcm-{uuid.uuid4().hex}")
    wa = online(a)
    try:
        gid = create(a, [b])["group_id"]
        wa.expect("group_event", group_id=gid, event="created")
        r = b.api.put(f"/v1/conversations/group:{gid}/mute", json={"muted": True})
        assert r.status_code == 204, r.text
        cid = wa.send_message(group=gid, body="shh")
        ack = wa.expect("ack", id=cid)
        (record,) = wait_outcomes(outcomes, {"message_id": ack["message_id"]}, 1)
        assert (record["device_id"], record["status"]) == (phone.device_id, "muted")
    finally:
        wa.close()
