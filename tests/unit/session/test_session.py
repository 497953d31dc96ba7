"""Session state transitions with an in-memory store and a recording publisher."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from chatlib.schemas import (
    DeviceConnected,
    DeviceDisconnected,
    Event,
    GatewayHeartbeat,
    PresenceChanged,
    UserSessions,
)

from services.session import service as service_module
from services.session.logic import (
    Conn,
    DeviceState,
    GatewayState,
    HeartbeatAssembler,
    UserState,
    compute_user,
    gateways_to_expire,
    reconcile,
    state_changed,
)
from services.session.service import Session, SessionConfig

# -- fakes ------------------------------------------------------------------


class FakeStore:
    """The SessionStore interface over dicts."""

    def __init__(self) -> None:
        self.conns: dict[str, Conn] = {}
        self.devices: dict[tuple[str, str], DeviceState] = {}
        self.users: dict[str, UserState] = {}
        self.gateways: dict[str, GatewayState] = {}

    def apply_connection_ops(self, ops: list[tuple[str, Any]]) -> None:
        for op, arg in ops:
            if op == "upsert":
                self.conns[arg.conn_id] = replace(arg, live=True)
            else:
                self.conns.pop(arg, None)

    def delete_connections(self, conn_ids: list[str]) -> None:
        for c in conn_ids:
            self.conns.pop(c, None)

    def set_connections_live(self, conn_ids: list[str], live: bool) -> None:
        for c in conn_ids:
            if c in self.conns:
                self.conns[c] = replace(self.conns[c], live=live)

    def get_connections_of_users(self, user_ids: Any) -> list[Conn]:
        users = set(user_ids)
        return [c for c in self.conns.values() if c.user_id in users]

    def get_connections_of_gateway(self, gateway: str, live_only: bool = False) -> list[Conn]:
        return [c for c in self.conns.values() if c.gateway == gateway and (c.live or not live_only)]

    def delete_tombstones(self, gateways: list[str]) -> None:
        for cid, c in list(self.conns.items()):
            if c.gateway in gateways and not c.live:
                del self.conns[cid]

    def get_devices_of_users(self, user_ids: Any) -> list[DeviceState]:
        users = set(user_ids)
        return [d for d in self.devices.values() if d.user_id in users]

    def get_all_users(self, batch: int = 500) -> Any:
        users = [self.users[u] for u in sorted(self.users)]
        for i in range(0, len(users), batch):
            yield users[i : i + batch]

    def get_users(self, user_ids: Any) -> dict[str, UserState]:
        return {u: self.users[u] for u in user_ids if u in self.users}

    def set_states(self, devices: list[DeviceState], users: list[UserState]) -> None:
        for d in devices:
            self.devices[(d.user_id, d.device_id)] = d
        for u in users:
            self.users[u.user_id] = u

    def touch_gateways(self, gateways: Any, now: int) -> None:
        for gw in gateways:
            old = self.gateways.get(gw)
            self.gateways[gw] = GatewayState(gw, max(now, old.last_heartbeat if old else 0), False)

    def get_gateways(self) -> list[GatewayState]:
        return list(self.gateways.values())

    def set_gateway_expired(self, gateway: str) -> None:
        self.gateways[gateway] = replace(self.gateways[gateway], expired=True)


class FakeOwnedTopic:
    """Stands in for chatlib.republish.TopicOwner: ``lost`` says whether the topic lost its records."""

    def __init__(self) -> None:
        self.lost = False

    def restore_if_lost(self, republish: Any) -> int:
        return int(republish()) if self.lost else 0


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, Event]] = []
        self.flushed = 0

    def send(self, topic: Any, ev: Event, key: str | None = None) -> None:
        self.sent.append((topic.name, key, ev))

    def flush(self, timeout: float = 10.0) -> None:
        self.flushed += 1

    def sessions(self, user: str) -> list[UserSessions]:
        return [e for t, k, e in self.sent if isinstance(e, UserSessions) and e.user_id == user]

    def presence(self, user: str) -> list[PresenceChanged]:
        return [e for t, k, e in self.sent if isinstance(e, PresenceChanged) and e.user_id == user]


def make(**cfg: Any) -> tuple[Session, FakeStore, FakePublisher]:
    store, pub = FakeStore(), FakePublisher()
    svc = Session(SessionConfig(**cfg), store=store, producer=pub, owned=FakeOwnedTopic())
    return svc, store, pub


def connect(
    conn: str, user: str = "alice", device: str = "d1", gw: str = "gw1", ts: int = 1000, primary: bool = True
) -> DeviceConnected:
    return DeviceConnected(
        user_id=user, device_id=device, device_type="mobile", primary=primary, gateway=gw, conn_id=conn, ts=ts
    )


def disconnect(
    conn: str, user: str = "alice", device: str = "d1", gw: str = "gw1", ts: int = 2000
) -> DeviceDisconnected:
    return DeviceDisconnected(user_id=user, device_id=device, gateway=gw, conn_id=conn, ts=ts)


def beat(gw: str, conns: list[tuple[str, str, str]], ts: int, chunk: int = 0, chunks: int = 1) -> GatewayHeartbeat:
    return GatewayHeartbeat(gateway=gw, connections=conns, ts=ts, chunk=chunk, chunks=chunks)


# -- connects and disconnects ---------------------------------------------------


def test_connect_publishes_sessions_and_presence_online() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("c1")])
    (s,) = pub.sessions("alice")
    assert s.online and [(d.device_id, d.gateway, d.conn_id, d.primary) for d in s.devices] == [
        ("d1", "gw1", "c1", True)
    ]
    (p,) = pub.presence("alice")
    assert p.online
    keys = {(t, k) for t, k, _ in pub.sent}
    assert keys == {("session.changes.v1", "alice"), ("presence.v1", "alice")}
    dev = store.devices[("alice", "d1")]
    assert dev.online and dev.gateway == "gw1" and dev.conn_id == "c1" and dev.connected_at == 1000
    assert pub.flushed == 1


def test_disconnect_publishes_offline_with_last_seen() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("c1")])
    svc.on_session_events([disconnect("c1")])
    last = pub.sessions("alice")[-1]
    assert not last.online and last.devices == [] and last.last_seen > 0
    assert [p.online for p in pub.presence("alice")] == [True, False]
    dev = store.devices[("alice", "d1")]
    assert not dev.online and dev.last_seen == last.last_seen
    assert store.users["alice"] == UserState("alice", False, last.last_seen)


def test_device_with_two_sockets_stays_online_until_both_close() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("c1", ts=1000), connect("c2", ts=1500)])
    assert store.devices[("alice", "d1")].connections == 2
    svc.on_session_events([disconnect("c1")])
    s = pub.sessions("alice")[-1]
    assert s.online and [d.conn_id for d in s.devices] == ["c2"]
    assert [p.online for p in pub.presence("alice")] == [True]  # no flip yet
    svc.on_session_events([disconnect("c2")])
    assert not pub.sessions("alice")[-1].online
    assert [p.online for p in pub.presence("alice")] == [True, False]


def test_stale_disconnect_does_not_take_newer_socket_offline() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("old", ts=1000)])
    svc.on_session_events([connect("new", ts=5000)])
    svc.on_session_events([disconnect("old", ts=6000)])
    s = pub.sessions("alice")[-1]
    assert s.online and [d.conn_id for d in s.devices] == ["new"]
    assert store.devices[("alice", "d1")].online
    # a repeated stale disconnect changes nothing either
    svc.on_session_events([disconnect("old", ts=6000)])
    assert pub.sessions("alice")[-1].online


def test_latest_socket_is_the_device_location() -> None:
    svc, store, _ = make()
    svc.on_session_events([connect("a", gw="gw1", ts=1000), connect("b", gw="gw2", ts=2000)])
    dev = store.devices[("alice", "d1")]
    assert (dev.gateway, dev.conn_id, dev.connected_at) == ("gw2", "b", 2000)


def test_device_on_two_gateways_is_listed_once_per_gateway() -> None:
    svc, _, pub = make()
    svc.on_session_events([connect("a", gw="gw1"), connect("a2", gw="gw1", ts=1100), connect("b", gw="gw2")])
    s = pub.sessions("alice")[-1]
    assert [(d.device_id, d.gateway, d.conn_id) for d in s.devices] == [("d1", "gw1", "a2"), ("d1", "gw2", "b")]


def test_user_online_while_any_device_is() -> None:
    svc, _, pub = make()
    svc.on_session_events([connect("c1", device="phone"), connect("c2", device="web", primary=False)])
    svc.on_session_events([disconnect("c1", device="phone")])
    s = pub.sessions("alice")[-1]
    assert s.online and [d.device_id for d in s.devices] == ["web"]
    assert [p.online for p in pub.presence("alice")] == [True]


def test_connect_and_disconnect_in_one_batch_leave_user_offline_but_seen() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("c1"), disconnect("c1")])
    s = pub.sessions("alice")[-1]
    assert not s.online and s.last_seen > 0
    assert pub.presence("alice") == []  # never flipped from the stored state
    assert store.devices == {} or not store.devices[("alice", "d1")].online


def test_replayed_connect_is_idempotent() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("c1")])
    svc.on_session_events([connect("c1")])
    assert store.devices[("alice", "d1")].connections == 1
    assert [p.online for p in pub.presence("alice")] == [True]


def test_batch_touches_each_user_once() -> None:
    svc, _, pub = make()
    svc.on_session_events([connect("a1", user="a"), connect("b1", user="b"), connect("a2", user="a", device="d2")])
    assert len(pub.sessions("a")) == 1 and len(pub.sessions("b")) == 1
    assert {d.device_id for d in pub.sessions("a")[0].devices} == {"d1", "d2"}


# -- heartbeats -------------------------------------------------------------------


def test_heartbeat_removes_old_connections_the_gateway_no_longer_holds() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("gone", ts=1000), connect("kept", user="bob", ts=1000)])
    svc.on_session_events([beat("gw1", [("bob", "d1", "kept")], ts=20_000)])
    assert set(store.conns) == {"kept"}
    assert not pub.sessions("alice")[-1].online
    assert pub.presence("alice")[-1].online is False


def test_heartbeat_keeps_young_connections_it_does_not_list() -> None:
    svc, store, pub = make()
    svc.on_session_events([connect("young", ts=15_000)])
    sent = len(pub.sent)
    svc.on_session_events([beat("gw1", [], ts=20_000)])  # taken before the connect was processed
    assert set(store.conns) == {"young"}
    assert len(pub.sent) == sent  # nothing changed, nothing published


def test_heartbeat_only_reconciles_its_own_gateway() -> None:
    svc, store, _ = make()
    svc.on_session_events([connect("other", gw="gw2", ts=1000)])
    svc.on_session_events([beat("gw1", [], ts=60_000)])
    assert set(store.conns) == {"other"}


def test_chunked_heartbeat_reconciles_only_when_complete() -> None:
    svc, store, _ = make()
    svc.on_session_events(
        [connect("a", ts=1000), connect("b", user="bob", ts=1000), connect("c", user="carol", ts=1000)]
    )
    svc.on_session_events([beat("gw1", [("alice", "d1", "a")], ts=30_000, chunk=0, chunks=2)])
    assert set(store.conns) == {"a", "b", "c"}  # incomplete: nothing removed
    svc.on_session_events([beat("gw1", [("bob", "d1", "b")], ts=30_000, chunk=1, chunks=2)])
    assert set(store.conns) == {"a", "b"}


def test_a_heartbeat_that_drops_many_connections_leaves_most_to_the_upkeep_thread(monkeypatch: Any) -> None:
    """A gateway restarted with its sockets gone: its first heartbeat lists none of them. The poll
    removes one part; the rest go a part at a time (remove_pending, the upkeep thread's step), so
    no poll does thousands of writes. Every user ends offline; none is queued twice."""
    monkeypatch.setattr(service_module, "UPKEEP_PART", 2)
    svc, store, pub = make()
    users = [f"u{i}" for i in range(5)]
    svc.on_session_events([connect(f"c{i}", user=u, ts=1000) for i, u in enumerate(users)])
    svc.on_session_events([beat("gw1", [], ts=20_000)])
    assert set(store.conns) == {"c2", "c3", "c4"}
    svc.on_session_events([beat("gw1", [], ts=25_000)])  # the next one: already pending, not removed again
    assert set(store.conns) == {"c2", "c3", "c4"}
    assert svc.remove_pending() == 1
    assert set(store.conns) == {"c4"}
    assert svc.remove_pending() == 0
    assert store.conns == {}
    assert all(not pub.sessions(u)[-1].online and pub.presence(u)[-1].online is False for u in users)
    assert all(len(pub.presence(u)) == 2 for u in users)  # online, then offline once


def test_the_upkeep_thread_removes_what_a_heartbeat_left_pending(monkeypatch: Any) -> None:
    monkeypatch.setattr(service_module, "UPKEEP_PART", 2)
    svc, store, pub = make(expiry_check_s=60)  # it must be woken, not find them on its next round
    svc.on_start()
    try:
        svc.on_session_events([connect(f"c{i}", user=f"u{i}", ts=1000) for i in range(7)])
        svc.on_session_events([beat("gw1", [], ts=20_000)])
        deadline = time.monotonic() + 10
        while store.conns and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.conns == {}
        assert all(not pub.sessions(f"u{i}")[-1].online for i in range(7))
    finally:
        svc.on_stop()


def test_assembler_drops_chunks_of_an_older_heartbeat() -> None:
    asm = HeartbeatAssembler()
    assert asm.add(beat("gw1", [("u", "d", "x")], ts=1, chunk=0, chunks=2)) is None
    assert asm.add(beat("gw1", [("u", "d", "y")], ts=2, chunk=0, chunks=2)) is None
    assert asm.add(beat("gw1", [("u", "d", "z")], ts=2, chunk=1, chunks=2)) == {"y", "z"}
    assert asm.add(beat("gw1", [], ts=3)) == set()


def test_reconcile_rule() -> None:
    old = Conn("old", "u", "d", "gw1", connected_at=1000)
    young = Conn("young", "u", "d", "gw1", connected_at=10_500)
    listed_dead = Conn("back", "u", "d", "gw1", connected_at=1000, live=False)
    listed = Conn("listed", "u", "d", "gw1", connected_at=1000)
    remove, restore = reconcile(20_000, {"back", "listed"}, [old, young, listed_dead, listed], min_age_ms=10_000)
    assert remove == [old]
    assert restore == [listed_dead]


# -- gateway expiry ---------------------------------------------------------------


def test_silent_gateway_connections_go_offline_and_are_published() -> None:
    svc, store, pub = make(gateway_expiry_s=15)
    svc.started_at = 0
    svc.on_session_events([connect("c1", gw="gwdead"), connect("c2", user="bob", gw="gwlive")])
    heard = store.gateways["gwdead"].last_heartbeat
    assert svc.expire_gateways(heard + 14_000) == []
    store.touch_gateways(["gwlive"], heard + 15_500)
    assert svc.expire_gateways(heard + 15_001) == ["gwdead"]
    assert not pub.sessions("alice")[-1].online
    assert pub.presence("alice")[-1].online is False
    assert pub.sessions("alice")[-1].last_seen == heard
    assert pub.sessions("bob")[-1].online
    assert not store.devices[("alice", "d1")].online
    # once expired, not again
    sent = len(pub.sent)
    assert svc.expire_gateways(heard + 30_000) == []
    assert len(pub.sent) == sent


def test_a_large_silent_gateway_is_expired_a_part_at_a_time(monkeypatch: Any) -> None:
    monkeypatch.setattr(service_module, "UPKEEP_PART", 2)
    svc, store, pub = make(gateway_expiry_s=15)
    svc.started_at = 0
    users = [f"u{i}" for i in range(5)]
    svc.on_session_events([connect(f"c{i}", user=u, gw="gwdead") for i, u in enumerate(users)])
    heard = store.gateways["gwdead"].last_heartbeat
    parts: list[list[str]] = []
    mark = store.set_connections_live
    monkeypatch.setattr(store, "set_connections_live", lambda ids, live: (parts.append(ids), mark(ids, live)))
    assert svc.expire_gateways(heard + 16_000) == ["gwdead"]
    assert [len(p) for p in parts] == [2, 2, 1]
    assert all(not pub.sessions(u)[-1].online for u in users)
    assert store.gateways["gwdead"].expired


def test_a_gateway_heard_from_while_being_expired_is_left_to_its_heartbeat(monkeypatch: Any) -> None:
    monkeypatch.setattr(service_module, "UPKEEP_PART", 2)
    svc, store, pub = make(gateway_expiry_s=15)
    svc.started_at = 0
    svc.on_session_events([connect(f"c{i}", user=f"u{i}", gw="gw1") for i in range(5)])
    heard = store.gateways["gw1"].last_heartbeat
    mark = store.set_connections_live

    def back_after_first_part(ids: list[str], live: bool) -> None:
        mark(ids, live)
        store.touch_gateways(["gw1"], heard + 16_500)  # its heartbeat, read by the consumer meanwhile

    monkeypatch.setattr(store, "set_connections_live", back_after_first_part)
    assert svc.expire_gateways(heard + 16_000) == []
    assert not store.gateways["gw1"].expired
    assert sum(c.live for c in store.conns.values()) == 3  # only the first part went offline
    monkeypatch.setattr(store, "set_connections_live", mark)
    svc.on_session_events([beat("gw1", [(f"u{i}", "d1", f"c{i}") for i in range(5)], ts=heard + 17_000)])
    assert all(c.live for c in store.conns.values())  # the heartbeat brought them back
    assert all(pub.sessions(f"u{i}")[-1].online for i in range(5))


def test_heartbeat_brings_back_expired_connections_it_still_holds() -> None:
    svc, store, pub = make()
    svc.started_at = 0
    svc.on_session_events([connect("c1", ts=1000)])
    heard = store.gateways["gw1"].last_heartbeat
    svc.expire_gateways(heard + 16_000)
    assert not pub.sessions("alice")[-1].online
    svc.on_session_events([beat("gw1", [("alice", "d1", "c1")], ts=40_000)])
    assert pub.sessions("alice")[-1].online
    assert [p.online for p in pub.presence("alice")] == [True, False, True]
    assert not store.gateways["gw1"].expired


def test_no_expiry_right_after_start() -> None:
    svc, store, _ = make(gateway_expiry_s=15)
    store.gateways["gw1"] = GatewayState("gw1", last_heartbeat=0)
    svc.started_at = 100_000
    assert svc.expire_gateways(110_000) == []
    assert svc.expire_gateways(115_001) == ["gw1"]


def test_tombstones_of_long_gone_gateways_are_forgotten() -> None:
    svc, store, _ = make(gateway_expiry_s=15, tombstone_retention_s=60)
    svc.started_at = 0
    svc.on_session_events([connect("c1")])
    heard = store.gateways["gw1"].last_heartbeat
    svc.expire_gateways(heard + 16_000)
    assert "c1" in store.conns and not store.conns["c1"].live
    svc.expire_gateways(heard + 61_000)
    assert store.conns == {}


def test_gateways_to_expire_rule() -> None:
    gws = [GatewayState("a", 1000), GatewayState("b", 9000), GatewayState("c", 0, expired=True)]
    assert [g.gateway for g in gateways_to_expire(gws, now=20_000, expiry_ms=15_000, started_at=0)] == ["a"]
    assert gateways_to_expire(gws, now=20_000, expiry_ms=15_000, started_at=10_000) == []


# -- compute_user -----------------------------------------------------------------


def test_only_changed_states_are_written_again(monkeypatch: Any) -> None:
    """A connect of one more device writes that device, not again the user's other online ones
    (their last_seen would be the only change) nor the user who was online already."""
    svc, store, pub = make()
    svc.on_session_events([connect(f"c{i}", device=f"d{i}", ts=1000 + i) for i in range(3)])
    written: list[tuple[list[DeviceState], list[UserState]]] = []
    write = store.set_states
    monkeypatch.setattr(store, "set_states", lambda ds, us: (written.append((ds, us)), write(ds, us)))
    svc.on_session_events([connect("c3", device="d3", ts=2000)])
    assert [[d.device_id for d in ds] for ds, _ in written] == [["d3"]]
    assert [us for _, us in written] == [[]]
    assert pub.sessions("alice")[-1].online and len(pub.sessions("alice")[-1].devices) == 4
    svc.on_session_events([disconnect(f"c{i}", device=f"d{i}", ts=3000) for i in range(4)])
    assert sorted(d.device_id for d in written[-1][0]) == ["d0", "d1", "d2", "d3"]  # each went offline
    assert [u.online for u in written[-1][1]] == [False]
    assert all(not d.online and d.last_seen > 0 for d in store.devices.values())


def test_state_changed_rule() -> None:
    on = DeviceState("u", "d", "mobile", True, True, "gw1", "c1", 1, last_seen=100)
    assert state_changed(None, on)
    assert not state_changed(on, replace(on, last_seen=200))  # online both times: seen now anyway
    assert state_changed(on, replace(on, last_seen=200, conn_id="c2"))
    assert state_changed(on, replace(on, online=False, last_seen=200))
    off = replace(on, online=False)
    assert state_changed(off, replace(off, last_seen=200))
    assert not state_changed(UserState("u", True, 1), UserState("u", True, 2))
    assert state_changed(UserState("u", True, 1), UserState("u", False, 2))


def test_compute_user_keeps_last_seen_of_untouched_offline_devices() -> None:
    prev = [
        DeviceState("u", "old", "web", False, False, "gw1", "x", 1, last_seen=500),
        DeviceState("u", "phone", "mobile", True, True, "gw1", "y", 2, last_seen=900),
    ]
    up = compute_user("u", [], prev, UserState("u", True, 900), now=2000)
    by_id = {d.device_id: d for d in up.devices}
    assert by_id["old"].last_seen == 500
    assert by_id["phone"].last_seen == 2000 and not by_id["phone"].online
    assert up.user == UserState("u", False, 2000)
    assert up.presence is not None and not up.presence.online


def test_compute_user_expired_connection_is_not_online() -> None:
    conns = [Conn("c", "u", "d", "gw1", 1, live=False)]
    up = compute_user("u", conns, [], None, now=10)
    assert not up.user.online and up.sessions.devices == [] and up.presence is None


# -- the topic lost -----------------------------------------------------------------


def test_every_users_sessions_are_republished_as_last_published_when_the_topic_lost_them() -> None:
    svc, _, pub = make()
    svc.on_session_events(
        [
            connect("c1", "alice", "d1", "gw1", ts=1000),
            connect("c2", "alice", "d2", "gw2", ts=1100, primary=False),
            connect("c3", "bob", "d1", "gw1", ts=1200),
        ]
    )
    svc.on_session_events([disconnect("c3", "bob", "d1", "gw1", ts=1300)])
    last = {u: pub.sessions(u)[-1] for u in ("alice", "bob")}
    pub.sent.clear()

    svc.on_setup()  # the topic kept them
    assert pub.sent == []

    svc.owned.lost = True  # type: ignore[attr-defined]
    svc.on_setup()
    assert {u: pub.sessions(u) for u in ("alice", "bob")} == {u: [s] for u, s in last.items()}
    assert [k for _, k, _ in pub.sent] == ["alice", "bob"] and pub.flushed
    assert not [e for _, _, e in pub.sent if isinstance(e, PresenceChanged)]
