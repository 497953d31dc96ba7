"""History and conversation state over REST through Nginx: paging, access, unread, sync, mutes."""

from __future__ import annotations

from typing import Any

from helper.stack import Stack
from tests.support import Api, User, dm_id, eventually, history, new_user, online, send_acked


def conversations(u: User) -> list[dict[str, Any]]:
    r = u.api.get("/v1/conversations")
    assert r.status_code == 200, r.text
    return r.json()["conversations"]  # type: ignore[no-any-return]


def error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_history_pages_newest_first_and_strangers_are_refused(stack: Stack) -> None:
    alice, bob, carol = (new_user(stack.base_url) for _ in range(3))
    a1 = online(alice)
    conv = dm_id(alice, bob)
    cids = [a1.send_message(to=bob.user_id, body=f"n{i}") for i in range(25)]
    for cid in cids:
        a1.expect("ack", id=cid)

    page = history(bob, conv, "?limit=10")
    assert [m["seq"] for m in page["messages"]] == list(range(25, 15, -1))
    assert page["next_before_seq"] == 16
    newest = page["messages"][0]
    assert (newest["id"], newest["body"], newest["from"], newest["to"], newest["conversation"]) == (
        cids[-1],
        "n24",
        alice.user_id,
        bob.user_id,
        conv,
    )
    page = history(bob, conv, "?before_seq=16&limit=10")
    assert [m["seq"] for m in page["messages"]] == list(range(15, 5, -1)) and page["next_before_seq"] == 6
    page = history(bob, conv, "?before_seq=6&limit=10")
    assert [m["seq"] for m in page["messages"]] == [5, 4, 3, 2, 1] and page["next_before_seq"] is None
    whole = history(alice, conv)
    assert len(whole["messages"]) == 25 and whole["next_before_seq"] is None

    error(carol.api.get(f"/v1/conversations/{conv}/messages"), 403, "forbidden")
    error(carol.api.get("/v1/conversations/dm:not:valid:id/messages"), 403, "forbidden")
    error(carol.api.get("/v1/conversations/group:no-such-group/messages"), 404, "not_found")
    error(bob.api.get(f"/v1/conversations/{conv}/messages?limit=500"), 400, "invalid_request")
    error(bob.api.get(f"/v1/conversations/{conv}/messages?before_seq=abc"), 400, "invalid_request")
    error(Api(stack.base_url).get(f"/v1/conversations/{conv}/messages"), 401, "unauthorized")


def test_conversation_list_unread_counts_and_order(stack: Stack) -> None:
    alice, bob, carol = (new_user(stack.base_url) for _ in range(3))
    a1, b1 = online(alice), online(bob)
    ab, ac = dm_id(alice, bob), dm_id(alice, carol)
    for i in range(4):
        send_acked(a1, bob, body=f"to bob {i}")
    last_from_bob = send_acked(b1, alice, body="reply")  # seq 5, bob's own
    assert last_from_bob["seq"] == 5
    send_acked(a1, carol, body="to carol")  # newest activity

    assert [(c["conversation"], c["unread"], c["read_seq"]) for c in conversations(bob)] == [(ab, 4, 0)]
    mine = conversations(alice)
    assert [c["conversation"] for c in mine] == [ac, ab]
    assert [c["unread"] for c in mine] == [0, 1]  # only what others sent counts
    assert mine[1]["last_message"]["seq"] == 5 and mine[1]["last_message"]["from"] == bob.user_id

    b1.send({"type": "receipt", "conversation": ab, "status": "read", "up_to_seq": 3})
    eventually(lambda: conversations(bob)[0]["unread"] == 1, what="bob's unread count drops to 1")
    assert conversations(bob)[0]["read_seq"] == 3


def test_sync_returns_device_offsets_latest_messages_and_groups(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1, b1 = online(alice), online(bob)
    conv = dm_id(alice, bob)
    for i in range(6):
        send_acked(a1, bob, body=f"s{i}")
    b1.send({"type": "receipt", "conversation": conv, "status": "delivered", "up_to_seq": 6})
    a1.expect("receipt", user_id=bob.user_id, status="delivered", up_to_seq=6)
    group = bob.api.post("/v1/groups", json={"name": "sync-team", "members": [alice.user_id]})
    assert group.status_code == 201, group.text
    gid = group.json()["group_id"]

    def synced() -> dict[str, Any]:
        r = bob.api.get("/v1/sync?per_conversation=4")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    eventually(lambda: gid in [g["group_id"] for g in synced()["groups"]], what="the new group in /v1/sync")
    body = synced()
    [dm] = [c for c in body["conversations"] if c["conversation"] == conv]
    assert (dm["delivered_seq"], dm["read_seq"], dm["unread"]) == (6, 0, 6)
    assert [m["seq"] for m in dm["messages"]] == [6, 5, 4, 3]
    [g] = [g for g in body["groups"] if g["group_id"] == gid]
    assert g["name"] == "sync-team" and {m["user_id"] for m in g["members"]} == {alice.user_id, bob.user_id}

    # another device of bob's has its own offsets
    laptop = bob.login_device("web")
    r = laptop.api.get("/v1/sync")
    [dm2] = [c for c in r.json()["conversations"] if c["conversation"] == conv]
    assert (dm2["delivered_seq"], dm2["read_seq"], len(dm2["messages"])) == (0, 0, 6)
    error(bob.api.get("/v1/sync?per_conversation=1000"), 400, "invalid_request")


def test_mute_and_deleted_sender(stack: Stack) -> None:
    alice, bob = new_user(stack.base_url), new_user(stack.base_url)
    a1 = online(alice)
    conv = dm_id(alice, bob)
    send_acked(a1, bob, body="from alice")
    b1 = online(bob)
    send_acked(b1, alice, body="from bob, soon deleted")

    assert alice.api.put(f"/v1/conversations/{conv}/mute", json={"muted": True}).status_code == 204
    assert [c["muted"] for c in conversations(alice)] == [True]
    error(alice.api.put(f"/v1/conversations/{conv}/mute", json={"muted": 1}), 400, "invalid_request")
    carol = new_user(stack.base_url)
    error(carol.api.put(f"/v1/conversations/{conv}/mute", json={"muted": True}), 403, "forbidden")
    assert alice.api.put(f"/v1/conversations/{conv}/mute", json={"muted": False}).status_code == 204
    assert [c["muted"] for c in conversations(alice)] == [False]

    b1.close()
    assert bob.api.delete("/v1/me", json={"password": bob.password}).status_code == 204

    def bob_marked_deleted() -> bool:
        msgs = history(alice, conv)["messages"]
        return [(m["from"], m["from_deleted"]) for m in msgs] == [(bob.user_id, True), (alice.user_id, False)]

    eventually(bob_marked_deleted, what="bob's messages shown as from a deleted user")
    cid = a1.send_message(to=bob.user_id, body="are you gone?")
    assert a1.expect("error", ref=cid)["code"] == "not_found"
