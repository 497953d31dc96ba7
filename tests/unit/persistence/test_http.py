"""REST side: conversation list, history paging, sync, mutes, errors."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.schemas import UserUnregistered, dm_conversation
from flask.testing import FlaskClient

from services.persistence.service import Persistence
from tests.unit.persistence.conftest import dm, gmsg, receipt, set_group

AB = dm_conversation("alice", "bob")
AC = dm_conversation("alice", "carol")
G = "group:g1"


@pytest.fixture
def client(svc: Persistence) -> FlaskClient:
    return svc.create_app().test_client()


def get(client: FlaskClient, path: str, user: str = "alice", device: str = "alice-phone") -> Any:
    return client.get(path, headers={"X-User-Id": user, "X-Device-Id": device})


def test_identity_is_required(client: FlaskClient) -> None:
    r = client.get("/v1/conversations")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"


def test_conversation_list_newest_first_with_unread_from_others_only(svc: Persistence, client: FlaskClient) -> None:
    svc.on_inbound([dm(sender="bob", to="alice", cid=f"b{i}") for i in range(3)])  # 1-3 from bob
    svc.on_inbound([dm(sender="alice", to="bob", cid="a1")])  # 4 from alice
    svc.on_inbound([dm(sender="alice", to="bob", cid="a1")])
    svc.on_inbound([receipt("alice", AB, "read", 1)])
    svc.store.conversations[AB]["last"]["ts"] = 1  # type: ignore[attr-defined]  # older activity
    svc.on_inbound([dm(sender="carol", to="alice", cid="c1")])
    body = get(client, "/v1/conversations").get_json()
    convs = body["conversations"]
    assert [c["conversation"] for c in convs] == [AC, AB]
    assert {c["conversation"]: (c["unread"], c["read_seq"]) for c in convs} == {AC: (1, 0), AB: (2, 1)}
    assert convs[1]["last_message"]["seq"] == 4 and convs[1]["last_message"]["from"] == "alice"
    bob = get(client, "/v1/conversations", user="bob").get_json()["conversations"]
    assert [(c["conversation"], c["unread"]) for c in bob] == [(AB, 1)]  # alice's one message


def test_history_pages_newest_first(svc: Persistence, client: FlaskClient) -> None:
    for start in range(0, 120, 40):
        svc.on_inbound([dm(cid=str(i)) for i in range(start, start + 40)])
    page = get(client, f"/v1/conversations/{AB}/messages").get_json()
    assert [m["seq"] for m in page["messages"]] == list(range(120, 70, -1))
    assert page["next_before_seq"] == 71
    page = get(client, f"/v1/conversations/{AB}/messages?before_seq=71&limit=60").get_json()
    assert [m["seq"] for m in page["messages"]] == list(range(70, 10, -1))
    page = get(client, f"/v1/conversations/{AB}/messages?before_seq=11&limit=60").get_json()
    assert [m["seq"] for m in page["messages"]] == list(range(10, 0, -1))
    assert page["next_before_seq"] is None
    m = page["messages"][0]
    assert {"message_id", "id", "conversation", "seq", "from", "from_device", "to", "body", "ts"} <= set(m)
    assert m["from_deleted"] is False


def test_history_of_an_empty_dm_is_empty(client: FlaskClient) -> None:
    assert get(client, f"/v1/conversations/{AB}/messages").get_json() == {"messages": [], "next_before_seq": None}


@pytest.mark.parametrize("conv", [AB, "dm:bob:carol", "dm:zz:aa", "nonsense", "dm:alice:alice", "group:"])
def test_stranger_or_malformed_conversation_is_forbidden(svc: Persistence, client: FlaskClient, conv: str) -> None:
    svc.on_inbound([dm(cid="1")])
    r = get(client, f"/v1/conversations/{conv}/messages", user="carol" if conv == AB else "alice")
    assert r.status_code == 403, r.get_json()
    assert r.get_json()["error"]["code"] == "forbidden"


def test_unknown_group_is_not_found_and_non_member_forbidden(svc: Persistence, client: FlaskClient) -> None:
    set_group(svc, ["alice", "bob"])
    assert get(client, "/v1/conversations/group:nope/messages").status_code == 404
    assert get(client, f"/v1/conversations/{G}/messages", user="carol").status_code == 403
    assert get(client, f"/v1/conversations/{G}/messages").status_code == 200


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=x", "before_seq=0", "before_seq=-3"])
def test_bad_paging_is_invalid_request(client: FlaskClient, query: str) -> None:
    r = get(client, f"/v1/conversations/{AB}/messages?{query}")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_request"


def test_group_member_sees_only_their_range(svc: Persistence, client: FlaskClient) -> None:
    set_group(svc, ["alice", "bob"], ts=100)
    svc.on_inbound([gmsg("alice", cid="1"), gmsg("alice", cid="2")])
    set_group(svc, ["alice", "bob", "carol"], ts=200)
    svc.on_inbound([gmsg("alice", cid="3"), gmsg("carol", cid="4")])
    set_group(svc, ["alice", "bob"], ts=300)
    svc.on_inbound([gmsg("alice", cid="5")])
    page = get(client, f"/v1/conversations/{G}/messages", user="carol").get_json()
    assert [m["seq"] for m in page["messages"]] == [4, 3] and page["next_before_seq"] is None
    carol = get(client, "/v1/conversations", user="carol").get_json()["conversations"]
    assert [(c["conversation"], c["last_message"]["seq"], c["unread"]) for c in carol] == [(G, 4, 1)]
    page = get(client, f"/v1/conversations/{G}/messages?limit=2").get_json()
    assert [m["seq"] for m in page["messages"]] == [5, 4] and page["next_before_seq"] == 4


def test_deleted_sender_is_marked_in_history(svc: Persistence, client: FlaskClient) -> None:
    svc.on_inbound([dm(sender="bob", to="alice", cid="1"), dm(sender="alice", to="bob", cid="2")])
    svc.on_user_events([UserUnregistered(user_id="bob")])
    msgs = get(client, f"/v1/conversations/{AB}/messages").get_json()["messages"]
    assert [(m["from"], m["from_deleted"]) for m in msgs] == [("alice", False), ("bob", True)]


def test_sync_gives_device_offsets_latest_messages_and_groups(svc: Persistence, client: FlaskClient) -> None:
    set_group(svc, ["bob", "alice"])
    svc.on_inbound([dm(sender="bob", to="alice", cid=str(i)) for i in range(30)])
    svc.on_inbound(
        [receipt("alice", AB, "read", 10, device="alice-phone"), receipt("alice", AB, "delivered", 25, device="laptop")]
    )
    body = get(client, "/v1/sync?per_conversation=5", device="alice-phone").get_json()
    conv, group = body["conversations"]
    assert (group["conversation"], group["messages"], group["unread"]) == (G, [], 0)
    assert (conv["conversation"], conv["read_seq"], conv["delivered_seq"], conv["unread"]) == (AB, 10, 10, 20)
    assert [m["seq"] for m in conv["messages"]] == [30, 29, 28, 27, 26]
    assert body["groups"] == [
        {
            "group_id": "g1",
            "name": "G",
            "public": False,
            "owner": "bob",
            "members": [{"user_id": "bob", "role": "owner"}, {"user_id": "alice", "role": "member"}],
            "created_ts": 1,
        }
    ]
    laptop = get(client, "/v1/sync", device="laptop").get_json()["conversations"][0]
    assert laptop["conversation"] == AB
    assert (laptop["delivered_seq"], laptop["read_seq"], len(laptop["messages"])) == (25, 0, 20)
    assert get(client, "/v1/sync?per_conversation=101").status_code == 400


def test_mute_is_stored_and_served_to_the_push_service(svc: Persistence, client: FlaskClient) -> None:
    svc.on_inbound([dm(cid="1")])
    h = {"X-User-Id": "alice", "X-Device-Id": "d"}
    assert client.put(f"/v1/conversations/{AB}/mute", json={"muted": True}, headers=h).status_code == 204
    assert client.get("/internal/mutes/alice").get_json() == {"conversations": [AB]}
    assert get(client, "/v1/conversations").get_json()["conversations"][0]["muted"] is True
    assert client.put(f"/v1/conversations/{AB}/mute", json={"muted": False}, headers=h).status_code == 204
    assert client.get("/internal/mutes/alice").get_json() == {"conversations": []}
    bad = client.put(f"/v1/conversations/{AB}/mute", json={"muted": "yes"}, headers=h)
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_request"
    assert client.put(f"/v1/conversations/{AB}/mute", data="", headers=h).status_code == 400
    stranger = {"X-User-Id": "carol", "X-Device-Id": "d"}
    assert client.put(f"/v1/conversations/{AB}/mute", json={"muted": True}, headers=stranger).status_code == 403
