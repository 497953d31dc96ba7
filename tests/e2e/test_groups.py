"""Groups and channels, black-box through Nginx: REST, permissions, group_event frames, group messaging."""

from __future__ import annotations

import uuid
from typing import Any

import requests

from helper.stack import Stack
from tests.support import Api, User, eventually, new_user, online


def ok(r: requests.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def error(r: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


def create(owner: User, members: list[User], public: bool = False, name: str = "team") -> dict[str, Any]:
    body = {"name": name, "members": [m.user_id for m in members], "public": public}
    return ok(owner.api.post("/v1/groups", json=body), 201)  # type: ignore[no-any-return]


def roles(group: dict[str, Any]) -> dict[str, str]:
    return {m["user_id"]: m["role"] for m in group["members"]}


def test_create_read_add_remove_leave_delete(stack: Stack) -> None:
    a, b, c = (new_user(stack.base_url) for _ in range(3))
    g = create(a, [b], name="  planning  ")
    gid = g["group_id"]
    assert g["name"] == "planning" and g["public"] is False and g["owner"] == a.user_id
    assert roles(g) == {a.user_id: "owner", b.user_id: "member"} and isinstance(g["created_ts"], int)

    assert ok(b.api.get(f"/v1/groups/{gid}"))["group_id"] == gid
    assert gid in [x["group_id"] for x in ok(b.api.get("/v1/groups"))["groups"]]
    error(c.api.get(f"/v1/groups/{gid}"), 403, "forbidden")
    assert gid not in [x["group_id"] for x in ok(c.api.get("/v1/groups"))["groups"]]
    error(c.api.get("/v1/groups/no-such-group"), 404, "not_found")

    assert roles(ok(a.api.post(f"/v1/groups/{gid}/members", json={"members": [c.user_id]})))[c.user_id] == "member"
    assert ok(c.api.get(f"/v1/groups/{gid}"))["group_id"] == gid
    assert ok(a.api.patch(f"/v1/groups/{gid}", json={"name": "renamed"}))["name"] == "renamed"
    error(b.api.patch(f"/v1/groups/{gid}", json={"name": "nope"}), 403, "forbidden")

    assert a.api.delete(f"/v1/groups/{gid}/members/{c.user_id}").status_code == 204
    error(c.api.get(f"/v1/groups/{gid}"), 403, "forbidden")
    assert b.api.delete(f"/v1/groups/{gid}/members/{b.user_id}").status_code == 204  # leave
    err = error(a.api.delete(f"/v1/groups/{gid}/members/{a.user_id}"), 403, "forbidden")
    assert "owner" in err["message"]
    assert roles(ok(a.api.get(f"/v1/groups/{gid}"))) == {a.user_id: "owner"}

    error(b.api.delete(f"/v1/groups/{gid}"), 403, "forbidden")
    assert a.api.delete(f"/v1/groups/{gid}").status_code == 204
    error(a.api.get(f"/v1/groups/{gid}"), 404, "not_found")
    assert gid not in [x["group_id"] for x in ok(a.api.get("/v1/groups"))["groups"]]


def test_bad_requests(stack: Stack, user: User) -> None:
    err = error(user.api.post("/v1/groups", json={"name": "t", "members": ["no-such-user"]}), 400, "invalid_request")
    assert err["details"] == {"unknown_members": ["no-such-user"]}
    error(user.api.post("/v1/groups", json={"name": "", "members": []}), 400, "invalid_request")
    error(user.api.post("/v1/groups", json={"name": "x" * 101, "members": []}), 400, "invalid_request")
    error(Api(stack.base_url).get("/v1/groups"), 401, "unauthorized")


def test_non_members_cannot_change_members(stack: Stack) -> None:
    a, b, outsider = (new_user(stack.base_url) for _ in range(3))
    gid = create(a, [b])["group_id"]
    error(outsider.api.post(f"/v1/groups/{gid}/members", json={"members": [outsider.user_id]}), 403, "forbidden")
    error(outsider.api.delete(f"/v1/groups/{gid}/members/{b.user_id}"), 403, "forbidden")
    error(outsider.api.post(f"/v1/groups/{gid}/join"), 403, "forbidden")
    error(b.api.post(f"/v1/groups/{gid}/members", json={"members": [outsider.user_id]}), 403, "forbidden")
    assert set(roles(ok(a.api.get(f"/v1/groups/{gid}")))) == {a.user_id, b.user_id}


def test_promote_and_demote(stack: Stack) -> None:
    a, b, c, d = (new_user(stack.base_url) for _ in range(4))
    gid = create(a, [b, c])["group_id"]
    error(b.api.put(f"/v1/groups/{gid}/members/{c.user_id}/role", json={"role": "admin"}), 403, "forbidden")
    g = ok(a.api.put(f"/v1/groups/{gid}/members/{b.user_id}/role", json={"role": "admin"}))
    assert roles(g)[b.user_id] == "admin"
    # an admin adds and removes members, but cannot remove the owner or change roles
    assert d.user_id in roles(ok(b.api.post(f"/v1/groups/{gid}/members", json={"members": [d.user_id]})))
    assert b.api.delete(f"/v1/groups/{gid}/members/{d.user_id}").status_code == 204
    error(b.api.delete(f"/v1/groups/{gid}/members/{a.user_id}"), 403, "forbidden")
    error(b.api.put(f"/v1/groups/{gid}/members/{c.user_id}/role", json={"role": "admin"}), 403, "forbidden")
    error(a.api.put(f"/v1/groups/{gid}/members/{b.user_id}/role", json={"role": "owner"}), 400, "invalid_request")
    g = ok(a.api.put(f"/v1/groups/{gid}/members/{b.user_id}/role", json={"role": "member"}))
    assert roles(g)[b.user_id] == "member"
    error(b.api.post(f"/v1/groups/{gid}/members", json={"members": [d.user_id]}), 403, "forbidden")


def test_public_groups_and_the_default_channel(stack: Stack) -> None:
    a, b = new_user(stack.base_url), new_user(stack.base_url)
    listed = ok(b.api.get("/v1/groups/public"))["groups"]
    general = [g for g in listed if g["name"] == "general" and g["owner"] == "system"]
    assert len(general) == 1 and general[0]["public"] is True
    joined = ok(b.api.post(f"/v1/groups/{general[0]['group_id']}/join"))
    assert roles(joined)[b.user_id] == "member"
    assert ok(b.api.post(f"/v1/groups/{general[0]['group_id']}/join"))["group_id"] == general[0]["group_id"]
    assert general[0]["group_id"] in [g["group_id"] for g in ok(b.api.get("/v1/groups"))["groups"]]

    pub = create(a, [], public=True, name="open")
    private = create(a, [], name="closed")
    ids = [g["group_id"] for g in ok(b.api.get("/v1/groups/public"))["groups"]]
    assert pub["group_id"] in ids and private["group_id"] not in ids
    assert ok(b.api.get(f"/v1/groups/{pub['group_id']}"))["public"] is True  # readable before joining
    assert b.user_id in roles(ok(b.api.post(f"/v1/groups/{pub['group_id']}/join")))
    error(b.api.post(f"/v1/groups/{private['group_id']}/join"), 403, "forbidden")
    assert b.api.delete(f"/v1/groups/{pub['group_id']}/members/{b.user_id}").status_code == 204


def test_server_admin_deletes_any_group(stack: Stack) -> None:
    a = new_user(stack.base_url)
    gid = create(a, [], public=True, name="to-delete")["group_id"]
    login = Api(stack.base_url).post(
        "/v1/auth/login", json={"username": stack.env["ADMIN_USERNAME"], "password": stack.env["ADMIN_PASSWORD"]}
    )
    admin = Api(stack.base_url, ok(login)["access_token"])
    assert admin.delete(f"/v1/groups/{gid}").status_code == 204
    error(a.api.get(f"/v1/groups/{gid}"), 404, "not_found")


def test_unregistered_owner_passes_the_group_on(stack: Stack) -> None:
    a, b, c = (new_user(stack.base_url) for _ in range(3))
    gid = create(a, [b, c])["group_id"]
    ok(a.api.put(f"/v1/groups/{gid}/members/{c.user_id}/role", json={"role": "admin"}))
    assert a.api.delete("/v1/me", json={"password": a.password}).status_code == 204

    def passed_on() -> bool:
        g = b.api.get(f"/v1/groups/{gid}").json()
        return g.get("owner") == c.user_id and a.user_id not in roles(g)

    eventually(passed_on, timeout=10, what="ownership passed to the admin")
    assert roles(ok(b.api.get(f"/v1/groups/{gid}")))[c.user_id] == "owner"


def test_group_event_frames(stack: Stack) -> None:
    a, b, c = (new_user(stack.base_url) for _ in range(3))
    wb, wc = online(b, timeout=10), online(c, timeout=10)
    try:
        gid = create(a, [b])["group_id"]
        f = wb.expect("group_event", group_id=gid, event="created")
        assert f["group"]["owner"] == a.user_id and f["actor"] == a.user_id

        ok(a.api.post(f"/v1/groups/{gid}/members", json={"members": [c.user_id]}))
        for ws in (wb, wc):
            f = ws.expect("group_event", group_id=gid, event="member_added")
            assert f["users"] == [c.user_id]

        assert a.api.delete(f"/v1/groups/{gid}/members/{c.user_id}").status_code == 204
        for ws in (wb, wc):  # the removed user is told too
            f = ws.expect("group_event", group_id=gid, event="member_removed")
            assert f["users"] == [c.user_id] and c.user_id not in roles(f["group"])

        ok(a.api.put(f"/v1/groups/{gid}/members/{b.user_id}/role", json={"role": "admin"}))
        assert wb.expect("group_event", group_id=gid, event="role_changed")["users"] == [b.user_id]

        assert a.api.delete(f"/v1/groups/{gid}").status_code == 204
        wb.expect("group_event", group_id=gid, event="deleted")
        assert wc.nothing("group_event", seconds=0.5, group_id=gid, event="deleted")
    finally:
        wb.close()
        wc.close()


def test_group_message_reaches_every_online_device(stack: Stack) -> None:
    a, b, c = (new_user(stack.base_url) for _ in range(3))
    a2, b2 = a.login_device("web"), b.login_device("web")
    sockets = {name: online(u, timeout=10) for name, u in {"a1": a, "a2": a2, "b1": b, "b2": b2, "c1": c}.items()}
    try:
        gid = create(a, [b, c])["group_id"]
        for ws in sockets.values():
            ws.expect("group_event", group_id=gid, event="created")
        body = f"hello group {uuid.uuid4().hex}"
        cid = sockets["a1"].send_message(group=gid, body=body)
        ack = sockets["a1"].expect("ack", id=cid)
        assert ack["conversation"] == f"group:{gid}"
        for name in ("a2", "b1", "b2", "c1"):
            m = sockets[name].expect("message", id=cid)
            assert (m["group"], m["from"], m["body"], m["seq"]) == (gid, a.user_id, body, ack["seq"])
            assert m["conversation"] == f"group:{gid}" and m["from_device"] == a.device_id
        assert sockets["a1"].nothing("message", seconds=0.5, id=cid)  # the sender's device has the ack

        # typing and read receipts go to the other members
        sockets["b1"].send({"type": "typing", "conversation": f"group:{gid}", "state": "start"})
        for name in ("a1", "c1"):
            assert sockets[name].expect("typing", conversation=f"group:{gid}")["user_id"] == b.user_id
        sockets["b1"].send(
            {"type": "receipt", "conversation": f"group:{gid}", "status": "read", "up_to_seq": ack["seq"]}
        )
        for name in ("a1", "a2", "b2"):
            r = sockets[name].expect("receipt", conversation=f"group:{gid}", user_id=b.user_id, status="read")
            assert r["up_to_seq"] == ack["seq"]
    finally:
        for ws in sockets.values():
            ws.close()


def test_non_member_cannot_read_history_or_post(stack: Stack) -> None:
    a, outsider = new_user(stack.base_url), new_user(stack.base_url)
    gid = create(a, [])["group_id"]
    error(outsider.api.get(f"/v1/conversations/group:{gid}/messages"), 403, "forbidden")
    ws = online(outsider, timeout=10)
    try:
        cid = ws.send_message(group=gid, body="let me in")
        assert ws.expect("error", ref=cid)["code"] == "forbidden"
    finally:
        ws.close()
