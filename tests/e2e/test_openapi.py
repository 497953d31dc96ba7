"""docs/openapi.yaml checked against the running system, through Nginx.

Every documented operation is called as documented (fresh users, bodies built
from the documented examples, path parameters naming objects made first). Its
answer must be the documented success, carry ``X-Request-Id``, and have a JSON
body valid against the documented schema. Every secured operation must refuse
a call without a token with the documented 401, and every operation with a
body must refuse a malformed one with the documented 400. Finally, every route
a running service serves under /v1 that Nginx lets through must be documented.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
import requests
from chatlib.schemas import dm_conversation
from jsonschema import Draft202012Validator

from helper.openapi import ROOT, Operation, deref, load_spec, media_example, operations, resolve
from helper.stack import Stack
from tests.support import Api, User, new_user

SPEC = load_spec()
OPS: dict[str, Operation] = {o.id: o for o in operations(SPEC)}
SECURED = [o for o in OPS if OPS[o].op.get("security", SPEC["security"])]
WITH_BODY = [o for o in OPS if "requestBody" in OPS[o].op]


# --------------------------------------------------------------------------
# checking an answer against the reference
# --------------------------------------------------------------------------


def documented_responses(o: Operation) -> dict[str, dict[str, Any]]:
    return {str(k): resolve(SPEC, v) for k, v in o.op["responses"].items()}


def check_answer(o: Operation, resp: requests.Response) -> Any:
    """Assert the answer is documented; return its JSON body (None when it has none)."""
    where = f"{o.method.upper()} {o.path} ({o.id})"
    responses = documented_responses(o)
    status = str(resp.status_code)
    assert status in responses, f"{where}: status {status} is not documented {sorted(responses)}: {resp.text[:300]}"
    assert resp.headers.get("X-Request-Id"), f"{where}: no X-Request-Id header"
    media = responses[status].get("content", {}).get("application/json")
    if media is None:
        assert not resp.content, f"{where}: {status} is documented without a body, got {resp.text[:200]}"
        return None
    assert resp.headers.get("Content-Type", "").startswith("application/json"), f"{where}: not JSON"
    body = resp.json()
    errors = sorted(Draft202012Validator(deref(SPEC, media["schema"])).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, (
        f"{where}: {status} body does not match the documented schema: {errors[0].message} "
        f"at {list(errors[0].absolute_path)}; body={json.dumps(body)[:500]}"
    )
    return body


def example_body(o: Operation) -> dict[str, Any]:
    media = resolve(SPEC, o.op["requestBody"])["content"]["application/json"]
    example = media_example(SPEC, media)
    assert isinstance(example, dict), f"{o.id}: the request example must be an object"
    return copy.deepcopy(example)


def url_of(base: str, o: Operation, params: dict[str, str]) -> str:
    path = o.path
    for name, value in params.items():
        path = path.replace("{" + name + "}", quote(value, safe=":"))
    assert "{" not in path, f"{o.id}: path parameter missing in {path}"
    return base + path


# --------------------------------------------------------------------------
# the objects calls refer to
# --------------------------------------------------------------------------


@dataclass
class World:
    """Users, a group and a conversation with one message, made once for this module."""

    stack: Stack
    alice: User
    bob: User
    carol: User
    dm: str
    message_id: str
    admin_token: str

    @property
    def base(self) -> str:
        return self.stack.base_url

    def fresh_user(self) -> User:
        return new_user(self.base)

    def group(self, owner: User, members: list[User], public: bool = False) -> str:
        r = owner.api.post(
            "/v1/groups",
            json={"name": "g-" + uuid.uuid4().hex[:6], "members": [m.user_id for m in members], "public": public},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["group_id"])


@pytest.fixture(scope="module")
def world(stack: Stack) -> World:
    alice, bob, carol = (new_user(stack.base_url) for _ in range(3))
    r = Api(stack.base_url).post(
        "/v1/auth/login",
        json={"username": stack.env["ADMIN_USERNAME"], "password": stack.env["ADMIN_PASSWORD"], "device_type": "web"},
    )
    assert r.status_code == 200, r.text
    # One stored message, so history, the conversation list and sync have content.
    ws = alice.connect()
    try:
        cid = ws.send_message(to=bob.user_id, body="hello from the OpenAPI test")
        ack = ws.expect("ack", id=cid, timeout=15)
    finally:
        ws.close()
    return World(
        stack,
        alice,
        bob,
        carol,
        dm_conversation(alice.user_id, bob.user_id),
        ack["message_id"],
        r.json()["access_token"],
    )


@dataclass
class Call:
    """One documented call: who, which objects, which body fields differ from the example."""

    token: str | None
    expect: int
    path: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    then: Callable[[Any], None] | None = None
    websocket: User | None = None


def _login(w: World, user: User, **extra: Any) -> dict[str, Any]:
    r = Api(w.base).post("/v1/auth/login", json={"username": user.username, "password": user.password, **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _status(w: World, path: str, token: str) -> int:
    return Api(w.base, token).get(path).status_code


def s_signup(w: World) -> Call:
    name = "u" + uuid.uuid4().hex[:12]

    def then(body: Any) -> None:
        assert body["username"] == name
        _login(w, User(w.base, name, "correct horse battery", "", "", "", ""))

    return Call(None, 201, body={"username": name}, then=then)


def s_login(w: World) -> Call:
    def then(body: Any) -> None:
        assert body["user_id"] == w.bob.user_id
        assert _status(w, "/v1/me", body["access_token"]) == 200

    return Call(None, 200, body={"username": w.bob.username, "password": w.bob.password}, then=then)


def s_refresh(w: World) -> Call:
    tokens = _login(w, w.bob, device_type="web")

    def then(body: Any) -> None:
        assert body["device_id"] == tokens["device_id"]
        assert body["refresh_token"] != tokens["refresh_token"]
        again = Api(w.base).post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert again.status_code == 401, "a rotated refresh token still works"

    return Call(None, 200, body={"refresh_token": tokens["refresh_token"]}, then=then)


def s_logout(w: World) -> Call:
    token = _login(w, w.bob, device_type="web")["access_token"]
    return Call(token, 204, then=lambda _: _assert_eq(_status(w, "/v1/me", token), 401))


def _assert_eq(a: Any, b: Any) -> None:
    assert a == b, f"{a!r} != {b!r}"


def s_delete_account(w: World) -> Call:
    u = w.fresh_user()

    def then(_: Any) -> None:
        r = Api(w.base).post("/v1/auth/login", json={"username": u.username, "password": u.password})
        assert r.status_code == 401, r.text

    return Call(u.access_token, 204, body={"password": u.password}, then=then)


def s_get_me(w: World) -> Call:
    return Call(w.alice.access_token, 200, then=lambda b: _assert_eq(b["user_id"], w.alice.user_id))


def s_update_me(w: World) -> Call:
    # Carol's display name is not checked anywhere else in this module.
    return Call(
        w.carol.access_token,
        200,
        then=lambda b: _assert_eq((b["user_id"], b["name"]), (w.carol.user_id, "Alice Liddell")),
    )


def s_get_user(w: World) -> Call:
    return Call(
        w.alice.access_token,
        200,
        path={"username": w.bob.username},
        then=lambda b: _assert_eq(b["user_id"], w.bob.user_id),
    )


def s_sync_contacts(w: World) -> Call:
    wanted = [w.bob.username, w.carol.username, "nobody" + uuid.uuid4().hex[:8]]

    def then(body: Any) -> None:
        assert {c["user_id"] for c in body["contacts"]} == {w.bob.user_id, w.carol.user_id}

    return Call(w.alice.access_token, 200, body={"usernames": wanted}, then=then)


def s_list_devices(w: World) -> Call:
    return Call(
        w.alice.access_token,
        200,
        then=lambda b: _assert_eq(w.alice.device_id in {d["device_id"] for d in b["devices"]}, True),
    )


def s_set_push_token(w: World) -> Call:
    return Call(w.alice.access_token, 204, path={"device_id": w.alice.device_id})


def s_remove_device(w: World) -> Call:
    u = w.fresh_user()
    other = u.login_device("web")
    return Call(
        u.access_token,
        204,
        path={"device_id": other.device_id},
        then=lambda _: _assert_eq(_status(w, "/v1/me", other.access_token), 401),
    )


def s_disable_user(w: World) -> Call:
    u = w.fresh_user()

    def then(_: Any) -> None:
        r = Api(w.base).post("/v1/auth/login", json={"username": u.username, "password": u.password})
        assert r.status_code == 403, r.text

    return Call(w.admin_token, 204, path={"user_id": u.user_id}, then=then)


def s_enable_user(w: World) -> Call:
    u = w.fresh_user()
    r = Api(w.base, w.admin_token).post(f"/v1/admin/users/{u.user_id}/disable")
    assert r.status_code == 204, r.text

    def then(_: Any) -> None:
        _login(w, u)

    return Call(w.admin_token, 204, path={"user_id": u.user_id}, then=then)


def s_create_group(w: World) -> Call:
    def then(body: Any) -> None:
        roles = {m["user_id"]: m["role"] for m in body["members"]}
        assert roles == {w.alice.user_id: "owner", w.bob.user_id: "member", w.carol.user_id: "member"}

    return Call(w.alice.access_token, 201, body={"members": [w.bob.user_id, w.carol.user_id]}, then=then)


def s_list_groups(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])
    return Call(w.bob.access_token, 200, then=lambda b: _assert_eq(gid in {g["group_id"] for g in b["groups"]}, True))


def s_list_public_groups(w: World) -> Call:
    gid = w.group(w.alice, [], public=True)
    return Call(w.carol.access_token, 200, then=lambda b: _assert_eq(gid in {g["group_id"] for g in b["groups"]}, True))


def s_get_group(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])
    return Call(w.bob.access_token, 200, path={"id": gid}, then=lambda b: _assert_eq(b["group_id"], gid))


def s_update_group(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])
    return Call(w.alice.access_token, 200, path={"id": gid}, then=lambda b: _assert_eq(b["name"], "Long weekend trip"))


def s_delete_group(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])
    return Call(
        w.alice.access_token,
        204,
        path={"id": gid},
        then=lambda _: _assert_eq(_status(w, f"/v1/groups/{gid}", w.alice.access_token), 404),
    )


def s_add_members(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])

    def then(body: Any) -> None:
        assert w.carol.user_id in {m["user_id"] for m in body["members"]}

    return Call(w.alice.access_token, 200, path={"id": gid}, body={"members": [w.carol.user_id]}, then=then)


def s_remove_member(w: World) -> Call:
    gid = w.group(w.alice, [w.bob, w.carol])

    def then(_: Any) -> None:
        group = w.alice.api.get(f"/v1/groups/{gid}").json()
        assert w.bob.user_id not in {m["user_id"] for m in group["members"]}

    return Call(w.alice.access_token, 204, path={"id": gid, "user_id": w.bob.user_id}, then=then)


def s_set_member_role(w: World) -> Call:
    gid = w.group(w.alice, [w.bob])

    def then(body: Any) -> None:
        assert {m["user_id"]: m["role"] for m in body["members"]}[w.bob.user_id] == "admin"

    return Call(w.alice.access_token, 200, path={"id": gid, "user_id": w.bob.user_id}, then=then)


def s_join_group(w: World) -> Call:
    gid = w.group(w.alice, [], public=True)

    def then(body: Any) -> None:
        assert {m["user_id"]: m["role"] for m in body["members"]}.get(w.carol.user_id) == "member"

    return Call(w.carol.access_token, 200, path={"id": gid}, then=then)


def s_list_conversations(w: World) -> Call:
    def then(body: Any) -> None:
        mine = {c["conversation"]: c for c in body["conversations"]}
        assert w.dm in mine, f"{w.dm} missing from {list(mine)}"
        assert mine[w.dm]["last_message"]["message_id"] == w.message_id

    return Call(w.bob.access_token, 200, then=then)


def s_get_messages(w: World) -> Call:
    def then(body: Any) -> None:
        assert [m["message_id"] for m in body["messages"]] == [w.message_id]

    return Call(w.bob.access_token, 200, path={"conversation": w.dm}, query={"limit": 10}, then=then)


def s_mute(w: World) -> Call:
    return Call(w.bob.access_token, 204, path={"conversation": w.dm})


def s_sync(w: World) -> Call:
    def then(body: Any) -> None:
        mine = {c["conversation"]: c for c in body["conversations"]}
        assert w.dm in mine
        assert [m["message_id"] for m in mine[w.dm]["messages"]] == [w.message_id]

    return Call(w.alice.access_token, 200, query={"per_conversation": 5}, then=then)


def s_websocket(w: World) -> Call:
    return Call(w.carol.access_token, 101, websocket=w.carol)


SCENARIOS: dict[str, Callable[[World], Call]] = {
    "signup": s_signup,
    "login": s_login,
    "refreshTokens": s_refresh,
    "logout": s_logout,
    "deleteAccount": s_delete_account,
    "getMe": s_get_me,
    "updateMe": s_update_me,
    "getUser": s_get_user,
    "syncContacts": s_sync_contacts,
    "listDevices": s_list_devices,
    "setPushToken": s_set_push_token,
    "removeDevice": s_remove_device,
    "disableUser": s_disable_user,
    "enableUser": s_enable_user,
    "createGroup": s_create_group,
    "listGroups": s_list_groups,
    "listPublicGroups": s_list_public_groups,
    "getGroup": s_get_group,
    "updateGroup": s_update_group,
    "deleteGroup": s_delete_group,
    "addMembers": s_add_members,
    "removeMember": s_remove_member,
    "setMemberRole": s_set_member_role,
    "joinGroup": s_join_group,
    "listConversations": s_list_conversations,
    "getMessages": s_get_messages,
    "muteConversation": s_mute,
    "sync": s_sync,
    "openWebSocket": s_websocket,
}


def send(w: World, o: Operation, call: Call, raw_body: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {call.token}"} if call.token else {}
    kwargs: dict[str, Any] = {"params": call.query, "headers": headers, "timeout": 15}
    if raw_body is not None:
        kwargs["data"] = raw_body
        headers["Content-Type"] = "application/json"
    elif "requestBody" in o.op:
        body = example_body(o)
        body.update(call.body)
        kwargs["json"] = body
    return requests.request(o.method.upper(), url_of(w.base, o, call.path), **kwargs)


# --------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------


def test_every_documented_operation_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(OPS)


@pytest.mark.parametrize("op_id", list(OPS))
def test_operation_answers_as_documented(world: World, op_id: str) -> None:
    o = OPS[op_id]
    call = SCENARIOS[op_id](world)
    assert str(call.expect) in documented_responses(o), f"{op_id}: the scenario expects an undocumented status"
    if call.websocket is not None:
        ws = call.websocket.connect()
        try:
            assert ws.ws.getstatus() == call.expect
            ws.send({"type": "ping"})
            ws.expect("pong")
        finally:
            ws.close()
        return
    resp = send(world, o, call)
    body = check_answer(o, resp)
    assert resp.status_code == call.expect, (
        f"{op_id}: expected {call.expect}, got {resp.status_code}: {resp.text[:300]}"
    )
    if call.then is not None:
        call.then(body)


@pytest.mark.parametrize("op_id", SECURED)
def test_operation_without_token_is_401(stack: Stack, op_id: str) -> None:
    o = OPS[op_id]
    params = {p: "x" for p in re.findall(r"{(\w+)}", o.path)}
    resp = requests.request(o.method.upper(), url_of(stack.base_url, o, params), timeout=15)
    body = check_answer(o, resp)
    assert resp.status_code == 401
    assert body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("op_id", WITH_BODY)
def test_malformed_body_is_400(world: World, op_id: str) -> None:
    o = OPS[op_id]
    call = SCENARIOS[op_id](world)
    resp = send(world, o, call, raw_body="[1, 2")
    body = check_answer(o, resp)
    assert resp.status_code == 400, resp.text
    assert body["error"]["code"] == "invalid_request"


_LIST_ROUTES = r"""
import importlib, json, re, sys
from chatlib.config import load_config
found = []
for pkg in sys.argv[1:]:
    main = open(f"services/{pkg}/__main__.py").read()
    name = re.search(r"\brun\((\w+)\)", main).group(1)
    where = re.search(r"from\s+(\S+)\s+import[^\n]*\b" + name + r"\b", main)
    module = where.group(1) if where else ".service"
    mod = importlib.import_module(f"services.{pkg}{module}" if module.startswith(".") else module)
    cls = getattr(mod, name)
    app = cls(load_config(cls.config_class)).create_app()
    found += [[pkg, r.rule, sorted(r.methods - {"HEAD", "OPTIONS"})] for r in app.url_map.iter_rules()]
print(json.dumps(found))
"""


def served_routes(stack: Stack) -> list[tuple[str, str, str]]:
    """(service, method, rule) of every Flask route of every running service.

    One interpreter builds every service's app (no setup: nothing connects) with
    the environment the stack gives its processes; the gateway's includes its
    instance id, and each service reads only its own prefix.
    """
    packages = [name.replace("-", "_") for name in stack.service_names()]
    env = stack.service_env("gateway", 1)
    out = subprocess.run(
        [sys.executable, "-c", _LIST_ROUTES, *packages], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"cannot list the services' routes: {out.stderr[-2000:]}"
    return [(pkg, m, rule) for pkg, rule, methods in json.loads(out.stdout.strip().splitlines()[-1]) for m in methods]


def documented(method: str, path: str) -> bool:
    for o in OPS.values():
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(o.path)) + "$"
        if o.method == method.lower() and re.match(pattern, path):
            return True
    return False


def test_every_route_nginx_lets_through_is_documented(stack: Stack) -> None:
    routes = served_routes(stack)
    assert any(rule.startswith("/v1/") for _, _, rule in routes)
    undocumented = []
    for service, method, rule in routes:
        if not rule.startswith("/v1/"):
            continue
        path = re.sub(r"<(?:[^:>]+:)?[^>]+>", "x", rule)
        # Without a token Nginx answers 401 for what it routes to a service, and
        # 404 or 405 for what it keeps private (paths and methods the reference
        # does not have); nothing reaches a service unauthenticated but signup,
        # login and refresh, so the probe changes nothing.
        status = requests.request(method, stack.base_url + path, timeout=15).status_code
        if status not in (404, 405) and not documented(method, path):
            undocumented.append(f"{service}: {method} {rule} (answers {status})")
    assert not undocumented, "routes served through Nginx but not in docs/openapi.yaml: " + ", ".join(undocumented)


def test_reference_is_served_at_docs(stack: Stack) -> None:
    """Nginx serves the reference pages, both documents and the viewers' bundles (no token needed)."""
    docs = ROOT / "docs"
    r = requests.get(stack.base_url + "/docs", timeout=15, allow_redirects=False)
    assert r.status_code in (301, 302) and r.headers["Location"].endswith("/docs/")
    for path, local in (("/docs/", "index.html"), ("/docs/events", "events.html")):
        page = requests.get(stack.base_url + path, timeout=15)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html"), path
        assert page.content == (docs / local).read_bytes(), path
    for path, kind in (
        ("/docs/vendor/swagger-ui/swagger-ui-bundle.js", "application/javascript"),
        ("/docs/vendor/swagger-ui/swagger-ui.css", "text/css"),
        ("/docs/vendor/asyncapi/index.js", "application/javascript"),
        ("/docs/vendor/asyncapi/default.min.css", "text/css"),
    ):
        asset = requests.get(stack.base_url + path, timeout=15)
        assert asset.status_code == 200 and asset.headers["Content-Type"].startswith(kind), path
        assert asset.content == (docs / path.removeprefix("/docs/")).read_bytes(), path
    spec = requests.get(stack.base_url + "/docs/openapi.yaml", timeout=15)
    assert spec.status_code == 200 and "openapi: 3.1" in spec.text
    events = requests.get(stack.base_url + "/docs/asyncapi.yaml", timeout=15)
    assert events.status_code == 200 and events.content == (docs / "asyncapi.yaml").read_bytes()
