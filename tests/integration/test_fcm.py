"""The real firebase-admin request path, against a fake FCM HTTP v1 server on loopback.

firebase-admin has no emulator for FCM: the test points
``messaging._MessagingService.FCM_URL`` at a local server before the app's
messaging service is first used, and initialises the app with a static-token
credential and a project id. The push service runs with its real sender
(:class:`FcmSender`) and real storage (the stack's MongoDB, a database of
its own), so the unregistered case is checked end to end: token dropped,
outcome recorded.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import firebase_admin
import pytest
from chatlib.schemas import DevicePushToken, DeviceRegistered, PushRequest, UserRegistered
from firebase_admin import credentials, messaging
from google.oauth2.credentials import Credentials as OAuthCredentials
from pymongo import MongoClient

from helper.stack import Stack
from services.push_notification.clients import FcmSender
from services.push_notification.logic import Notification
from services.push_notification.service import PushConfig, PushNotification
from services.push_notification.storage import PushStore, token_hash

PROJECT = "chat-test-project"
ACCESS_TOKEN = "static-test-access-token"
DEAD_TOKEN = "token-of-an-uninstalled-app"


class StaticCredential(credentials.Base):
    """A credential whose OAuth2 access token is fixed (no Google round trip)."""

    def get_credential(self) -> OAuthCredentials:
        return OAuthCredentials(token=ACCESS_TOKEN)


class FakeFcm:
    """Answers like FCM's HTTP v1 ``messages:send``; one chosen token is UNREGISTERED."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                )
                if body["message"]["token"] == DEAD_TOKEN:
                    status, answer = (
                        404,
                        {
                            "error": {
                                "code": 404,
                                "message": "Requested entity was not found.",
                                "status": "NOT_FOUND",
                                "details": [
                                    {
                                        "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                        "errorCode": "UNREGISTERED",
                                    }
                                ],
                            }
                        },
                    )
                else:
                    status, answer = 200, {"name": f"projects/{PROJECT}/messages/{len(fake.requests)}"}
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fcm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFcm]:
    fake = FakeFcm()
    monkeypatch.setattr(messaging._MessagingService, "FCM_URL", fake.url + "/v1/projects/{0}/messages:send")
    yield fake
    fake.close()


@pytest.fixture
def sender(fcm: FakeFcm) -> Iterator[FcmSender]:
    # A fresh app per test: its messaging service is built (reading FCM_URL) on first use.
    app = firebase_admin.initialize_app(StaticCredential(), {"projectId": PROJECT}, name=f"test-{uuid.uuid4().hex}")
    yield FcmSender(app)
    firebase_admin.delete_app(app)


@pytest.fixture
def store(stack: Stack) -> Iterator[PushStore]:
    client: MongoClient[dict[str, Any]] = MongoClient(stack.mongo_url)
    name = f"fcm_test_{uuid.uuid4().hex[:8]}"
    yield PushStore(client[name])
    client.drop_database(name)
    client.close()


def test_send_reaches_fcm_v1_with_token_notification_and_data(fcm: FakeFcm, sender: FcmSender) -> None:
    note = Notification("bob", "phone", "live-token-1", "group:g1", "m-42", 42, "Alice", "hello bob")
    assert sender.send([note]) == ["sent"]
    (request,) = fcm.requests
    assert request["path"] == f"/v1/projects/{PROJECT}/messages:send"
    assert request["headers"]["authorization"] == f"Bearer {ACCESS_TOKEN}"
    message = request["body"]["message"]
    assert message["token"] == "live-token-1"
    assert message["notification"] == {"title": "Alice", "body": "hello bob"}
    assert message["data"] == {"conversation": "group:g1", "message_id": "m-42", "seq": "42"}


def test_unregistered_token_is_reported(fcm: FakeFcm, sender: FcmSender) -> None:
    live = Notification("bob", "phone", "live-token-2", "dm:a:b", "m1", 1, "A", "x")
    dead = Notification("bob", "tablet", DEAD_TOKEN, "dm:a:b", "m1", 1, "A", "x")
    assert sender.send([live, dead]) == ["sent", "unregistered"]
    assert sorted(r["body"]["message"]["token"] for r in fcm.requests) == sorted(["live-token-2", DEAD_TOKEN])


def test_service_drops_dead_token_and_records_outcomes(fcm: FakeFcm, sender: FcmSender, store: PushStore) -> None:
    svc = PushNotification(PushConfig(), store=store, sender=sender, mutes=_NoMutes())
    svc.on_user_events(
        [
            UserRegistered(user_id="alice", username="alice", name="Alice"),
            DeviceRegistered(user_id="bob", device_id="phone", device_type="mobile", primary=True),
            DevicePushToken(user_id="bob", device_id="phone", push_token="live-token-3"),
            DeviceRegistered(user_id="bob", device_id="tablet", device_type="mobile", primary=False),
            DevicePushToken(user_id="bob", device_id="tablet", push_token=DEAD_TOKEN),
        ]
    )
    req = PushRequest(
        user_id="bob", conversation="group:g1", message_id="m7", seq=7, sender="alice", preview="see you", ts=1000
    )
    svc.on_push_requests([req])

    sent = {r["body"]["message"]["token"]: r["body"]["message"] for r in fcm.requests}
    assert set(sent) == {"live-token-3", DEAD_TOKEN}
    assert sent["live-token-3"]["notification"] == {"title": "Alice", "body": "see you"}
    outcomes = {d["device_id"]: d for d in store.outcomes.find({"message_id": "m7"})}
    assert {k: v["status"] for k, v in outcomes.items()} == {"phone": "sent", "tablet": "unregistered"}
    assert outcomes["tablet"]["user_id"] == "bob" and outcomes["tablet"]["conversation"] == "group:g1"
    # the dead token left the projection (kept only as a hash), the live one stayed
    assert [d.device_id for d in store.get_push_devices(["bob"])["bob"]] == ["phone"]
    assert store.dead_tokens.find_one({"_id": token_hash(DEAD_TOKEN)}) is not None
    assert store.dead_tokens.find_one({"_id": DEAD_TOKEN}) is None

    # the next message reaches only the live device, and a redelivery sends nothing again
    fcm.requests.clear()
    svc.on_push_requests([req.model_copy(update={"message_id": "m8", "seq": 8, "ts": 9000})])
    svc.on_push_requests([req])
    assert [r["body"]["message"]["token"] for r in fcm.requests] == ["live-token-3"]


class _NoMutes:
    def muted(self, user_id: str) -> frozenset[str]:
        return frozenset()
