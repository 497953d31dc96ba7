"""push-notification: device projection, exclusion, mutes, burst collapsing, outcomes, dead tokens."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from chatlib.schemas import (
    DeviceLoggedOut,
    DevicePushToken,
    DeviceRegistered,
    DeviceRemoved,
    Event,
    GroupPushRequest,
    PushRecipient,
    PushRequest,
    UserRegistered,
    UserUnregistered,
)

from services.push_notification import logic
from services.push_notification.clients import MuteClient, RecordingSender
from services.push_notification.logic import Notification, Outcome, PushDevice, Status
from services.push_notification.service import PushConfig, PushNotification


class FakePushStore:
    """The PushStore interface over dicts."""

    def __init__(self) -> None:
        self.devices: dict[tuple[str, str], str | None] = {}
        self.names: dict[str, str] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.dead: list[tuple[str, str]] = []

    def set_user_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, UserRegistered):
                self.names[ev.user_id] = ev.name
            elif isinstance(ev, DeviceRegistered):
                self.devices.setdefault((ev.user_id, ev.device_id), None)
            elif isinstance(ev, DevicePushToken):
                self.devices[(ev.user_id, ev.device_id)] = ev.push_token
            elif isinstance(ev, DeviceLoggedOut):
                if (ev.user_id, ev.device_id) in self.devices:
                    self.devices[(ev.user_id, ev.device_id)] = None
            elif isinstance(ev, DeviceRemoved):
                self.devices.pop((ev.user_id, ev.device_id), None)
            elif isinstance(ev, UserUnregistered):
                for key in [k for k in self.devices if k[0] == ev.user_id]:
                    del self.devices[key]

    def get_push_devices(self, user_ids: list[str]) -> dict[str, list[PushDevice]]:
        out: dict[str, list[PushDevice]] = {}
        for (u, d), tok in sorted(self.devices.items()):
            if u in user_ids and tok:
                out.setdefault(u, []).append(PushDevice(u, d, tok))
        return out

    def get_names(self, user_ids: list[str]) -> dict[str, str]:
        return {u: self.names[u] for u in user_ids if u in self.names}

    def delete_token(self, user_id: str, device_id: str, token: str, ts: int) -> None:
        if self.devices.get((user_id, device_id)) == token:
            self.devices[(user_id, device_id)] = None
        self.dead.append((user_id, device_id))

    def get_outcome_ids(self, ids: list[str]) -> set[str]:
        return {i for i in ids if i in self.outcomes}

    def set_outcomes(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            self.outcomes.setdefault(o.id, o)

    def status(self, message_id: str, device_id: str) -> str | None:
        o = self.outcomes.get(logic.outcome_id(message_id, device_id))
        return None if o is None else o.status


class FakeSender:
    def __init__(self, answer: dict[str, Status] | None = None):
        self.sent: list[Notification] = []
        self.answer = answer or {}

    def send(self, notes: list[Notification]) -> list[Status]:
        self.sent.extend(notes)
        return [self.answer.get(n.token, "sent") for n in notes]


class FakeMutes:
    def __init__(self, mutes: dict[str, set[str]] | None = None):
        self.mutes = mutes or {}

    def muted(self, user_id: str) -> frozenset[str]:
        return frozenset(self.mutes.get(user_id, set()))


def req(
    user: str = "bob", mid: str = "m1", ts: int = 10_000, conv: str = "group:g", exclude: list[str] | None = None
) -> PushRequest:
    return PushRequest(
        user_id=user,
        exclude_devices=exclude or [],
        conversation=conv,
        message_id=mid,
        seq=int(mid[1:]) if mid[1:].isdigit() else 1,
        sender="alice",
        preview="hello there",
        ts=ts,
    )


@pytest.fixture
def push() -> PushNotification:
    svc = PushNotification(PushConfig(collapse_s=2.0), store=FakePushStore(), sender=FakeSender(), mutes=FakeMutes())
    svc.on_user_events(
        [
            UserRegistered(user_id="alice", username="alice", name="Alice A."),
            DeviceRegistered(user_id="bob", device_id="phone", device_type="mobile", primary=True),
            DevicePushToken(user_id="bob", device_id="phone", push_token="tok-phone"),
            DeviceRegistered(user_id="bob", device_id="tablet", device_type="mobile", primary=False),
            DevicePushToken(user_id="bob", device_id="tablet", push_token="tok-tablet"),
            DeviceRegistered(user_id="bob", device_id="web", device_type="web", primary=False),  # no token
        ]
    )
    return svc


def sent(svc: PushNotification) -> list[tuple[str, str]]:
    return [(n.device_id, n.message_id) for n in svc.sender.sent]  # type: ignore[attr-defined]


def test_every_device_with_a_token_is_notified(push: PushNotification) -> None:
    push.on_push_requests([req()])
    assert sent(push) == [("phone", "m1"), ("tablet", "m1")]
    note = push.sender.sent[0]  # type: ignore[attr-defined]
    assert (note.title, note.body, note.token) == ("Alice A.", "hello there", "tok-phone")
    assert note.data() == {"conversation": "group:g", "message_id": "m1", "seq": "1"}
    assert push.store.status("m1", "phone") == "sent"  # type: ignore[attr-defined]
    assert push.store.status("m1", "web") is None  # type: ignore[attr-defined]


def test_excluded_online_devices_are_skipped(push: PushNotification) -> None:
    push.on_push_requests([req(exclude=["phone"])])
    assert sent(push) == [("tablet", "m1")]
    push.on_push_requests([req(mid="m2", exclude=["phone", "tablet"])])
    assert sent(push) == [("tablet", "m1")]
    assert push.store.status("m2", "tablet") is None  # type: ignore[attr-defined]


def test_burst_collapses_per_device_and_conversation(push: PushNotification) -> None:
    push.on_push_requests([req(mid="m1", ts=10_000), req(mid="m2", ts=10_500)])
    push.on_push_requests([req(mid="m3", ts=11_999), req(mid="m9", ts=10_600, conv="dm:alice:bob")])
    push.on_push_requests([req(mid="m4", ts=12_000)])  # the window of m1 has closed
    assert sent(push) == [
        ("phone", "m1"),
        ("tablet", "m1"),
        ("phone", "m9"),
        ("tablet", "m9"),
        ("phone", "m4"),
        ("tablet", "m4"),
    ]
    for mid in ("m2", "m3"):
        assert push.store.status(mid, "phone") == "collapsed"  # type: ignore[attr-defined]
        assert push.store.status(mid, "tablet") == "collapsed"  # type: ignore[attr-defined]
    assert push.store.status("m4", "phone") == "sent"  # type: ignore[attr-defined]


def test_collapse_window_is_per_device(push: PushNotification) -> None:
    push.on_push_requests([req(mid="m1", exclude=["phone"]), req(mid="m2", ts=10_100)])
    assert sent(push) == [("tablet", "m1"), ("phone", "m2")]
    assert push.store.status("m2", "tablet") == "collapsed"  # type: ignore[attr-defined]


def test_muted_conversation_is_recorded_not_sent(push: PushNotification) -> None:
    push.mutes = FakeMutes({"bob": {"group:g"}})
    push.on_push_requests([req(mid="m1"), req(mid="m2", conv="group:other", ts=10_001)])
    assert sent(push) == [("phone", "m2"), ("tablet", "m2")]
    assert push.store.status("m1", "phone") == "muted"  # type: ignore[attr-defined]
    # a muted message does not open a collapse window
    push.mutes = FakeMutes()
    push.on_push_requests([req(mid="m3", ts=10_002)])
    assert push.store.status("m3", "phone") == "sent"  # type: ignore[attr-defined]


def test_redelivered_request_is_not_sent_twice(push: PushNotification) -> None:
    push.on_push_requests([req(), req()])
    push.collapser = logic.Collapser(0)  # even with collapsing off
    push.on_push_requests([req()])
    assert sent(push) == [("phone", "m1"), ("tablet", "m1")]


def test_unregistered_token_is_dropped_and_recorded(push: PushNotification) -> None:
    push.sender = FakeSender({"tok-tablet": "unregistered"})
    push.on_push_requests([req()])
    assert push.store.status("m1", "tablet") == "unregistered"  # type: ignore[attr-defined]
    assert push.store.dead == [("bob", "tablet")]  # type: ignore[attr-defined]
    push.on_push_requests([req(mid="m2", ts=20_000)])
    assert [d for d, m in sent(push) if m == "m2"] == ["phone"]


def test_failed_send_is_recorded(push: PushNotification) -> None:
    push.sender = FakeSender({"tok-phone": "failed"})
    push.on_push_requests([req()])
    assert push.store.status("m1", "phone") == "failed"  # type: ignore[attr-defined]
    assert push.store.status("m1", "tablet") == "sent"  # type: ignore[attr-defined]


def test_projection_follows_logout_removal_and_unregistration(push: PushNotification) -> None:
    push.on_user_events([DeviceLoggedOut(user_id="bob", device_id="phone")])
    push.on_push_requests([req(mid="m1")])
    push.on_user_events([DeviceRemoved(user_id="bob", device_id="tablet")])
    push.on_push_requests([req(mid="m2", ts=30_000)])
    assert sent(push) == [("tablet", "m1")]
    push.on_user_events([DevicePushToken(user_id="bob", device_id="phone", push_token="tok-new")])
    push.on_push_requests([req(mid="m3", ts=40_000)])
    assert push.sender.sent[-1].token == "tok-new"  # type: ignore[attr-defined]
    push.on_user_events([UserUnregistered(user_id="bob")])
    push.on_push_requests([req(mid="m4", ts=50_000)])
    assert [m for _, m in sent(push)] == ["m1", "m3"]


def test_recording_sender_logs_no_token_or_text(caplog: pytest.LogCaptureFixture) -> None:
    note = Notification("bob", "phone", "secret-token-123", "group:g", "m1", 1, "Alice", "private words")
    with caplog.at_level("INFO"):
        assert RecordingSender().send([note]) == ["recorded"]
    assert "m1" in caplog.text and "secret-token-123" not in caplog.text and "private words" not in caplog.text


def test_collapser_prunes_old_windows() -> None:
    c = logic.Collapser(2000)
    assert c.admit("u", "d", "c", 0) and not c.admit("u", "d", "c", 1999)
    c.prune(1_000_000)
    assert len(c) == 0


class _Resp:
    def __init__(self, status: int, body: Any):
        self.status_code = status
        self._body = body

    def json(self) -> Any:
        return self._body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise requests.HTTPError(str(self.status_code))


class _Http:
    def __init__(self, answers: list[Any]):
        self.answers = answers
        self.urls: list[str] = []

    def get(self, url: str, timeout: float) -> Any:
        self.urls.append(url)
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


def test_mute_client_caches_and_fails_open() -> None:
    client = MuteClient("http://persistence:1/", ttl_s=60)
    client.http = _Http([_Resp(200, {"conversations": ["group:g", 5]})])  # type: ignore[assignment]
    assert client.muted("bob") == {"group:g"}
    assert client.muted("bob") == {"group:g"}  # cached: one request
    assert client.http.urls == ["http://persistence:1/internal/mutes/bob"]  # type: ignore[attr-defined]
    client.http = _Http([requests.ConnectionError("down"), _Resp(404, {})])  # type: ignore[assignment]
    assert client.muted("carol") == frozenset()
    assert client.muted("dave") == frozenset()
    expired = MuteClient("http://p", ttl_s=0)
    expired.http = _Http([_Resp(200, {"conversations": ["a"]}), _Resp(200, {"conversations": []})])  # type: ignore[assignment]
    assert expired.muted("bob") == {"a"} and expired.muted("bob") == frozenset()


def test_config_defaults_and_bad_credentials_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from chatlib.config import ConfigError, load_config

    monkeypatch.setenv("PUSH_NOTIFICATION_PERSISTENCE_URL", "")
    cfg = load_config(PushConfig)
    assert cfg.persistence_url == "http://127.0.0.1:8103" and cfg.collapse_s == 2.0 and cfg.credentials_file == ""
    monkeypatch.setenv("PUSH_NOTIFICATION_CREDENTIALS_FILE", "/nonexistent/sa.json")
    with pytest.raises(ConfigError, match="PUSH_NOTIFICATION_CREDENTIALS_FILE"):
        load_config(PushConfig)


def test_a_group_push_request_notifies_each_recipients_offline_devices(push: PushNotification) -> None:
    group = GroupPushRequest(
        recipients=[PushRecipient(user_id="bob", exclude_devices=["tablet"]), PushRecipient(user_id="carol")],
        conversation="group:g",
        message_id="m7",
        seq=7,
        sender="alice",
        preview="to all",
        ts=10_000,
    )
    push.on_push_requests([group])
    assert sent(push) == [("phone", "m7")]  # bob's tablet is online; carol has no device with a token
