"""1-to-1 messaging through Nginx, as clients see it: send/ack/receive, multi-device sync,
idempotent retries, receipts, typing, presence, offline delivery, removed devices."""

from __future__ import annotations

import uuid

from helper.stack import Stack
from tests.support import dm_id, history, new_user, online, send_acked


def test_send_ack_and_every_device_of_recipient_and_sender_receives(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    alice_web, bob_web = alice.login_device("web"), bob.login_device("web")
    a1, a2, b1, b2 = online(alice), online(alice_web), online(bob), online(bob_web)
    conv = dm_id(alice, bob)

    ack = send_acked(a1, bob, body="hello bob")
    assert ack["conversation"] == conv and ack["seq"] == 1
    assert isinstance(ack["message_id"], str) and isinstance(ack["ts"], int)
    expected = {
        "type": "message",
        "message_id": ack["message_id"],
        "id": ack["id"],
        "conversation": conv,
        "seq": 1,
        "from": alice.user_id,
        "from_device": alice.device_id,
        "to": bob.user_id,
        "body": "hello bob",
        "ts": ack["ts"],
    }
    for ws in (b1, b2, a2):  # both devices of the recipient, and the sender's other device
        assert ws.expect("message", id=ack["id"]) == expected
    assert a1.nothing("message", seconds=0.5, id=ack["id"])  # the sending device has its ack

    reply = send_acked(b2, alice, body="hi alice")
    assert reply["seq"] == 2 and reply["conversation"] == conv
    for ws in (a1, a2, b1):
        assert ws.expect("message", id=reply["id"])["from"] == bob.user_id


def test_retry_with_the_same_id_is_stored_acked_and_delivered_once(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1, b1 = online(alice), online(bob)
    cid = uuid.uuid4().hex
    a1.send_message(to=bob.user_id, body="once", cid=cid)
    a1.send_message(to=bob.user_id, body="once", cid=cid)  # a retry before the ack came
    first = a1.expect("ack", id=cid)
    marker = send_acked(a1, bob, body="marker")
    assert marker["seq"] == first["seq"] + 1
    assert b1.expect("message", id=cid)["message_id"] == first["message_id"]
    b1.expect("message", id=marker["id"])
    assert a1.nothing("ack", seconds=0.5, id=cid)
    assert b1.duplicates == 0 and b1.nothing("message", seconds=0.5, id=cid)

    # A client that lost its socket before seeing the ack retries on a new one.
    a1.close()
    a2 = alice.connect()
    a2.send_message(to=bob.user_id, body="once", cid=cid)
    again = a2.expect("ack", id=cid)
    assert (again["message_id"], again["seq"]) == (first["message_id"], first["seq"])
    assert b1.nothing("message", seconds=1.0, id=cid) and b1.duplicates == 0
    stored = [m for m in history(alice, dm_id(alice, bob))["messages"] if m["id"] == cid]
    assert len(stored) == 1


def test_message_to_an_unknown_user_is_refused_with_an_error_frame(stack: Stack) -> None:
    alice = new_user(stack.base_url)
    a1 = online(alice)
    cid = a1.send_message(to="no-such-user", body="hello?")
    err = a1.expect("error", ref=cid)
    assert err["code"] == "not_found" and err["message"]
    assert a1.nothing("ack", seconds=0.5, id=cid)


def test_receipts_reach_the_sender_and_the_readers_other_device(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    bob_web = bob.login_device("web")
    a1, b1, b2 = online(alice), online(bob), online(bob_web)
    conv = dm_id(alice, bob)
    acks = [send_acked(a1, bob, body=f"m{i}") for i in range(3)]
    last = acks[-1]["seq"]
    b1.collect("message", 3, conversation=conv)

    b1.send({"type": "receipt", "conversation": conv, "status": "delivered", "up_to_seq": last})
    got = a1.expect("receipt", user_id=bob.user_id, status="delivered")
    assert got == {
        "type": "receipt",
        "conversation": conv,
        "user_id": bob.user_id,
        "status": "delivered",
        "up_to_seq": last,
    }
    b2.expect("receipt", user_id=bob.user_id, status="delivered", up_to_seq=last)

    b1.send({"type": "receipt", "conversation": conv, "status": "read", "up_to_seq": last})
    assert a1.expect("receipt", user_id=bob.user_id, status="read")["up_to_seq"] == last
    assert b2.expect("receipt", user_id=bob.user_id, status="read")["up_to_seq"] == last
    assert b1.nothing("receipt", seconds=0.5, user_id=bob.user_id)  # the reading device itself is not told

    # never backwards: an older receipt is not news to anyone
    b2.send({"type": "receipt", "conversation": conv, "status": "read", "up_to_seq": 1})
    assert a1.nothing("receipt", seconds=1.0, user_id=bob.user_id)
    listing = bob.api.get("/v1/conversations").json()["conversations"]
    assert [(c["conversation"], c["read_seq"], c["unread"]) for c in listing] == [(conv, last, 0)]


def test_receipt_for_someone_elses_conversation_is_an_error(stack: Stack) -> None:
    alice, bob, carol = (new_user(stack.base_url) for _ in range(3))
    a1, c1 = online(alice), online(carol)
    send_acked(a1, bob)
    c1.send({"type": "receipt", "conversation": dm_id(alice, bob), "status": "read", "up_to_seq": 1})
    assert c1.expect("error", code="forbidden")["message"]


def test_typing_reaches_the_peer(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1, b1 = online(alice), online(bob)
    conv = dm_id(alice, bob)
    a1.send({"type": "typing", "conversation": conv, "state": "start"})
    assert b1.expect("typing", user_id=alice.user_id) == {
        "type": "typing",
        "conversation": conv,
        "user_id": alice.user_id,
        "state": "start",
    }
    a1.send({"type": "typing", "conversation": conv, "state": "stop"})
    b1.expect("typing", user_id=alice.user_id, state="stop")
    assert a1.nothing("typing", seconds=0.5)


def test_presence_when_a_peer_connects_and_disconnects(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1 = online(alice)
    send_acked(a1, bob, body="are you there?")  # bob is offline; now they share a conversation
    b1 = bob.connect()
    came = a1.expect("presence", user_id=bob.user_id, online=True)
    assert isinstance(came["last_seen"], int)
    b1.close()
    went = a1.expect("presence", user_id=bob.user_id, online=False)
    assert went["last_seen"] >= came["last_seen"]


def test_offline_recipient_gets_all_fifty_in_order_on_reconnect(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1 = online(alice)
    conv = dm_id(alice, bob)
    cids = [a1.send_message(to=bob.user_id, body=f"offline {i}") for i in range(50)]
    acks = {a1.expect("ack", id=cid)["id"]: None for cid in cids}
    assert len(acks) == 50
    b1 = bob.connect()
    got = b1.collect("message", 50, timeout=30, conversation=conv)
    assert [m["seq"] for m in got] == list(range(1, 51))
    assert [m["id"] for m in got] == cids
    assert b1.nothing("message", seconds=0.5)

    # after a delivered receipt nothing is pending for that device any more
    b1.send({"type": "receipt", "conversation": conv, "status": "delivered", "up_to_seq": 50})
    a1.expect("receipt", user_id=bob.user_id, status="delivered", up_to_seq=50)
    b1.close()
    b2 = bob.connect()
    fresh = send_acked(a1, bob, body="after reconnect")
    assert b2.expect("message", conversation=conv)["seq"] == fresh["seq"] == 51


def test_removed_device_gets_nothing_more(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    bob_web = bob.login_device("web")
    a1, b1, b2 = online(alice), online(bob), online(bob_web)
    first = send_acked(a1, bob, body="before removal")
    b2.expect("message", id=first["id"])

    assert bob.api.delete(f"/v1/me/devices/{bob_web.device_id}").status_code == 204
    assert b2.closed.wait(15), "the removed device's socket stays open"
    after = send_acked(a1, bob, body="after removal")
    assert b1.expect("message", id=after["id"])["seq"] == first["seq"] + 1
    assert b2.nothing("message", seconds=0.5, id=after["id"])
    try:
        again = bob_web.connect()
    except Exception:
        return
    assert again.closed.wait(10) and again.nothing("message", seconds=0.2)
