"""Pure rules of the session service: which device is online where.

The unit of state is a connection (one socket: ``conn_id``). A device is online
while any of its connections is live; a user while any device is. Connects and
disconnects only ever touch their own ``conn_id``, so a late disconnect of an
old socket cannot take a newer socket offline. Gateways that stop sending
heartbeats get their connections marked offline (kept as tombstones, so a
heartbeat that still lists them brings them back); heartbeats remove
connections that their gateway no longer holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from chatlib.schemas import (
    DeviceConnected,
    DeviceDisconnected,
    Event,
    GatewayHeartbeat,
    PresenceChanged,
    SessionDevice,
    UserSessions,
)

#: A connection missing from its gateway's heartbeat is removed only if older than this
#: (the heartbeat may have been taken before the connect was processed).
RECONCILE_MIN_AGE_MS = 10_000


@dataclass(frozen=True)
class Conn:
    """One socket as the session store keeps it."""

    conn_id: str
    user_id: str
    device_id: str
    gateway: str
    connected_at: int
    device_type: str = "mobile"
    primary: bool = False
    live: bool = True


@dataclass(frozen=True)
class DeviceState:
    """Per device: where it is connected (latest socket), online, last seen."""

    user_id: str
    device_id: str
    device_type: str
    primary: bool
    online: bool
    gateway: str
    conn_id: str
    connected_at: int
    last_seen: int
    connections: int = 0


@dataclass(frozen=True)
class UserState:
    user_id: str
    online: bool
    last_seen: int


@dataclass(frozen=True)
class GatewayState:
    gateway: str
    last_heartbeat: int
    expired: bool = False


# ---------------------------------------------------------------------------
# Events to connection operations
# ---------------------------------------------------------------------------


@dataclass
class Plan:
    """What one batch of session events changes."""

    #: ("upsert", Conn) or ("delete", conn_id), in event order.
    ops: list[tuple[str, Conn | str]] = field(default_factory=list)
    #: Users whose state must be recomputed and published.
    users: set[str] = field(default_factory=set)
    #: Devices with a connect or disconnect in this batch (their last_seen is now), with
    #: the batch's last connect of that device if any.
    touched: dict[tuple[str, str], Conn | None] = field(default_factory=dict)
    #: Gateways proven alive by this batch.
    gateways: set[str] = field(default_factory=set)
    #: Complete heartbeats: gateway -> (ts, conn ids it holds); the latest per gateway.
    heartbeats: dict[str, tuple[int, set[str]]] = field(default_factory=dict)


class HeartbeatAssembler:
    """Joins the chunks of one heartbeat (same gateway and ts) into the full set of conn ids."""

    def __init__(self) -> None:
        self._parts: dict[str, tuple[int, dict[int, list[str]]]] = {}

    def add(self, hb: GatewayHeartbeat) -> set[str] | None:
        """The complete set once every chunk of this heartbeat is in, else None."""
        conn_ids = [c[2] for c in hb.connections]
        if hb.chunks <= 1:
            self._parts.pop(hb.gateway, None)
            return set(conn_ids)
        ts, parts = self._parts.get(hb.gateway, (hb.ts, {}))
        if ts != hb.ts:
            parts = {}  # a newer heartbeat started: the older one's missing chunks will not come
        parts[hb.chunk] = conn_ids
        if len(parts) < hb.chunks:
            self._parts[hb.gateway] = (hb.ts, parts)
            return None
        self._parts.pop(hb.gateway, None)
        return {c for part in parts.values() for c in part}


def plan_events(events: Iterable[Event], assembler: HeartbeatAssembler) -> Plan:
    """Turn a batch of SESSION_EVENTS into connection operations."""
    plan = Plan()
    for ev in events:
        if isinstance(ev, DeviceConnected):
            conn = Conn(
                conn_id=ev.conn_id,
                user_id=ev.user_id,
                device_id=ev.device_id,
                gateway=ev.gateway,
                connected_at=ev.ts,
                device_type=ev.device_type,
                primary=ev.primary,
            )
            plan.ops.append(("upsert", conn))
            plan.users.add(ev.user_id)
            plan.touched[(ev.user_id, ev.device_id)] = conn
            plan.gateways.add(ev.gateway)
        elif isinstance(ev, DeviceDisconnected):
            plan.ops.append(("delete", ev.conn_id))
            plan.users.add(ev.user_id)
            plan.touched.setdefault((ev.user_id, ev.device_id), None)
            plan.gateways.add(ev.gateway)
        elif isinstance(ev, GatewayHeartbeat):
            plan.gateways.add(ev.gateway)
            held = assembler.add(ev)
            if held is not None:
                plan.heartbeats[ev.gateway] = (ev.ts, held)
    return plan


def reconcile(
    hb_ts: int, held: set[str], existing: Iterable[Conn], min_age_ms: int = RECONCILE_MIN_AGE_MS
) -> tuple[list[Conn], list[Conn]]:
    """A gateway's complete heartbeat against what the store has for it: (to remove, to bring back).

    Removed: connections it no longer holds that are older than ``min_age_ms``
    (younger ones may simply be newer than the heartbeat). Brought back:
    connections marked offline by expiry that the gateway still holds.
    """
    remove: list[Conn] = []
    restore: list[Conn] = []
    for conn in existing:
        if conn.conn_id in held:
            if not conn.live:
                restore.append(conn)
        elif conn.connected_at < hb_ts - min_age_ms:
            remove.append(conn)
    return remove, restore


def gateways_to_expire(
    gateways: Iterable[GatewayState], now: int, expiry_ms: int, started_at: int
) -> list[GatewayState]:
    """Gateways silent for longer than ``expiry_ms``.

    Silence is counted from this process's start at the earliest: right after a
    restart the heartbeats of live gateways may still be unread.
    """
    return [g for g in gateways if not g.expired and now - max(g.last_heartbeat, started_at) > expiry_ms]


# ---------------------------------------------------------------------------
# Connections to device and user state
# ---------------------------------------------------------------------------


@dataclass
class UserUpdate:
    """The new state of one user, what to store and what to publish."""

    user: UserState
    devices: list[DeviceState]
    sessions: UserSessions
    presence: PresenceChanged | None


def compute_user(
    user_id: str,
    conns: Iterable[Conn],
    prev_devices: Iterable[DeviceState],
    prev_user: UserState | None,
    now: int,
    touched: Mapping[tuple[str, str], Conn | None] | None = None,
) -> UserUpdate:
    """The user's devices and user-level state from their connections.

    ``last_seen`` is ``now`` for a device that is online or had a connect or
    disconnect just now, and stays what it was otherwise. ``presence`` is set
    only when the user-level online state flips.
    """
    live: dict[str, list[Conn]] = {}
    for c in conns:
        if c.live:
            live.setdefault(c.device_id, []).append(c)
    touched = touched or {}
    previous = {d.device_id: d for d in prev_devices}
    # A device connected and disconnected within one batch has no stored state yet.
    for (uid, device_id), conn in touched.items():
        if uid == user_id and device_id not in previous and device_id not in live and conn is not None:
            previous[device_id] = DeviceState(
                user_id,
                device_id,
                conn.device_type,
                conn.primary,
                True,
                conn.gateway,
                conn.conn_id,
                conn.connected_at,
                0,
            )
    devices: list[DeviceState] = []
    for device_id in sorted(set(previous) | set(live)):
        mine = live.get(device_id, [])
        prev = previous.get(device_id)
        if mine:
            latest = max(mine, key=lambda c: (c.connected_at, c.conn_id))
            devices.append(
                DeviceState(
                    user_id=user_id,
                    device_id=device_id,
                    device_type=latest.device_type,
                    primary=latest.primary,
                    online=True,
                    gateway=latest.gateway,
                    conn_id=latest.conn_id,
                    connected_at=latest.connected_at,
                    last_seen=now,
                    connections=len(mine),
                )
            )
        elif prev is not None:
            seen_now = prev.online or (user_id, device_id) in touched
            devices.append(replace(prev, online=False, connections=0, last_seen=now if seen_now else prev.last_seen))
    online = any(d.online for d in devices)
    was_online = prev_user.online if prev_user is not None else False
    if online:
        last_seen = now
    else:
        seen = [d.last_seen for d in devices]
        last_seen = max(seen) if seen else (prev_user.last_seen if prev_user else 0)
    user = UserState(user_id, online, last_seen)
    sessions = UserSessions(user_id=user_id, devices=session_devices(live), online=online, last_seen=last_seen)
    presence = PresenceChanged(user_id=user_id, online=online, last_seen=last_seen) if online != was_online else None
    return UserUpdate(user, devices, sessions, presence)


def state_changed(before: DeviceState | UserState | None, after: DeviceState | UserState) -> bool:
    """Whether a device's or user's state must be written again.

    An online device or user is seen now, whatever ``last_seen`` says, so
    while it stays online only a change of anything else is a change: a
    reconnect storm recomputes every device of every user it touches, and
    rewriting them all for a new ``last_seen`` was most of its writes.
    ``last_seen`` is written when it goes offline (see :func:`compute_user`).
    """
    if before is None:
        return True
    if before.online and after.online:
        return replace(before, last_seen=after.last_seen) != after
    return before != after


def stored_sessions(user: UserState, conns: Iterable[Conn]) -> UserSessions:
    """The UserSessions last published for ``user``, rebuilt from what is stored.

    :func:`compute_user` stores the user's state and publishes its live
    connections; both are still in MongoDB, so this is the same record.
    """
    live: dict[str, list[Conn]] = {}
    for c in conns:
        if c.live and c.user_id == user.user_id:
            live.setdefault(c.device_id, []).append(c)
    return UserSessions(
        user_id=user.user_id, devices=session_devices(live), online=user.online, last_seen=user.last_seen
    )


def session_devices(live: dict[str, list[Conn]]) -> list[SessionDevice]:
    """One entry per (device, gateway): the latest socket the device has on that gateway.

    A device with sockets on two gateways appears twice, so routers send to both.
    """
    out: list[SessionDevice] = []
    for device_id in sorted(live):
        per_gateway: dict[str, Conn] = {}
        for c in live[device_id]:
            best = per_gateway.get(c.gateway)
            if best is None or (c.connected_at, c.conn_id) > (best.connected_at, best.conn_id):
                per_gateway[c.gateway] = c
        for gw in sorted(per_gateway):
            c = per_gateway[gw]
            out.append(
                SessionDevice(
                    device_id=device_id,
                    gateway=gw,
                    conn_id=c.conn_id,
                    connected_at=c.connected_at,
                    device_type=c.device_type,
                    primary=c.primary,
                )
            )
    return out
