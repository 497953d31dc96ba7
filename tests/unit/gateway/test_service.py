"""The gateway service with its sockets and Kafka replaced by fakes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from chatlib.schemas import (
    CloseDevice,
    Deliver,
    DeviceConnected,
    DeviceDisconnected,
    DeviceLoggedOut,
    DeviceRef,
    DeviceRemoved,
    GatewayHeartbeat,
    InboundMessage,
    InboundReceipt,
    ReplayRequest,
    SessionDevice,
    TypingSignal,
    UserDisabled,
    UserRegistered,
    UserSessions,
    UserUnregistered,
)

from services.gateway import service as gateway_service
from services.gateway.logic import Identity
from services.gateway.service import Gateway, GatewayConfig
from services.gateway.sockets import Connection

# -- fakes ------------------------------------------------------------------


def wait_until(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.aborted = False
        self.lock = threading.Lock()

    def send(self, text: str) -> None:
        with self.lock:
            self.frames.append(json.loads(text))

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def abort(self) -> None:
        self.aborted = True

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames]


class FakeFuture:
    def __init__(self) -> None:
        self.errbacks: list[Callable[[BaseException], None]] = []

    def add_errback(self, fn: Callable[[BaseException], None]) -> None:
        self.errbacks.append(fn)


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, Any]] = []
        self.futures: list[FakeFuture] = []
        self.fail = False
        self.flushed = 0

    def send(self, topic: Any, ev: Any, key: str | None = None) -> FakeFuture:
        if self.fail:
            raise OSError("broker away")
        self.sent.append((topic.name, key, ev))
        fut = FakeFuture()
        self.futures.append(fut)
        return fut

    def flush(self, timeout: float = 10.0) -> None:
        self.flushed += 1

    def events(self, cls: type) -> list[Any]:
        return [ev for _, _, ev in self.sent if isinstance(ev, cls)]


class FakeView:
    def __init__(self) -> None:
        self.data: dict[str, UserSessions] = {}

    def get(self, key: str) -> UserSessions | None:
        return self.data.get(key)


def make(**cfg: Any) -> tuple[Gateway, FakePublisher]:
    # Session events one by one, so a test sees them at once (their bursts are tested apart).
    cfg.setdefault("announce_linger_ms", 0)
    pub = FakePublisher()
    extra: dict[str, Any] = {}
    if cfg.get("require_primary_online"):
        extra["sessions"] = FakeView()
    gw = Gateway(GatewayConfig(instance_id="gw1", **cfg), producer=pub, **extra)
    return gw, pub


def open_(
    gw: Gateway, user: str = "alice", device: str = "d1", primary: bool = True
) -> tuple[Connection, FakeTransport]:
    t = FakeTransport()
    conn = gw.open_socket(t, Identity(user, device, "mobile" if primary else "web", primary))
    assert conn is not None
    return conn, t


def msg(seq: int, conv: str = "dm:alice:bob") -> dict[str, Any]:
    return {"type": "message", "conversation": conv, "seq": seq, "body": "x"}


def initial(gw: Gateway, conn: Connection, sync: dict[str, int] | None = None) -> None:
    gw.deliver(
        Deliver(
            targets=[DeviceRef(user_id=conn.who.user_id, device_id=conn.who.device_id)],
            frames=[],
            sync=sync or {},
            conn_id=conn.conn_id,
            initial=True,
        )
    )


# -- connect / disconnect -----------------------------------------------------


def test_open_announces_connect_and_forget_announces_disconnect_once() -> None:
    gw, pub = make()
    conn, _ = open_(gw, primary=True)
    ((topic, key, ev),) = pub.sent
    assert topic == "session.events.v1" and key == "alice"
    assert isinstance(ev, DeviceConnected)
    assert (ev.user_id, ev.device_id, ev.gateway, ev.conn_id, ev.primary, ev.device_type) == (
        "alice",
        "d1",
        "gw1",
        conn.conn_id,
        True,
        "mobile",
    )
    assert len(gw.hub) == 1
    gw.forget_socket(conn)
    gw.forget_socket(conn)
    disconnects = pub.events(DeviceDisconnected)
    assert len(disconnects) == 1 and disconnects[0].conn_id == conn.conn_id
    assert len(gw.hub) == 0


def test_each_socket_gets_its_own_conn_id() -> None:
    gw, pub = make()
    a, _ = open_(gw)
    b, _ = open_(gw)
    assert a.conn_id != b.conn_id
    assert [e.conn_id for e in pub.events(DeviceConnected)] == [a.conn_id, b.conn_id]


# -- client frames ------------------------------------------------------------


def test_ping_gets_pong() -> None:
    gw, _ = make()
    conn, t = open_(gw)
    gw.on_frame(conn, '{"type":"ping"}')
    wait_until(lambda: t.frames == [{"type": "pong"}])


@pytest.mark.parametrize(
    ("raw", "code", "ref"),
    [
        ("not json", "invalid_request", None),
        ('{"type":"dance"}', "invalid_request", None),
        ('{"type":"message","id":"c9","to":"bob"}', "invalid_request", "c9"),
        ('{"type":"message","id":"c8","to":"bob","body":"' + "x" * (16 * 1024 + 1) + '"}', "payload_too_large", "c8"),
        ('{"type":"ping","pad":"' + "x" * (64 * 1024) + '"}', "payload_too_large", None),
        # Found by frame fuzzing: a binary frame is no JSON text frame, whatever it holds.
        (b'{"type":"ping"}', "invalid_request", None),
        (b"\xff\xfe", "invalid_request", None),
        # The error's ref must not echo a lone surrogate (it cannot be written as UTF-8).
        ('{"type":"message","id":"\\ud800","to":"bob","body":"x"}', "invalid_request", None),
    ],
)
def test_bad_frames_get_error_frames_and_socket_stays_open(raw: str | bytes, code: str, ref: str | None) -> None:
    gw, pub = make()
    conn, t = open_(gw)
    gw.on_frame(conn, raw)
    gw.on_frame(conn, '{"type":"ping"}')
    wait_until(lambda: len(t.frames) == 2)
    err, pong = t.frames
    assert err["type"] == "error" and err["code"] == code and err.get("ref") == ref
    assert pong == {"type": "pong"}
    assert not conn.closing
    assert pub.events(InboundMessage) == []


def test_message_frame_is_produced_keyed_by_conversation() -> None:
    gw, pub = make()
    conn, t = open_(gw)
    gw.on_frame(conn, '{"type":"message","id":"c1","to":"bob","body":"hello"}')
    topic, key, ev = pub.sent[-1]
    assert topic == "chat.messages.in.v1" and key == "dm:alice:bob"
    assert isinstance(ev, InboundMessage) and ev.sender == "alice" and ev.gateway == "gw1" and ev.body == "hello"
    assert t.frames == []


def test_receipt_and_typing_are_produced() -> None:
    gw, pub = make()
    conn, _ = open_(gw)
    gw.on_frame(conn, '{"type":"receipt","conversation":"dm:alice:bob","status":"delivered","up_to_seq":3}')
    gw.on_frame(conn, '{"type":"typing","conversation":"group:g1","state":"start"}')
    (t1, k1, e1), (t2, k2, e2) = pub.sent[-2:]
    assert (t1, k1) == ("chat.messages.in.v1", "dm:alice:bob") and isinstance(e1, InboundReceipt)
    assert (t2, k2) == ("chat.signals.v1", "group:g1") and isinstance(e2, TypingSignal)


def test_receipt_for_others_dm_is_forbidden() -> None:
    gw, pub = make()
    conn, t = open_(gw)
    before = len(pub.sent)
    gw.on_frame(conn, '{"type":"receipt","conversation":"dm:bob:carol","status":"read","up_to_seq":1}')
    wait_until(lambda: len(t.frames) == 1)
    assert t.frames[0]["type"] == "error" and t.frames[0]["code"] == "forbidden"
    assert len(pub.sent) == before


def test_over_the_rate_frames_are_dropped_with_error_and_socket_stays_open() -> None:
    gw, pub = make(rate_per_socket=2)
    conn, t = open_(gw)
    for i in range(6):
        gw.on_frame(conn, json.dumps({"type": "message", "id": f"c{i}", "to": "bob", "body": "x"}))
    produced = pub.events(InboundMessage)
    assert len(produced) == 4  # burst: twice the rate
    wait_until(lambda: len(t.frames) == 2)
    assert all(f["type"] == "error" and f["code"] == "rate_limited" for f in t.frames)
    assert not conn.closing


def test_produce_failure_tells_the_socket_with_ref() -> None:
    gw, pub = make()
    conn, t = open_(gw)
    pub.fail = True
    gw.on_frame(conn, '{"type":"message","id":"c1","to":"bob","body":"x"}')
    wait_until(lambda: len(t.frames) == 1)
    assert t.frames[0]["code"] == "unavailable" and t.frames[0]["ref"] == "c1"


def test_late_produce_failure_tells_the_socket_with_ref() -> None:
    gw, pub = make()
    conn, t = open_(gw)
    gw.on_frame(conn, '{"type":"message","id":"c2","to":"bob","body":"x"}')
    pub.futures[-1].errbacks[0](TimeoutError())
    wait_until(lambda: len(t.frames) == 1)
    assert t.frames[0]["code"] == "unavailable" and t.frames[0]["ref"] == "c2"


# -- deliveries ---------------------------------------------------------------


def test_deliver_reaches_every_socket_of_target_devices_once() -> None:
    gw, _ = make()
    a1, ta1 = open_(gw, "alice", "d1")
    a2, ta2 = open_(gw, "alice", "d1")
    b, tb = open_(gw, "bob", "d9")
    other, tother = open_(gw, "carol", "d5")
    for c in (a1, a2, b, other):
        initial(gw, c, {"dm:alice:bob": 0})
    ref_a = DeviceRef(user_id="alice", device_id="d1")
    gw.deliver(Deliver(targets=[ref_a, ref_a, DeviceRef(user_id="bob", device_id="d9")], frames=[msg(1)]))
    for t in (ta1, ta2, tb):
        wait_until(lambda t=t: len(t.frames) == 1)
        assert t.frames == [msg(1)]
    assert tother.frames == []


def test_deliver_with_conn_id_reaches_only_that_socket() -> None:
    gw, _ = make()
    a1, ta1 = open_(gw)
    _a2, ta2 = open_(gw)
    initial(gw, a1, {"dm:alice:bob": 1})
    typing = {"type": "typing", "conversation": "dm:alice:bob", "user_id": "bob", "state": "start"}
    gw.deliver(Deliver(targets=[DeviceRef(user_id="alice", device_id="d1")], frames=[typing], conn_id=a1.conn_id))
    wait_until(lambda: len(ta1.frames) == 1)
    assert ta2.frames == []


def test_initial_sync_releases_replay_and_buffered_live_frames() -> None:
    gw, _ = make()
    conn, t = open_(gw)
    target = [DeviceRef(user_id="alice", device_id="d1")]
    gw.deliver(Deliver(targets=target, frames=[msg(3)]))  # live, before the replay
    assert t.frames == []
    gw.deliver(
        Deliver(targets=target, frames=[msg(1), msg(2)], sync={"dm:alice:bob": 2}, conn_id=conn.conn_id, initial=True)
    )
    wait_until(lambda: len(t.frames) == 3)
    assert [f["seq"] for f in t.frames] == [1, 2, 3]


def test_gap_produces_replay_request_for_that_socket_after_the_grace() -> None:
    gw, pub = make()
    conn, t = open_(gw)
    initial(gw, conn, {"dm:alice:bob": 2})
    gw.deliver(Deliver(targets=[DeviceRef(user_id="alice", device_id="d1")], frames=[msg(5)]))
    assert not any(isinstance(e, ReplayRequest) for _, _, e in pub.sent)  # within GATEWAY_GAP_GRACE_MS
    gw.tick(time.monotonic() + 0.5)
    topic, key, ev = pub.sent[-1]
    assert topic == "chat.messages.in.v1" and key == "dm:alice:bob"
    assert isinstance(ev, ReplayRequest)
    assert (ev.user_id, ev.device_id, ev.gateway, ev.conn_id, ev.after_seq, ev.up_to_seq) == (
        "alice",
        "d1",
        "gw1",
        conn.conn_id,
        2,
        4,
    )
    assert t.frames == []


def test_tick_reasks_overdue_replay_and_reannounces_socket_without_initial_sync() -> None:
    gw, pub = make()
    ready_conn, _ = open_(gw, "alice", "d1")
    waiting, _ = open_(gw, "bob", "d2")
    initial(gw, ready_conn, {"dm:alice:bob": 2})
    gw.deliver(Deliver(targets=[DeviceRef(user_id="alice", device_id="d1")], frames=[msg(5)]))
    asks = len(pub.events(ReplayRequest))
    connects = len(pub.events(DeviceConnected))
    gw.tick(time.monotonic() + 11)
    assert len(pub.events(ReplayRequest)) == asks + 1
    again = pub.events(DeviceConnected)[connects:]
    assert [e.conn_id for e in again] == [waiting.conn_id]


def test_overflowing_socket_is_closed() -> None:
    gw, _ = make()
    conn, t = open_(gw)
    conn.sequencer.max_buffered = 2
    gw.deliver(Deliver(targets=[DeviceRef(user_id="alice", device_id="d1")], frames=[msg(1), msg(2), msg(3)]))
    wait_until(lambda: t.closed is not None)
    assert t.frames[-1]["code"] == "unavailable"


def test_close_device_event_closes_that_device_with_error_first() -> None:
    gw, _ = make()
    _, t1 = open_(gw, "alice", "d1")
    c2, _ = open_(gw, "alice", "d2")
    gw.on_delivery(CloseDevice(user_id="alice", device_id="d1", code="unauthorized", reason="logged out"))
    wait_until(lambda: t1.closed is not None)
    assert t1.frames == [{"type": "error", "code": "unauthorized", "message": "logged out"}]
    assert t1.closed[0] == 1008
    assert not c2.closing


@pytest.mark.parametrize(
    ("event", "closed"),
    [
        (DeviceLoggedOut(user_id="alice", device_id="d1"), {"d1"}),
        (DeviceRemoved(user_id="alice", device_id="d2"), {"d2"}),
        (UserDisabled(user_id="alice"), {"d1", "d2"}),
        (UserUnregistered(user_id="alice"), {"d1", "d2"}),
        (UserRegistered(user_id="alice", username="alice", name="A"), set()),
    ],
)
def test_user_events_close_sockets(event: Any, closed: set[str]) -> None:
    gw, _ = make()
    c1, t1 = open_(gw, "alice", "d1")
    c2, t2 = open_(gw, "alice", "d2")
    b, tb = open_(gw, "bob", "d1")
    gw.on_user_event(event)
    assert not b.closing
    expected = {"d1": (c1, t1), "d2": (c2, t2)}
    for device, (c, t) in expected.items():
        if device in closed:
            wait_until(lambda t=t: t.closed is not None)
            assert t.frames[0]["type"] == "error" and t.frames[0]["code"] == "unauthorized"
        else:
            assert not c.closing
    assert tb.closed is None


# -- heartbeat and shutdown ---------------------------------------------------


def test_heartbeat_lists_every_socket_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_service, "HEARTBEAT_CHUNK", 2)
    gw, _ = make()
    conns = [open_(gw, f"u{i}", "d")[0] for i in range(5)]
    beats = gw.heartbeats(1234)
    assert all(isinstance(b, GatewayHeartbeat) and b.gateway == "gw1" and b.ts == 1234 for b in beats)
    assert [(b.chunk, b.chunks) for b in beats] == [(0, 3), (1, 3), (2, 3)]
    listed = {c for b in beats for c in b.connections}
    assert listed == {(c.who.user_id, c.who.device_id, c.conn_id) for c in conns}


def test_heartbeat_without_sockets_is_one_empty_record() -> None:
    gw, _ = make()
    (beat,) = gw.heartbeats(5)
    assert beat.connections == [] and beat.chunks == 1


def test_shutdown_reports_disconnects_and_closes_with_1001() -> None:
    gw, pub = make()
    opened = [open_(gw, f"u{i}", "d") for i in range(3)]
    gw.shutdown()
    assert {e.conn_id for e in pub.events(DeviceDisconnected)} == {c.conn_id for c, _ in opened}
    assert pub.flushed >= 1
    for _, t in opened:
        assert t.closed is not None and t.closed[0] == 1001
    assert len(gw.hub) == 0
    # new sockets are refused while stopping
    t = FakeTransport()
    assert gw.open_socket(t, Identity("x", "y")) is None
    assert t.frames[0]["code"] == "unavailable"


# -- REQUIRE_PRIMARY_ONLINE -----------------------------------------------------


def _sessions(user: str, primary: bool) -> UserSessions:
    dev = SessionDevice(device_id="phone", gateway="gw2", conn_id="c1", connected_at=1, primary=primary)
    return UserSessions(user_id=user, devices=[dev], online=True, last_seen=1)


def test_policy_off_lets_secondary_devices_work_alone() -> None:
    gw, pub = make()
    assert gw.sessions is None
    conn, _ = open_(gw, "alice", "web1", primary=False)
    assert conn is not None and len(pub.events(DeviceConnected)) == 1


def test_policy_refuses_secondary_while_primary_offline() -> None:
    gw, pub = make(require_primary_online=True)
    t = FakeTransport()
    assert gw.open_socket(t, Identity("alice", "web1", "web", False)) is None
    assert t.frames == [{"type": "error", "code": "forbidden", "message": "primary device offline"}]
    assert t.closed is not None and t.closed[0] == 1008
    assert pub.events(DeviceConnected) == []


def test_policy_admits_secondary_when_primary_online_elsewhere_or_here() -> None:
    gw, _ = make(require_primary_online=True)
    gw.sessions.data["alice"] = _sessions("alice", primary=True)  # type: ignore[union-attr]
    assert gw.open_socket(FakeTransport(), Identity("alice", "web1", "web", False)) is not None
    open_(gw, "bob", "phone", primary=True)
    assert gw.open_socket(FakeTransport(), Identity("bob", "web1", "web", False)) is not None


def test_policy_closes_secondaries_when_primary_goes_offline() -> None:
    gw, _ = make(require_primary_online=True)
    gw.sessions.data["alice"] = _sessions("alice", primary=True)  # type: ignore[union-attr]
    conn, t = open_(gw, "alice", "web1", primary=False)
    gw.on_sessions_update(_sessions("alice", primary=True))
    assert not conn.closing
    gw.on_sessions_update(UserSessions(user_id="alice", devices=[], online=True, last_seen=2))
    wait_until(lambda: t.closed is not None)
    assert t.frames[-1] == {"type": "error", "code": "forbidden", "message": "primary device offline"}


def test_policy_keeps_secondaries_while_local_primary_socket_is_open() -> None:
    gw, _ = make(require_primary_online=True)
    open_(gw, "alice", "phone", primary=True)
    conn, _ = open_(gw, "alice", "web1", primary=False)
    gw.on_sessions_update(UserSessions(user_id="alice", devices=[], online=False, last_seen=2))
    assert not conn.closing


# -- session events in bursts -----------------------------------------------------


def test_connects_and_disconnects_go_out_together_and_in_order_after_the_linger() -> None:
    gw, pub = make(announce_linger_ms=100)
    a, _ = open_(gw, "alice", "d1")
    open_(gw, "bob", "d1")
    gw.forget_socket(a)
    assert pub.sent == []  # gathered, not yet produced
    wait_until(lambda: len(pub.sent) == 3)
    kinds = [(type(ev).__name__, ev.user_id) for _, _, ev in pub.sent]
    assert kinds == [("DeviceConnected", "alice"), ("DeviceConnected", "bob"), ("DeviceDisconnected", "alice")]
    assert all(topic == "session.events.v1" for topic, _, _ in pub.sent)


def test_shutdown_produces_the_gathered_events_at_once() -> None:
    gw, pub = make(announce_linger_ms=1000)
    opened = [open_(gw, f"u{i}", "d") for i in range(2)]
    gw.shutdown()
    assert len(pub.events(DeviceConnected)) == 2
    assert {e.conn_id for e in pub.events(DeviceDisconnected)} == {c.conn_id for c, _ in opened}
