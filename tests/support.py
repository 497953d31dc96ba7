"""Client helpers for tests and benchmarks: a REST client and a WebSocket client.

They speak only the public contract through Nginx, as a mobile or web app would.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import websocket


class Api:
    """A thin REST client: ``api.post("/v1/auth/signup", json=..., token=...)``."""

    def __init__(self, base_url: str, token: str | None = None):
        self.base_url = base_url
        self.token = token
        self.http = requests.Session()

    def request(self, method: str, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}) or {})
        tok = token if token is not None else self.token
        if tok:
            headers.setdefault("Authorization", f"Bearer {tok}")
        return self.http.request(method, self.base_url + path, headers=headers, timeout=15, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def patch(self, path: str, **kw: Any) -> requests.Response:
        return self.request("PATCH", path, **kw)

    def put(self, path: str, **kw: Any) -> requests.Response:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.request("DELETE", path, **kw)


def unique_name(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@dataclass
class User:
    """A signed-up user with one logged-in device."""

    base_url: str
    username: str
    password: str
    user_id: str
    device_id: str
    access_token: str
    refresh_token: str
    name: str = ""
    sockets: list[WsClient] = field(default_factory=list)

    @property
    def api(self) -> Api:
        return Api(self.base_url, self.access_token)

    def login_device(self, device_type: str = "web", **extra: Any) -> User:
        """Log the same account in on another (new) device."""
        r = Api(self.base_url).post(
            "/v1/auth/login",
            json={"username": self.username, "password": self.password, "device_type": device_type, **extra},
        )
        r.raise_for_status()
        body = r.json()
        return User(
            self.base_url,
            self.username,
            self.password,
            self.user_id,
            body["device_id"],
            body["access_token"],
            body["refresh_token"],
            self.name,
        )

    def connect(self, ws_url: str | None = None, **kw: Any) -> WsClient:
        url = ws_url or self.base_url.replace("http://", "ws://") + "/v1/ws"
        ws = WsClient(url, self.access_token, **kw)
        self.sockets.append(ws)
        return ws


def new_user(base_url: str, device_type: str = "mobile", name: str | None = None) -> User:
    """Sign up a fresh user and log in one device."""
    api = Api(base_url)
    username = unique_name()
    password = "correct horse battery"
    r = api.post("/v1/auth/signup", json={"username": username, "password": password, "name": name or username})
    assert r.status_code == 201, r.text
    r = api.post("/v1/auth/login", json={"username": username, "password": password, "device_type": device_type})
    assert r.status_code == 200, r.text
    body = r.json()
    return User(
        base_url,
        username,
        password,
        body["user_id"],
        body["device_id"],
        body["access_token"],
        body["refresh_token"],
        name or username,
    )


class WsClient:
    """A WebSocket client with a reader thread; frames land in a queue.

    ``expect(type, **match)`` waits for the next frame of that type whose fields
    match, keeping unmatched frames for later calls. ``drop_duplicates`` drops a
    ``message`` whose (conversation, seq) was already seen, as the contract asks
    of clients.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        via_query: bool = False,
        origin: str | None = None,
        suppress_origin: bool = False,
        drop_duplicates: bool = True,
        timeout: float = 10,
        read_timeout: float | None = None,
    ):
        headers = []
        if token and not via_query:
            headers.append(f"Authorization: Bearer {token}")
        if token and via_query:
            url = f"{url}?token={token}"
        self.ws = websocket.create_connection(
            url, header=headers, origin=origin, suppress_origin=suppress_origin, timeout=timeout
        )
        # ``timeout`` bounds the handshake; reads must not time out, or the reader thread
        # would end after that long without a frame (an idle but healthy socket).
        self.ws.settimeout(read_timeout)
        self.frames: queue.Queue[dict[str, Any]] = queue.Queue()
        self.backlog: list[dict[str, Any]] = []
        self.seen: set[tuple[str, int]] = set()
        self.duplicates = 0
        self.drop_duplicates = drop_duplicates
        self.closed = threading.Event()
        self.close_reason: str | None = None
        #: The close code the server sent (RFC 6455 section 7.4), once the socket is closed.
        self.close_code: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                opcode, data = self.ws.recv_data()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    self.close_reason = data[2:].decode(errors="replace") if len(data) > 2 else ""
                    break
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                frame = json.loads(data)
                if frame.get("type") == "message" and self.drop_duplicates:
                    key = (frame["conversation"], frame["seq"])
                    if key in self.seen:
                        self.duplicates += 1
                        continue
                    self.seen.add(key)
                self.frames.put(frame)
        except Exception:
            pass
        finally:
            self.closed.set()

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def send_message(
        self, to: str | None = None, body: str = "hi", group: str | None = None, cid: str | None = None
    ) -> str:
        cid = cid or uuid.uuid4().hex
        frame: dict[str, Any] = {"type": "message", "id": cid, "body": body}
        if group:
            frame["group"] = group
        else:
            frame["to"] = to
        self.send(frame)
        return cid

    def expect(
        self, type_: str, timeout: float = 10, where: Callable[[dict[str, Any]], bool] | None = None, **match: Any
    ) -> dict[str, Any]:
        def ok(f: dict[str, Any]) -> bool:
            return (
                f.get("type") == type_ and all(f.get(k) == v for k, v in match.items()) and (where is None or where(f))
            )

        for i, f in enumerate(self.backlog):
            if ok(f):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {type_} frame matching {match} within {timeout}s; backlog={self.backlog[-10:]}"
                )
            try:
                f = self.frames.get(timeout=left)
            except queue.Empty:
                continue
            if ok(f):
                return f
            self.backlog.append(f)

    def collect(self, type_: str, count: int, timeout: float = 20, **match: Any) -> list[dict[str, Any]]:
        return [self.expect(type_, timeout=timeout, **match) for _ in range(count)]

    def nothing(self, type_: str, seconds: float = 1.0, **match: Any) -> bool:
        """True if no matching frame arrives within ``seconds``."""
        try:
            self.expect(type_, timeout=seconds, **match)
        except AssertionError:
            return True
        return False

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def topic_events(
    bootstrap: str,
    topic: str,
    key: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 10,
) -> list[dict[str, Any]]:
    """Envelopes (as dicts) of the records keyed ``key`` on ``topic``, read from the start
    until ``until(envelopes)`` holds; raises AssertionError after ``timeout`` seconds."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                found += [json.loads(r.value) for r in records if r.key == key.encode()]
            if until(found):
                return found
        kinds = [e.get("type") for e in found]
        raise AssertionError(f"records keyed {key} on {topic} never satisfied the condition: {kinds}")
    finally:
        consumer.close()


def eventually(check: Callable[[], bool], timeout: float = 15, what: str | Callable[[], str] = "condition") -> None:
    """Wait until ``check()`` is true; fail with ``what`` (or what it returns then) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what() if callable(what) else what} not reached within {timeout}s")


def online(u: User, timeout: float = 15) -> WsClient:
    """Connect a socket and wait until the system lists the device as online."""
    ws = u.connect()

    def seen() -> bool:
        devices = u.api.get("/v1/me/devices").json().get("devices", [])
        return any(d["device_id"] == u.device_id and d["online"] for d in devices)

    eventually(seen, timeout=timeout, what=f"device {u.device_id} online")
    return ws


def dm_id(a: User, b: User) -> str:
    """The contract's 1-to-1 conversation id: the two user ids sorted."""
    x, y = sorted((a.user_id, b.user_id))
    return f"dm:{x}:{y}"


def send_acked(ws: WsClient, to: User, body: str = "hi", cid: str | None = None) -> dict[str, Any]:
    """Send one message and return its ack."""
    cid = ws.send_message(to=to.user_id, body=body, cid=cid)
    return ws.expect("ack", id=cid)


def history(u: User, conversation: str, query: str = "") -> Any:
    r = u.api.get(f"/v1/conversations/{conversation}/messages{query}")
    assert r.status_code == 200, r.text
    return r.json()
