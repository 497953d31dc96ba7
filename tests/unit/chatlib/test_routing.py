"""chatlib.routing: which sockets are new to the session view, and the recent messages they may lack."""

from __future__ import annotations

from chatlib.routing import RecentMessages, new_devices, recent_for_new_devices
from chatlib.schemas import DeviceRef, SessionDevice, UserSessions


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def sessions(user: str, *devices: tuple[str, str, str]) -> UserSessions:
    """``devices``: (device id, gateway, connection id)."""
    return UserSessions(
        user_id=user,
        devices=[SessionDevice(device_id=d, gateway=g, conn_id=c, connected_at=1) for d, g, c in devices],
        online=bool(devices),
        last_seen=1,
    )


def frame(conv: str, seq: int) -> dict[str, object]:
    return {"type": "message", "conversation": conv, "seq": seq}


def test_new_devices_are_the_sockets_the_previous_state_did_not_list() -> None:
    before = sessions("bob", ("phone", "gw1", "c1"))
    after = sessions("bob", ("phone", "gw1", "c1"), ("web", "gw2", "c2"), ("phone", "gw1", "c3"))
    assert new_devices(after, before) == {
        "gw2": [DeviceRef(user_id="bob", device_id="web")],
        # the phone's second socket is new; the device is named once
        "gw1": [DeviceRef(user_id="bob", device_id="phone")],
    }
    assert new_devices(before, None) == {"gw1": [DeviceRef(user_id="bob", device_id="phone")]}
    assert new_devices(before, before) == {}
    assert new_devices(sessions("bob"), before) == {}


def test_recent_keeps_the_newest_message_of_each_conversation_per_user() -> None:
    clock = Clock()
    recent = RecentMessages(60, clock=clock)
    recent.note("dm:a:b", frame("dm:a:b", 1), ["a", "b"])
    recent.note("dm:a:b", frame("dm:a:b", 2), ["a", "b"])
    recent.note("group:g", frame("group:g", 7), ["a", "c"])
    assert sorted(f["seq"] for f in recent.for_user("a")) == [2, 7]  # type: ignore[type-var]
    assert recent.for_user("b") == [frame("dm:a:b", 2)]
    assert recent.for_user("c") == [frame("group:g", 7)]
    assert recent.for_user("nobody") == []


def test_recent_forgets_what_is_older_than_its_window() -> None:
    clock = Clock()
    recent = RecentMessages(60, clock=clock)
    recent.note("dm:a:b", frame("dm:a:b", 1), ["a", "b"])
    clock.t += 30
    recent.note("group:g", frame("group:g", 3), ["a"])
    clock.t += 31
    assert recent.for_user("a") == [frame("group:g", 3)]
    assert recent.for_user("b") == []
    # the next note past a window sweeps what expired, so memory follows the traffic
    recent.note("group:h", frame("group:h", 1), ["c"])
    assert len(recent) == 2 and recent.for_user("a") == [frame("group:g", 3)]
    clock.t += 61
    recent.note("group:h", frame("group:h", 2), ["c"])
    assert len(recent) == 1 and recent.for_user("a") == []


def test_a_window_of_zero_keeps_nothing() -> None:
    recent = RecentMessages(0)
    recent.note("dm:a:b", frame("dm:a:b", 1), ["a", "b"])
    assert recent.for_user("a") == [] and len(recent) == 0


def test_only_a_new_socket_gets_the_recent_messages_of_its_user() -> None:
    recent = RecentMessages(60)
    recent.note("dm:a:b", frame("dm:a:b", 4), ["a", "b"])
    before = sessions("b", ("phone", "gw1", "c1"))
    after = sessions("b", ("phone", "gw1", "c1"), ("web", "gw2", "c2"))
    outbox = recent_for_new_devices(recent, after, before, 64 * 1024)
    assert outbox is not None
    [(gateway, deliver)] = outbox.delivers()
    assert gateway == "gw2" and deliver.targets == [DeviceRef(user_id="b", device_id="web")]
    assert deliver.frames == [frame("dm:a:b", 4)]
    # nothing new, nobody online, or nothing recent: nothing to send
    assert recent_for_new_devices(recent, after, after, 64 * 1024) is None
    assert recent_for_new_devices(recent, sessions("b"), after, 64 * 1024) is None
    assert recent_for_new_devices(recent, sessions("x", ("p", "gw1", "c9")), None, 64 * 1024) is None
