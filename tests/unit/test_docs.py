"""The API reference: generated files up to date, complete, consistent with the code.

docs/api.html and docs/events.md are generated (``make docs``) from
docs/openapi.yaml and chatlib.schemas/chatlib.topics; these tests regenerate
them in memory, so a change to an event class or to the OpenAPI file without
``make docs`` fails here. They also check the OpenAPI file itself: every
endpoint of the public contract is there, every error is documented with the
error schema and the X-Request-Id header, and every example is valid.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest
from chatlib import schemas, topics
from jsonschema import Draft202012Validator

from helper import gen_docs
from helper.gen_docs import deref, load_spec, operations, resolve

SPEC = load_spec()
OPS = list(operations(SPEC))

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
# generated files
# --------------------------------------------------------------------------


def test_generated_docs_are_up_to_date() -> None:
    for path, text in gen_docs.render_all().items():
        assert path.exists(), f"{path.name} is missing: run make docs"
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is out of date: run make docs"


def test_generation_is_deterministic() -> None:
    assert gen_docs.render_all() == gen_docs.render_all()


def test_check_mode_reports_up_to_date_files() -> None:
    assert gen_docs.main(["--check"]) == 0


def test_every_registered_event_type_is_in_events_md() -> None:
    text = gen_docs.EVENTS_MD.read_text(encoding="utf-8")
    assert schemas._REGISTRY, "no event registered"
    for type_, cls in schemas._REGISTRY.items():
        assert f"#### `{type_}` ({cls.__name__})" in text, type_
        assert f'<a id="event-{type_}"></a>' in text, type_
        for name in cls.model_fields:
            assert f"| `{name}` |" in text, f"{type_}.{name}"


def test_every_event_type_has_a_declared_topic() -> None:
    declared = {t.name for t in topics.ALL_TOPICS} | {topics.gateway_topic("<instance>").name}
    missing = set(schemas._REGISTRY) - set(topics.EVENT_TOPICS)
    assert not missing, f"add these event types to chatlib.topics.EVENT_TOPICS: {sorted(missing)}"
    stale = set(topics.EVENT_TOPICS) - set(schemas._REGISTRY)
    assert not stale, f"EVENT_TOPICS names unknown event types: {sorted(stale)}"
    for type_, names in topics.EVENT_TOPICS.items():
        assert names and set(names) <= declared, type_
    assert set(topics.TOPIC_KEYS) == declared


def test_every_frame_is_documented() -> None:
    text = gen_docs.EVENTS_MD.read_text(encoding="utf-8")
    for type_, model in schemas.CLIENT_FRAMES.items():
        assert f"#### `{type_}` ({model.__name__})" in text
    builders = [
        n for n, f in vars(schemas).items() if n.endswith("_frame") and callable(f) and n != "parse_client_frame"
    ]
    assert len(builders) >= 6
    for name in builders:
        assert f"({name}())" in text, name
    for type_ in ("message", "pong", "ack", "receipt", "typing", "presence", "group_event", "error"):
        assert f"#### `{type_}` (" in text


def test_client_frame_examples_are_valid_frames() -> None:
    """The examples in the docs are accepted by the gateway's own parser."""
    text = gen_docs.EVENTS_MD.read_text(encoding="utf-8")
    client = text.split("### Client to server")[1].split("### Server to client")[0]
    examples = re.findall(r"```json\n(.*?)\n```", client, re.S)
    assert len(examples) == len(schemas.CLIENT_FRAMES)
    for example in examples:
        schemas.parse_client_frame(example)


def test_event_examples_parse_as_their_event() -> None:
    for type_, cls in schemas._REGISTRY.items():
        payload = gen_docs.sample_model(cls).model_dump(mode="json")
        env = schemas.Envelope(type=type_, payload=payload)
        assert isinstance(schemas.from_bytes(env.to_bytes()), cls)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.tags: set[str] = set()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if a.get("href"):
            self.hrefs.append(str(a["href"]))
        if a.get("src"):
            self.srcs.append(str(a["src"]))


def test_api_html_is_self_contained_and_links_resolve() -> None:
    page = _Page()
    page.feed(gen_docs.API_HTML.read_text(encoding="utf-8"))
    assert "script" not in page.tags and "link" not in page.tags and not page.srcs
    assert "nav" in page.tags
    for href in page.hrefs:
        if href.startswith("#"):
            assert href[1:] in page.ids, f"dangling link {href}"
        else:
            assert href in ("openapi.yaml", "events.md"), f"external link {href}"
    for o in OPS:
        assert f"op-{o.id}" in page.ids
        assert f"#op-{o.id}" in page.hrefs, f"{o.id} missing from the table of contents"
    for type_ in schemas._REGISTRY:
        assert f"event-{type_}" in page.ids
    for name in SPEC["components"]["schemas"]:
        assert f"schema-{name}" in page.ids


def test_inline_markup() -> None:
    assert gen_docs.inline_html("a `x<y>` **b** *c* [d](#e)") == (
        'a <code>x&lt;y&gt;</code> <strong>b</strong> <em>c</em> <a href="#e">d</a>'
    )


def test_type_names() -> None:
    assert gen_docs.type_name(str | None) == "string | null"
    assert gen_docs.type_name(list[schemas.DeviceRef]) == "array of [DeviceRef](#model-DeviceRef)"
    assert gen_docs.type_name(schemas.ClientReceipt.model_fields["status"].annotation) == '"delivered" | "read"'


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


def _responses(o: gen_docs.Operation) -> dict[str, dict[str, Any]]:
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
            found.append((f"{o.id} request", media["schema"], gen_docs.media_example(SPEC, media)))
        for status, resp in _responses(o).items():
            media = resp.get("content", {}).get("application/json")
            if media and gen_docs.media_example(SPEC, media) is not None:
                found.append((f"{o.id} {status}", media["schema"], gen_docs.media_example(SPEC, media)))
    return found


def test_every_request_body_has_an_example() -> None:
    for o in OPS:
        if "requestBody" in o.op:
            media = resolve(SPEC, o.op["requestBody"])["content"]["application/json"]
            assert gen_docs.media_example(SPEC, media) is not None, o.id


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
    env = (gen_docs.ROOT / ".env.tmpl").read_text(encoding="utf-8")
    guide = (gen_docs.DOCS / "operations.md").read_text(encoding="utf-8")
    names = re.findall(r"^([A-Z][A-Z0-9_]+)=", env, re.M)
    assert names
    missing = [n for n in names if f"`{n}`" not in guide]
    assert not missing, f"docs/operations.md does not explain: {missing}"
