"""The group service through its HTTP routes and Kafka handlers, with in-memory storage and publisher."""

from __future__ import annotations

from typing import Any

import pytest
from chatlib.schemas import ChannelCreated, ChannelDeleted, GroupChanged, UserRegistered, UserUnregistered
from flask.testing import FlaskClient

from services.group.service import GroupConfig, GroupService

from .fakes import FakeGroupStore, FakeOwnedTopic, FakePublisher


@pytest.fixture
def service() -> GroupService:
    svc = GroupService(
        GroupConfig(user_wait_s=0, max_members=5, default_channel="lobby"),
        store=FakeGroupStore(),
        producer=FakePublisher(),
        owned=FakeOwnedTopic(),
    )
    svc.on_user_events(
        [UserRegistered(user_id=u, username=u, name=u) for u in ("alice", "bob", "carol", "dave", "eve")]
    )
    return svc


@pytest.fixture
def client(service: GroupService) -> FlaskClient:
    return service.create_app().test_client()


def call(client: FlaskClient, method: str, path: str, user: str, admin: bool = False, **kw: Any) -> Any:
    headers = {"X-User-Id": user, "X-Device-Id": "d-" + user}
    if admin:
        headers["X-User-Admin"] = "1"
    return client.open(path, method=method, headers=headers, **kw)


def changes(service: GroupService) -> list[GroupChanged]:
    return service.producer.of(GroupChanged)  # type: ignore[attr-defined,no-any-return]


def create(client: FlaskClient, owner: str = "alice", members: list[str] | None = None, public: bool = False) -> str:
    r = call(
        client,
        "POST",
        "/v1/groups",
        owner,
        json={"name": "team", "members": ["bob"] if members is None else members, "public": public},
    )
    assert r.status_code == 201, r.get_json()
    return str(r.get_json()["group_id"])


def test_create_stores_and_publishes(client: FlaskClient, service: GroupService) -> None:
    r = call(client, "POST", "/v1/groups", "alice", json={"name": " team ", "members": ["bob", "carol", "bob"]})
    assert r.status_code == 201
    body = r.get_json()
    assert body["name"] == "team" and body["owner"] == "alice" and body["public"] is False
    assert body["members"] == [
        {"user_id": "alice", "role": "owner"},
        {"user_id": "bob", "role": "member"},
        {"user_id": "carol", "role": "member"},
    ]
    ch = changes(service)[-1]
    assert ch.event == "created" and ch.group.group_id == body["group_id"] and ch.actor == "alice"
    assert set(ch.users) == {"alice", "bob", "carol"}
    topic, _, key = service.producer.sent[-1]  # type: ignore[attr-defined]
    assert topic == "group.changes.v1" and key == body["group_id"]
    assert service.store.get_pending() == []  # type: ignore[attr-defined]
    assert not [e for e in service.producer.of(ChannelCreated) if e.group_id == body["group_id"]]  # type: ignore[attr-defined]


def test_unknown_members_are_400_with_details(client: FlaskClient, service: GroupService) -> None:
    r = call(client, "POST", "/v1/groups", "alice", json={"name": "t", "members": ["bob", "ghost"]})
    assert r.status_code == 400
    err = r.get_json()["error"]
    assert err["code"] == "invalid_request" and err["details"] == {"unknown_members": ["ghost"]}
    service.on_user_events([UserUnregistered(user_id="eve")])
    r = call(client, "POST", "/v1/groups", "alice", json={"name": "t", "members": ["eve"]})
    assert r.status_code == 400 and r.get_json()["error"]["details"] == {"unknown_members": ["eve"]}


@pytest.mark.parametrize(
    "body",
    [
        {"members": []},
        {"name": "", "members": []},
        {"name": "x" * 101},
        {"name": "t", "public": "yes"},
        {"name": "t", "members": "bob"},
        {"name": "t"},  # members is required, if only as []
        {"name": "t", "members": None},
        {"name": "t", "members": [""]},
    ],
)
def test_create_validation(client: FlaskClient, body: dict[str, Any]) -> None:
    r = call(client, "POST", "/v1/groups", "alice", json=body)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_request"


def test_max_members_is_409(client: FlaskClient) -> None:
    r = call(
        client, "POST", "/v1/groups", "alice", json={"name": "t", "members": ["bob", "carol", "dave", "eve", "zed"]}
    )
    assert r.status_code == 409
    assert r.get_json()["error"] == {
        "code": "conflict",
        "message": "a group has at most 5 members",
        "details": {"max_members": 5},
    }
    gid = create(client, members=["bob", "carol", "dave"])
    r = call(client, "POST", f"/v1/groups/{gid}/members", "alice", json={"members": ["eve"]})
    assert r.status_code == 200 and len(r.get_json()["members"]) == 5
    r = call(client, "POST", f"/v1/groups/{gid}/members", "alice", json={"members": ["zed"]})
    assert r.status_code == 409


def test_read_access(client: FlaskClient) -> None:
    gid = create(client)
    assert call(client, "GET", f"/v1/groups/{gid}", "bob").status_code == 200
    r = call(client, "GET", f"/v1/groups/{gid}", "carol")
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    assert call(client, "GET", "/v1/groups/nope", "bob").status_code == 404
    assert call(client, "GET", "/v1/groups/x", "").status_code == 401
    pub = create(client, public=True)
    assert call(client, "GET", f"/v1/groups/{pub}", "carol").status_code == 200


def test_my_groups_and_public_groups(client: FlaskClient, service: GroupService) -> None:
    service.on_setup()
    private = create(client)
    public = create(client, owner="carol", members=["dave"], public=True)
    mine = [g["group_id"] for g in call(client, "GET", "/v1/groups", "bob").get_json()["groups"]]
    assert mine == [private]
    listed = call(client, "GET", "/v1/groups/public", "bob").get_json()["groups"]
    names = {g["name"]: g for g in listed}
    assert public in {g["group_id"] for g in listed} and private not in {g["group_id"] for g in listed}
    assert names["lobby"]["owner"] == "system" and names["lobby"]["public"] is True


def test_non_members_cannot_change_members(client: FlaskClient) -> None:
    gid = create(client, members=["bob", "carol"])
    for method, path, body in [
        ("POST", f"/v1/groups/{gid}/members", {"members": ["dave"]}),
        ("DELETE", f"/v1/groups/{gid}/members/bob", None),
        ("PATCH", f"/v1/groups/{gid}", {"name": "x"}),
        ("PUT", f"/v1/groups/{gid}/members/bob/role", {"role": "admin"}),
        ("DELETE", f"/v1/groups/{gid}", None),
        ("POST", f"/v1/groups/{gid}/join", None),
    ]:
        r = call(client, method, path, "dave", json=body)
        assert r.status_code == 403, (method, path, r.get_json())


def test_member_management_flow(client: FlaskClient, service: GroupService) -> None:
    gid = create(client, members=["bob", "carol"])
    # plain member may not add or remove others
    assert call(client, "POST", f"/v1/groups/{gid}/members", "bob", json={"members": ["dave"]}).status_code == 403
    assert call(client, "DELETE", f"/v1/groups/{gid}/members/carol", "bob").status_code == 403
    # owner promotes bob; bob (admin) adds dave, renames, removes carol
    r = call(client, "PUT", f"/v1/groups/{gid}/members/bob/role", "alice", json={"role": "admin"})
    assert r.status_code == 200 and {"user_id": "bob", "role": "admin"} in r.get_json()["members"]
    assert changes(service)[-1].event == "role_changed" and changes(service)[-1].users == ["bob"]
    r = call(client, "POST", f"/v1/groups/{gid}/members", "bob", json={"members": ["dave", "carol"]})
    assert r.status_code == 200 and changes(service)[-1].users == ["dave"]
    assert changes(service)[-1].event == "member_added"
    r = call(client, "PATCH", f"/v1/groups/{gid}", "bob", json={"name": "renamed"})
    assert r.status_code == 200 and r.get_json()["name"] == "renamed" and changes(service)[-1].event == "updated"
    assert call(client, "DELETE", f"/v1/groups/{gid}/members/carol", "bob").status_code == 204
    ch = changes(service)[-1]
    assert ch.event == "member_removed" and ch.users == ["carol"] and "carol" not in ch.group.member_ids()
    # admin cannot remove the owner nor change roles; owner cannot leave
    r = call(client, "DELETE", f"/v1/groups/{gid}/members/alice", "bob")
    assert r.status_code == 403
    assert call(client, "PUT", f"/v1/groups/{gid}/members/dave/role", "bob", json={"role": "admin"}).status_code == 403
    r = call(client, "DELETE", f"/v1/groups/{gid}/members/alice", "alice")
    assert r.status_code == 403 and "owner" in r.get_json()["error"]["message"]
    # demote, then dave leaves
    r = call(client, "PUT", f"/v1/groups/{gid}/members/bob/role", "alice", json={"role": "member"})
    assert {"user_id": "bob", "role": "member"} in r.get_json()["members"]
    assert call(client, "PUT", f"/v1/groups/{gid}/members/bob/role", "alice", json={"role": "owner"}).status_code == 400
    assert call(client, "DELETE", f"/v1/groups/{gid}/members/dave", "dave").status_code == 204
    assert changes(service)[-1].users == ["dave"] and changes(service)[-1].actor == "dave"
    # dave is no longer a member: reading is 403
    assert call(client, "GET", f"/v1/groups/{gid}", "dave").status_code == 403


def test_join_public_and_private(client: FlaskClient, service: GroupService) -> None:
    private = create(client)
    public = create(client, public=True)
    r = call(client, "POST", f"/v1/groups/{private}/join", "carol")
    assert r.status_code == 403
    r = call(client, "POST", f"/v1/groups/{public}/join", "carol")
    assert r.status_code == 200 and {"user_id": "carol", "role": "member"} in r.get_json()["members"]
    assert changes(service)[-1].event == "member_added" and changes(service)[-1].users == ["carol"]
    count = len(service.producer.sent)  # type: ignore[attr-defined]
    assert call(client, "POST", f"/v1/groups/{public}/join", "carol").status_code == 200
    assert len(service.producer.sent) == count  # type: ignore[attr-defined]
    assert call(client, "POST", "/v1/groups/nope/join", "carol").status_code == 404


def test_delete_by_owner_or_server_admin(client: FlaskClient, service: GroupService) -> None:
    gid = create(client, members=["bob"])
    assert call(client, "DELETE", f"/v1/groups/{gid}", "bob").status_code == 403
    assert call(client, "DELETE", f"/v1/groups/{gid}", "alice").status_code == 204
    ch = changes(service)[-1]
    assert ch.event == "deleted" and ch.group.deleted and set(ch.users) == {"alice", "bob"}
    assert call(client, "GET", f"/v1/groups/{gid}", "alice").status_code == 404
    assert call(client, "DELETE", f"/v1/groups/{gid}", "alice").status_code == 404
    pub = create(client, members=["bob"], public=True)
    assert [e.group_id for e in service.producer.of(ChannelCreated)][-1] == pub  # type: ignore[attr-defined]
    assert call(client, "DELETE", f"/v1/groups/{pub}", "root", admin=True).status_code == 204
    deleted = service.producer.of(ChannelDeleted)  # type: ignore[attr-defined]
    assert deleted[-1].group_id == pub and deleted[-1].actor == "root"


def test_default_channel_is_seeded_once(service: GroupService) -> None:
    service.on_setup()
    service.on_setup()
    channels = service.get_public_groups()
    assert [(g.name, g.owner) for g in channels] == [("lobby", "system")]
    assert len(service.producer.of(ChannelCreated)) == 1  # type: ignore[attr-defined]
    joined = service.join_group(channels[0].group_id, "bob")
    assert "bob" in joined.member_ids()


def test_default_channel_repaired_after_crash_between_marker_and_group(service: GroupService) -> None:
    service.store.set_seed("default_channel", "fixed-id")
    service.on_setup()
    assert service.store.get_group("fixed-id") is not None


def test_pending_changes_are_republished_on_start(service: GroupService) -> None:
    class Broken(FakePublisher):
        def publish(self, *a: Any, **kw: Any) -> None:
            raise OSError("broker away")

    working = service.producer
    service.producer = Broken()
    with pytest.raises(OSError):
        service.create_group("alice", "t", ["bob"], False)
    assert len(service.store.get_pending()) == 1
    service.producer = working
    service.republish_pending()
    assert changes(service)[-1].event == "created" and service.store.get_pending() == []


def test_every_group_is_republished_when_the_topic_lost_it(client: FlaskClient, service: GroupService) -> None:
    service.on_setup()  # the default channel
    kept = create(client, members=["bob"])
    renamed = create(client, members=["bob", "carol"])
    call(client, "PATCH", f"/v1/groups/{renamed}", "alice", json={"name": "renamed"})
    deleted = create(client, members=["bob"])
    call(client, "DELETE", f"/v1/groups/{deleted}", "alice")
    latest = {ch.group.group_id: ch for ch in changes(service)}
    service.producer.sent.clear()  # type: ignore[attr-defined]

    service.on_setup()  # the topic kept them
    assert changes(service) == []

    service.owned.lost = True  # type: ignore[attr-defined]
    service.on_setup()
    again = changes(service)
    # The very records the topic held: one per group, deleted ones too, each its group's latest change.
    assert {ch.group.group_id: ch for ch in again} == latest and len(again) == len(latest)
    assert {gid for gid in latest} >= {kept, renamed, deleted}
    assert all(key == ch.group.group_id for _, ch, key in service.producer.sent)  # type: ignore[attr-defined]


def test_a_group_stored_without_its_latest_change_is_republished_as_a_snapshot(service: GroupService) -> None:
    group = service.create_group("alice", "old", ["bob"], False)
    service.store.last.clear()  # type: ignore[attr-defined]
    service.producer.sent.clear()  # type: ignore[attr-defined]
    assert service.republish_all() == 1
    (ch,) = changes(service)
    assert ch.event == "updated" and ch.group == group and ch.users == []


def test_concurrent_change_is_retried(client: FlaskClient, service: GroupService) -> None:
    gid = create(client, members=["bob"])
    service.store.conflicts = 2  # type: ignore[attr-defined]
    r = call(client, "POST", f"/v1/groups/{gid}/members", "alice", json={"members": ["carol"]})
    assert r.status_code == 200 and "carol" in {m["user_id"] for m in r.get_json()["members"]}
    service.store.conflicts = 99  # type: ignore[attr-defined]
    r = call(client, "POST", f"/v1/groups/{gid}/members", "alice", json={"members": ["dave"]})
    assert r.status_code == 409


def test_unregistered_user_leaves_and_passes_ownership(client: FlaskClient, service: GroupService) -> None:
    owned = create(client, members=["bob", "carol"])
    call(client, "PUT", f"/v1/groups/{owned}/members/carol/role", "alice", json={"role": "admin"})
    member_of = create(client, owner="dave", members=["alice", "bob"])
    alone = create(client, members=[])
    service.on_user_events([UserUnregistered(user_id="alice")])
    g = service.store.get_group(owned)[0]  # type: ignore[index]
    assert g.owner == "carol" and "alice" not in g.member_ids()
    assert "alice" not in service.store.get_group(member_of)[0].member_ids()  # type: ignore[index]
    assert service.store.get_group(alone)[0].deleted  # type: ignore[index]
    by_group = {c.group.group_id: c for c in changes(service)[-3:]}
    assert by_group[owned].event == "member_removed" and set(by_group[owned].users) == {"alice", "carol"}
    assert by_group[member_of].users == ["alice"]
    assert by_group[alone].event == "deleted"
    # redelivered: nothing more happens
    before = len(service.producer.sent)  # type: ignore[attr-defined]
    service.on_user_events([UserUnregistered(user_id="alice")])
    assert len(service.producer.sent) == before  # type: ignore[attr-defined]
    # and alice can no longer be added
    r = call(client, "POST", f"/v1/groups/{owned}/members", "carol", json={"members": ["alice"]})
    assert r.status_code == 400
