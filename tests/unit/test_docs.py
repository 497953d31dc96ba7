"""The API reference: complete, consistent with the code, valid for the tools that read it.

- docs/asyncapi.yaml (the WebSocket frames and Kafka events) is generated from
  chatlib.schemas and chatlib.topics (``make docs``): these tests regenerate it,
  validate it against the official AsyncAPI JSON Schema and run the official
  parser on it (both from npm, installed by ``make setup``), and check that real
  frames and records match the payload schemas it documents.
- docs/openapi.yaml (the REST reference) is written by hand: every endpoint of the
  public contract is there, every error is documented with the error schema and
  the X-Request-Id header, and every example is valid.
- The pages Nginx serves at /docs/ and /docs/events load only local files.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml
from chatlib import schemas, topics
from jsonschema import Draft7Validator, Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from helper import gen_asyncapi
from helper.openapi import DOCS, ROOT, Operation, deref, load_spec, media_example, operations, resolve

SPEC = load_spec()
OPS = list(operations(SPEC))
NODE_MODULES = ROOT / "node_modules"

#: Every REST endpoint of the public contract (shared/api-contract.md) and the
#: additions the project made; none may disappear from the reference.
CONTRACT = {
    ("post", "/v1/auth/signup"),
    ("post", "/v1/auth/login"),
    ("post", "/v1/auth/refresh"),
    ("post", "/v1/auth/logout"),
    ("delete", "/v1/me"),
    ("get", "/v1/me"),
    ("patch", "/v1/me"),
    ("get", "/v1/users/{username}"),
    ("post", "/v1/contacts/sync"),
    ("get", "/v1/me/devices"),
    ("put", "/v1/me/devices/{device_id}/push-token"),
    ("delete", "/v1/me/devices/{device_id}"),
    ("post", "/v1/admin/users/{user_id}/disable"),
    ("post", "/v1/admin/users/{user_id}/enable"),
    ("post", "/v1/groups"),
    ("get", "/v1/groups"),
    ("get", "/v1/groups/public"),
    ("get", "/v1/groups/{id}"),
    ("patch", "/v1/groups/{id}"),
    ("post", "/v1/groups/{id}/members"),
    ("delete", "/v1/groups/{id}/members/{user_id}"),
    ("put", "/v1/groups/{id}/members/{user_id}/role"),
    ("post", "/v1/groups/{id}/join"),
    ("delete", "/v1/groups/{id}"),
    ("get", "/v1/conversations"),
    ("get", "/v1/conversations/{conversation}/messages"),
    ("put", "/v1/conversations/{conversation}/mute"),
    ("get", "/v1/sync"),
    ("get", "/v1/ws"),
}

# --------------------------------------------------------------------------
# the AsyncAPI document
# --------------------------------------------------------------------------

DOC: dict[str, Any] = yaml.safe_load(gen_asyncapi.ASYNCAPI.read_text(encoding="utf-8"))
MESSAGES: dict[str, Any] = DOC["components"]["messages"]
CHANNELS: dict[str, Any] = DOC["channels"]


def _installed(path: Path) -> Path:
    assert path.exists(), f"{path.relative_to(ROOT)} is missing: run make setup (it installs the npm packages)"
    return path


def test_asyncapi_is_up_to_date() -> None:
    assert gen_asyncapi.render() == gen_asyncapi.ASYNCAPI.read_text(encoding="utf-8"), "run make docs"
    assert gen_asyncapi.render() == gen_asyncapi.render(), "generation must be deterministic"
    assert gen_asyncapi.main(["--check"]) == 0


def _official_schema() -> dict[str, Any]:
    """The AsyncAPI JSON Schema of the document's version, as the @asyncapi/specs package ships it."""
    path = _installed(NODE_MODULES / "@asyncapi" / "specs" / "schemas" / f"{DOC['asyncapi']}.json")
    schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return schema


def test_asyncapi_is_valid_against_the_official_json_schema() -> None:
    assert DOC["asyncapi"].startswith("3.")
    validator = Draft7Validator(_official_schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in validator.iter_errors(DOC)]
    assert not errors, "\n".join(errors[:10])


def test_the_official_json_schema_catches_mistakes() -> None:
    """The validation above is not vacuous: the schema refuses what AsyncAPI 3 does not allow."""
    bad = copy.deepcopy(DOC)
    bad["operations"]["sendServerFrames"]["action"] = "publish"  # AsyncAPI 2 wording
    bad["channels"]["user.events.v1"]["bindings"]["kafka"]["partitions"] = 0
    bad["components"]["messages"]["user.registered"]["payload"]["type"] = "record"
    broken = {tuple(e.absolute_path)[:3] for e in Draft7Validator(_official_schema()).iter_errors(bad)}
    assert broken == {
        ("operations", "sendServerFrames"),
        ("channels", "user.events.v1"),
        ("components", "messages", "user.registered"),
    }


# The official parser (what the AsyncAPI React component at /docs/events runs) adds
# semantic rules the JSON Schema cannot express, e.g. that an operation's messages
# belong to its channel. It prints every diagnostic, one JSON object per line.
_PARSE = """
import { Parser } from '@asyncapi/parser';
import { readFileSync } from 'node:fs';
const { document, diagnostics } = await new Parser().parse(readFileSync(process.argv[1], 'utf8'));
for (const d of diagnostics) console.log(JSON.stringify({code: d.code, path: d.path.join('/'), message: d.message}));
if (!document) process.exit(1);
"""


def test_the_official_parser_reports_nothing() -> None:
    _installed(NODE_MODULES / "@asyncapi" / "parser")
    out = subprocess.run(
        ["node", "--input-type=module", "-e", _PARSE, str(gen_asyncapi.ASYNCAPI)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "", f"parser diagnostics:\n{out.stdout}"


def test_every_event_type_has_a_declared_topic() -> None:
    declared = {t.name for t in topics.ALL_TOPICS} | {topics.gateway_topic("<instance>").name}
    missing = set(schemas._REGISTRY) - set(topics.EVENT_TOPICS)
    assert not missing, f"add these event types to chatlib.topics.EVENT_TOPICS: {sorted(missing)}"
    stale = set(topics.EVENT_TOPICS) - set(schemas._REGISTRY)
    assert not stale, f"EVENT_TOPICS names unknown event types: {sorted(stale)}"
    for type_, names in topics.EVENT_TOPICS.items():
        assert names and set(names) <= declared, type_
    assert set(topics.TOPIC_KEYS) == declared


def _channel_of(topic: topics.Topic) -> dict[str, Any]:
    matches = [c for c in CHANNELS.values() if c.get("bindings", {}).get("kafka", {}).get("topic") == topic.name]
    assert len(matches) == 1, f"{topic.name}: {len(matches)} channels"
    return matches[0]


@pytest.mark.parametrize("topic", [*topics.ALL_TOPICS, topics.gateway_topic("<instance>")], ids=lambda t: t.name)
def test_every_topic_is_a_channel_with_its_key_partitions_and_compaction(topic: topics.Topic) -> None:
    channel = _channel_of(topic)
    kafka = channel["bindings"]["kafka"]
    assert kafka["partitions"] == topic.partitions
    assert kafka["topicConfiguration"]["cleanup.policy"] == (["compact"] if topic.compacted else ["delete"])
    assert f"Key: {topics.TOPIC_KEYS[topic.name]}." in channel["description"]
    assert channel["servers"] == [{"$ref": "#/servers/kafka"}]


@pytest.mark.parametrize("type_", list(schemas._REGISTRY))
def test_every_event_is_a_message_on_its_topics(type_: str) -> None:
    cls = schemas._REGISTRY[type_]
    message = MESSAGES[type_]
    record = message["payload"]["properties"]
    assert record["type"]["const"] == type_ and record["version"]["const"] == cls.VERSION
    assert record["payload"] == {"$ref": f"#/components/schemas/{cls.__name__}"}
    assert set(DOC["components"]["schemas"][cls.__name__]["properties"]) == set(cls.model_fields)
    for name in topics.EVENT_TOPICS[type_]:
        topic = next(t for t in [*topics.ALL_TOPICS, topics.gateway_topic("<instance>")] if t.name == name)
        assert type_ in _channel_of(topic)["messages"], f"{type_} not on {name}"
        assert topics.TOPIC_KEYS[name] in message["bindings"]["kafka"]["key"]["description"]


def test_every_frame_is_a_message_of_the_websocket_channel() -> None:
    ws = CHANNELS[gen_asyncapi.WEBSOCKET]
    assert ws["address"] == "/v1/ws"
    ops = DOC["operations"]
    for direction, frames, op in (
        ("client", schemas.CLIENT_FRAMES, ops["receiveClientFrames"]),
        ("server", schemas.SERVER_FRAMES, ops["sendServerFrames"]),
    ):
        keys = {f"{direction}.{t}" for t in frames}
        assert {k for k in ws["messages"] if k.startswith(direction)} == keys
        assert {m["$ref"].rsplit("/", 1)[-1] for m in op["messages"]} == keys
        for type_, model in frames.items():
            payload = MESSAGES[f"{direction}.{type_}"]["payload"]
            assert payload == {"$ref": f"#/components/schemas/{model.__name__}"}
            assert DOC["components"]["schemas"][model.__name__]["properties"]["type"]["const"] == type_


# --------------------------------------------------------------------------
# real frames and records against the documented payload schemas
# --------------------------------------------------------------------------

_REGISTRY = Registry().with_resource("urn:asyncapi", Resource.from_contents(DOC, default_specification=DRAFT7))


def _errors(message: str, value: Any) -> list[str]:
    """Where ``value`` breaks the payload schema of components.messages[message] (draft-07, as AsyncAPI 3)."""
    validator = Draft7Validator({"$ref": f"urn:asyncapi#/components/messages/{message}/payload"}, registry=_REGISTRY)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(value)]


CLIENT_SAMPLES = [
    '{"type": "message", "id": "c1", "to": "u_2", "body": "hi"}',
    '{"type": "message", "id": "c2", "group": "g_1", "body": "hi all"}',
    '{"type": "receipt", "conversation": "dm:u_1:u_2", "status": "read", "up_to_seq": 3}',
    '{"type": "typing", "conversation": "group:g_1", "state": "start"}',
    '{"type": "ping"}',
]


@pytest.mark.parametrize("text", CLIENT_SAMPLES)
def test_frames_the_gateway_accepts_match_their_documented_schema(text: str) -> None:
    frame = schemas.parse_client_frame(text)
    data = json.loads(text)
    assert _errors(f"client.{data['type']}", data) == [], type(frame).__name__


def test_frames_the_server_builds_match_their_documented_schema() -> None:
    owner = schemas.GroupMember(user_id="u_1", role="owner")
    group = schemas.GroupSnapshot(group_id="g_1", name="G", owner="u_1", members=[owner], created_ts=1)
    change = schemas.GroupChanged(group=group, event="created", users=["u_1"], actor="u_1", ts=2)
    message = schemas.StoredMessage(
        message_id="m_1",
        id="c1",
        conversation="dm:u_1:u_2",
        seq=1,
        sender="u_1",
        from_device="d_1",
        to="u_2",
        body="hi",
        ts=3,
    )
    frames = [
        schemas.ack_frame("c1", "m_1", "dm:u_1:u_2", 1, 3),
        message.frame(),
        schemas.receipt_frame("dm:u_1:u_2", "u_2", "delivered", 1),
        schemas.typing_frame("dm:u_1:u_2", "u_1", "stop"),
        schemas.presence_frame("u_1", False, 4),
        schemas.group_event_frame(change),
        schemas.error_frame("invalid_request", "body: must not be empty", "c9"),
        schemas.PONG_FRAME,
    ]
    assert {f["type"] for f in frames} == set(schemas.SERVER_FRAMES)
    for frame in frames:
        assert _errors(f"server.{frame['type']}", frame) == [], frame


def test_kafka_records_match_their_documented_schema() -> None:
    """Records as producers write them, including a tuple list, an alias, nested models and a map."""
    owner = schemas.GroupMember(user_id="u_1", role="owner", joined_ts=1)
    group = schemas.GroupSnapshot(group_id="g_1", name="G", owner="u_1", members=[owner], created_ts=1)
    stored = schemas.StoredMessage(
        message_id="m_1",
        id="c1",
        conversation="group:g_1",
        seq=7,
        sender="u_1",
        from_device="d_1",
        group="g_1",
        body="x",
        ts=3,
    )
    events: list[schemas.Event] = [
        schemas.GatewayHeartbeat(gateway="gw-1", connections=[("u_1", "d_1", "k_1")], ts=5),
        schemas.MessageStored(message=stored),
        schemas.GroupChanged(group=group, event="member_added", users=["u_2"], ts=6),
        schemas.Deliver(
            targets=[schemas.DeviceRef(user_id="u_1", device_id="d_1")], frames=[stored.frame()], sync={"group:g_1": 7}
        ),
        schemas.CloseDevice(user_id="u_1", device_id="d_1"),
    ]
    for ev in events:
        record = json.loads(schemas.to_bytes(ev, producer="test"))
        assert _errors(ev.TYPE, record) == [], ev.TYPE


def test_documented_schemas_refuse_what_the_code_refuses() -> None:
    assert _errors("client.receipt", {"type": "receipt", "conversation": "dm:a:b", "status": "seen", "up_to_seq": 1})
    assert _errors("server.ack", {"type": "ack", "id": "c1"})
    assert _errors("user.registered", {"type": "user.registered", "payload": {"user_id": "u_1"}})
    assert _errors(
        "user.registered", {"type": "user.updated", "payload": {"user_id": "u", "username": "n", "name": "N"}}
    )


# --------------------------------------------------------------------------
# the pages
# --------------------------------------------------------------------------


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [str(v) for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", ["index.html", "events.html"])
def test_pages_load_only_local_files(page: str) -> None:
    """No CDN: every script, style and link is a file Nginx serves from docs/ (vendor/ after make setup)."""
    parser = _Refs()
    parser.feed((DOCS / page).read_text(encoding="utf-8"))
    assert any(r.startswith("vendor/") and r.endswith(".js") for r in parser.refs)
    for ref in parser.refs:
        assert "//" not in ref and not ref.startswith("/"), f"{page}: {ref} is not relative to /docs/"
        target = {"./": "index.html", "events": "events.html"}.get(ref, ref)
        _installed(DOCS / target)


# --------------------------------------------------------------------------
# the OpenAPI file
# --------------------------------------------------------------------------


def test_openapi_covers_the_contract() -> None:
    documented = {(o.method, o.path) for o in OPS}
    assert CONTRACT <= documented, f"missing: {sorted(CONTRACT - documented)}"
    assert SPEC["openapi"].startswith("3.1")


def test_operation_ids_are_unique_and_tagged() -> None:
    ids = [o.id for o in OPS]
    assert len(ids) == len(set(ids))
    tags = {t["name"] for t in SPEC["tags"]}
    for o in OPS:
        assert o.op.get("tags") and set(o.op["tags"]) <= tags, o.id
        assert o.op.get("summary"), o.id


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_ref_resolves() -> None:
    for ref in _refs(SPEC):
        assert resolve(SPEC, {"$ref": ref}) is not None, ref


def test_path_parameters_match_templates() -> None:
    for o in OPS:
        in_path = set(re.findall(r"{(\w+)}", o.path))
        declared = {resolve(SPEC, p)["name"] for p in o.op.get("parameters", []) if resolve(SPEC, p)["in"] == "path"}
        assert in_path == declared, o.id


def _responses(o: Operation) -> dict[str, dict[str, Any]]:
    return {str(k): resolve(SPEC, v) for k, v in o.op["responses"].items()}


def test_every_error_uses_the_error_schema_and_every_response_the_request_id() -> None:
    error = SPEC["components"]["schemas"]["Error"]
    for o in OPS:
        for status, resp in _responses(o).items():
            if status == "101":
                continue
            assert "X-Request-Id" in resp.get("headers", {}), f"{o.id} {status}"
            if int(status) >= 400:
                schema = resolve(SPEC, resp["content"]["application/json"]["schema"])
                assert schema is error, f"{o.id} {status}"
            elif status == "204":
                assert "content" not in resp, o.id
            else:
                assert "application/json" in resp["content"], f"{o.id} {status}"


def test_auth_body_and_availability_errors_are_documented() -> None:
    for o in OPS:
        statuses = set(_responses(o))
        secured = o.op.get("security", SPEC["security"])
        assert "503" in statuses, o.id
        assert any(s.startswith(("1", "2")) for s in statuses), o.id
        if secured:
            assert "401" in statuses, o.id
        else:
            assert "429" in statuses, f"{o.id}: unauthenticated endpoints are rate limited"
        if "requestBody" in o.op:
            assert {"400", "413"} <= statuses, o.id


def _examples() -> list[tuple[str, Any, Any]]:
    found = []
    for o in OPS:
        body = o.op.get("requestBody")
        if body:
            media = resolve(SPEC, body)["content"]["application/json"]
            found.append((f"{o.id} request", media["schema"], media_example(SPEC, media)))
        for status, resp in _responses(o).items():
            media = resp.get("content", {}).get("application/json")
            if media and media_example(SPEC, media) is not None:
                found.append((f"{o.id} {status}", media["schema"], media_example(SPEC, media)))
    return found


def test_every_request_body_has_an_example() -> None:
    for o in OPS:
        if "requestBody" in o.op:
            media = resolve(SPEC, o.op["requestBody"])["content"]["application/json"]
            assert media_example(SPEC, media) is not None, o.id


@pytest.mark.parametrize(("where", "schema", "example"), _examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_examples_validate_against_their_schema(where: str, schema: Any, example: Any) -> None:
    Draft202012Validator.check_schema(deref(SPEC, schema))
    errors = list(Draft202012Validator(deref(SPEC, schema)).iter_errors(example))
    assert not errors, f"{where}: {errors[0].message}"


def test_schemas_use_the_contract_field_names() -> None:
    s = SPEC["components"]["schemas"]
    assert set(s["Tokens"]["required"]) == {"access_token", "refresh_token", "expires_in", "user_id", "device_id"}
    assert set(s["Group"]["required"]) == {"group_id", "name", "public", "owner", "members", "created_ts"}
    assert set(s["Message"]["required"]) >= {"message_id", "id", "conversation", "seq", "from", "from_device", "body"}
    assert set(s["UserInfo"]["required"]) == {"user_id", "username", "name", "online", "last_seen"}
    assert set(s["Device"]["required"]) == {"device_id", "device_type", "primary", "online", "last_seen"}
    assert set(s["SyncConversation"]["required"]) >= {"conversation", "read_seq", "delivered_seq", "unread", "messages"}
    assert set(s["Error"]["properties"]["error"]["required"]) == {"code", "message", "details"}


# --------------------------------------------------------------------------
# operations guide
# --------------------------------------------------------------------------


def test_operations_guide_explains_every_setting() -> None:
    env = (ROOT / ".env.tmpl").read_text(encoding="utf-8")
    guide = (DOCS / "operations.md").read_text(encoding="utf-8")
    names = re.findall(r"^([A-Z][A-Z0-9_]+)=", env, re.M)
    assert names
    missing = [n for n in names if f"`{n}`" not in guide]
    assert not missing, f"docs/operations.md does not explain: {missing}"
