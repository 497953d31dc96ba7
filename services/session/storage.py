"""MongoDB access of the session service (the only module here that uses pymongo).

Collections:
- ``session_connections``: one document per socket (``_id`` = conn_id), ``live``
  false once its gateway expired (a tombstone a later heartbeat may revive);
- ``session_devices``: per device (``_id`` = user_id/device_id): gateway,
  conn_id, connected_at of its latest socket, online, last_seen, device_type,
  primary;
- ``session_users``: per user: online, last_seen (to see presence flips);
- ``session_gateways``: per gateway instance: last heartbeat (this service's clock).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from chatlib.mongo import Index, chunked, find_in
from pymongo import DeleteOne, ReplaceOne, UpdateOne
from pymongo.database import Database

from .logic import Conn, DeviceState, GatewayState, UserState

CONNECTIONS = "session_connections"
DEVICES = "session_devices"
USERS = "session_users"
GATEWAYS = "session_gateways"


def _conn(doc: dict[str, Any]) -> Conn:
    return Conn(
        conn_id=doc["_id"],
        user_id=doc["user_id"],
        device_id=doc["device_id"],
        gateway=doc["gateway"],
        connected_at=int(doc.get("connected_at", 0)),
        device_type=doc.get("device_type", "mobile"),
        primary=bool(doc.get("primary", False)),
        live=bool(doc.get("live", True)),
    )


def _device(doc: dict[str, Any]) -> DeviceState:
    return DeviceState(
        user_id=doc["user_id"],
        device_id=doc["device_id"],
        device_type=doc.get("device_type", "mobile"),
        primary=bool(doc.get("primary", False)),
        online=bool(doc.get("online", False)),
        gateway=doc.get("gateway", ""),
        conn_id=doc.get("conn_id", ""),
        connected_at=int(doc.get("connected_at", 0)),
        last_seen=int(doc.get("last_seen", 0)),
        connections=int(doc.get("connections", 0)),
    )


def device_doc(d: DeviceState) -> dict[str, Any]:
    return {
        "_id": f"{d.user_id}/{d.device_id}",
        "user_id": d.user_id,
        "device_id": d.device_id,
        "device_type": d.device_type,
        "primary": d.primary,
        "online": d.online,
        "gateway": d.gateway,
        "conn_id": d.conn_id,
        "connected_at": d.connected_at,
        "last_seen": d.last_seen,
        "connections": d.connections,
    }


class SessionStore:
    """Sessions: connections, devices, users, gateways."""

    INDEXES = [
        Index(CONNECTIONS, [("user_id", 1)]),
        Index(CONNECTIONS, [("gateway", 1)]),
        Index(DEVICES, [("user_id", 1)]),
    ]

    def __init__(self, db: Database[dict[str, Any]]):
        self.db = db
        self.conns = db[CONNECTIONS]
        self.devices = db[DEVICES]
        self.users = db[USERS]
        self.gateways = db[GATEWAYS]

    # -- connections --------------------------------------------------------

    def apply_connection_ops(self, ops: list[tuple[str, Conn | str]]) -> None:
        """Upserts and deletes of connections, in order, in one round trip."""
        requests: list[Any] = []
        for op, arg in ops:
            if op == "upsert":
                assert isinstance(arg, Conn)
                requests.append(
                    ReplaceOne(
                        {"_id": arg.conn_id},
                        {
                            "user_id": arg.user_id,
                            "device_id": arg.device_id,
                            "gateway": arg.gateway,
                            "connected_at": arg.connected_at,
                            "device_type": arg.device_type,
                            "primary": arg.primary,
                            "live": True,
                        },
                        upsert=True,
                    )
                )
            else:
                requests.append(DeleteOne({"_id": arg}))
        if requests:
            self.conns.bulk_write(requests, ordered=True)

    def delete_connections(self, conn_ids: list[str]) -> None:
        for part in chunked(conn_ids):
            self.conns.delete_many({"_id": {"$in": part}})

    def set_connections_live(self, conn_ids: list[str], live: bool) -> None:
        for part in chunked(conn_ids):
            self.conns.update_many({"_id": {"$in": part}}, {"$set": {"live": live}})

    def get_connections_of_users(self, user_ids: Iterable[str]) -> list[Conn]:
        return [_conn(d) for d in find_in(self.conns, "user_id", user_ids)]

    def get_connections_of_gateway(self, gateway: str, live_only: bool = False) -> list[Conn]:
        query: dict[str, Any] = {"gateway": gateway}
        if live_only:
            query["live"] = True
        return [_conn(d) for d in self.conns.find(query)]

    def delete_tombstones(self, gateways: list[str]) -> None:
        """Forget connections of gateways long gone (expired and never heard of again)."""
        if gateways:
            self.conns.delete_many({"gateway": {"$in": gateways}, "live": False})

    # -- devices and users --------------------------------------------------

    def get_devices_of_users(self, user_ids: Iterable[str]) -> list[DeviceState]:
        return [_device(d) for d in find_in(self.devices, "user_id", user_ids)]

    def get_users(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        return {
            d["_id"]: UserState(d["_id"], bool(d.get("online", False)), int(d.get("last_seen", 0)))
            for d in find_in(self.users, "_id", user_ids)
        }

    def get_all_users(self, batch: int = 500) -> Iterator[list[UserState]]:
        """Every user with a stored state, ``batch`` at a time (ordered by id)."""
        part: list[UserState] = []
        for d in self.users.find({}).sort("_id", 1):
            part.append(UserState(d["_id"], bool(d.get("online", False)), int(d.get("last_seen", 0))))
            if len(part) == batch:
                yield part
                part = []
        if part:
            yield part

    def set_states(self, devices: list[DeviceState], users: list[UserState]) -> None:
        """Write device and user states, one bulk per collection."""
        if devices:
            self.devices.bulk_write(
                [ReplaceOne({"_id": doc["_id"]}, doc, upsert=True) for doc in map(device_doc, devices)]
            )
        if users:
            self.users.bulk_write(
                [
                    ReplaceOne({"_id": u.user_id}, {"online": u.online, "last_seen": u.last_seen}, upsert=True)
                    for u in users
                ]
            )

    # -- gateways -----------------------------------------------------------

    def touch_gateways(self, gateways: Iterable[str], now: int) -> None:
        """These gateways were heard from at ``now``."""
        requests = [
            UpdateOne({"_id": gw}, {"$max": {"last_heartbeat": now}, "$set": {"expired": False}}, upsert=True)
            for gw in sorted(set(gateways))
        ]
        if requests:
            self.gateways.bulk_write(requests)

    def get_gateways(self) -> list[GatewayState]:
        return [
            GatewayState(d["_id"], int(d.get("last_heartbeat", 0)), bool(d.get("expired", False)))
            for d in self.gateways.find({})
        ]

    def set_gateway_expired(self, gateway: str) -> None:
        self.gateways.update_one({"_id": gateway}, {"$set": {"expired": True}})
