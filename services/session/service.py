"""The session service: which device is connected to which gateway, and presence.

It consumes SESSION_EVENTS (DeviceConnected, DeviceDisconnected,
GatewayHeartbeat) in its own group, one database round trip per step of a
poll, and after every change publishes the user's UserSessions on the
compacted SESSION_CHANGES (keyed by user_id) and, when the user-level online
state flips, PresenceChanged on PRESENCE. A background loop marks the
connections of silent gateways offline.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from chatlib.mongo import chunked
from chatlib.republish import OwnedTopic
from chatlib.schemas import Event, now_ms
from chatlib.service import Producer, Service, ServiceConfig, Storage, consume
from chatlib.topics import PRESENCE, SESSION_CHANGES, SESSION_EVENTS
from flask import Flask
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import http, logic
from .logic import HeartbeatAssembler
from .storage import SessionStore

logger = logging.getLogger(__name__)

#: A poll of connection events that takes longer than this is logged with where its time went
#: (KAFKA_MAX_POLL_INTERVAL_MS is 10 s: a poll past it costs the consumer its partitions).
SLOW_POLL_S = 2.0
#: Connections removed or marked offline under one hold of the lock. A gateway restarted with
#: 10,000 sockets (its heartbeat no longer lists any of them) or gone silent with them is
#: thousands of database writes: done in one poll they overran the poll interval. Past this
#: many, a heartbeat's removals go to the upkeep thread, which does them a part at a time.
UPKEEP_PART = 500
#: Between two parts the upkeep thread lets go of the lock this long: a lock is not fair
#: (under gevent least of all), and a consumer kept waiting for the whole job overran anyway.
UPKEEP_PAUSE_S = 0.05


class SessionConfig(ServiceConfig):
    """SESSION_* settings (see .env.tmpl)."""

    model_config = SettingsConfigDict(env_prefix="SESSION_", extra="ignore")

    port: int = 8104
    # A gateway silent this long has its connections marked offline.
    gateway_expiry_s: float = Field(15.0, gt=0)
    # How often silent gateways are looked for.
    expiry_check_s: float = Field(1.0, gt=0)
    # Connections of a gateway expired this long ago (and silent since) are forgotten.
    tombstone_retention_s: float = Field(3600.0, gt=0)


class Session(Service):
    """Device sessions and presence."""

    name = "session"
    config_class = SessionConfig

    store = Storage(SessionStore)
    producer = Producer()
    owned = OwnedTopic(SESSION_CHANGES)

    config: SessionConfig

    def __init__(self, config: SessionConfig, **overrides: Any):
        super().__init__(config, **overrides)
        # The consumer and the upkeep thread both recompute users: one at a time.
        self._lock = threading.Lock()
        self._assembler = HeartbeatAssembler()
        self._stopping = threading.Event()
        #: Connections a heartbeat said are gone, not removed yet (the upkeep thread's work).
        self._to_remove: dict[str, logic.Conn] = {}
        self._upkeep_wanted = threading.Event()
        self.started_at = now_ms()

    # -- lifecycle --------------------------------------------------------

    def on_setup(self) -> None:
        """Put every user's sessions back on the topic if the broker lost it (before any consumer runs)."""
        self.owned.restore_if_lost(self.republish_all)

    def on_start(self) -> None:
        self.started_at = now_ms()
        threading.Thread(target=self._upkeep_loop, name="session-upkeep", daemon=True).start()

    def on_stop(self) -> None:
        self._stopping.set()
        self._upkeep_wanted.set()

    def on_broker_lost(self) -> None:
        """The broker came back empty while serving: put every record of the topic back."""
        self.owned.republish(self.republish_all)

    def routes(self, app: Flask) -> None:
        app.register_blueprint(http.blueprint(self))

    # -- Kafka ------------------------------------------------------------

    @consume(SESSION_EVENTS, group="session", batch=True)
    def on_session_events(self, events: list[Event]) -> None:
        """Connects, disconnects and heartbeats of one poll, applied together."""
        marks = [time.perf_counter()]
        with self._lock:
            marks.append(time.perf_counter())
            now = now_ms()
            plan = logic.plan_events(events, self._assembler)
            self.store.touch_gateways(plan.gateways, now)
            self.store.apply_connection_ops(plan.ops)
            marks.append(time.perf_counter())
            users = set(plan.users)
            for gateway, (hb_ts, held) in plan.heartbeats.items():
                existing = self.store.get_connections_of_gateway(gateway)
                remove, restore = logic.reconcile(hb_ts, held, existing)
                remove = [c for c in remove if c.conn_id not in self._to_remove]
                if remove:
                    logger.info("gateway %s no longer holds %d connections: removed", gateway, len(remove))
                if len(remove) > UPKEEP_PART:  # the rest by the upkeep thread
                    remove.sort(key=lambda c: c.user_id)  # a user's connections together, mostly
                    self._to_remove.update((c.conn_id, c) for c in remove[UPKEEP_PART:])
                    remove = remove[:UPKEEP_PART]
                    self._upkeep_wanted.set()
                if remove:
                    self.store.delete_connections([c.conn_id for c in remove])
                if restore:
                    logger.info("gateway %s still holds %d expired connections: back online", gateway, len(restore))
                    self.store.set_connections_live([c.conn_id for c in restore], True)
                users.update(c.user_id for c in remove + restore)
            marks.append(time.perf_counter())
            self._publish_users(users, now, plan.touched)
            marks.append(time.perf_counter())
        if marks[-1] - marks[0] > SLOW_POLL_S:
            waited, ops, reconciled, published = (b - a for a, b in itertools.pairwise(marks))
            logger.warning(
                "session events: a poll of %d took %.1fs (lock wait %.1fs, %d connection ops %.1fs, "
                "%d heartbeats reconciled %.1fs, %d users published %.1fs)",
                len(events),
                marks[-1] - marks[0],
                waited,
                len(plan.ops),
                ops,
                len(plan.heartbeats),
                reconciled,
                len(users),
                published,
            )

    # -- upkeep: expiry and large removals ---------------------------------

    def expire_gateways(self, now: int) -> list[str]:
        """Mark the connections of silent gateways offline and publish; returns the gateways expired.

        A part of UPKEEP_PART connections at a time under the lock, so the
        consumer is not held up for the whole of a large gateway; a gateway
        heard from again meanwhile is left to its heartbeat (which brings back
        what it still holds).
        """
        expiry_ms = int(self.config.gateway_expiry_s * 1000)
        with self._lock:
            gateways = self.store.get_gateways()
        expired: list[str] = []
        for gw in logic.gateways_to_expire(gateways, now, expiry_ms, self.started_at):
            started = time.perf_counter()
            with self._lock:
                conns = sorted(
                    self.store.get_connections_of_gateway(gw.gateway, live_only=True), key=lambda c: c.user_id
                )
            marked = 0
            # The last, empty part marks the gateway expired, under the same check.
            for n, part in enumerate([*chunked(conns, UPKEEP_PART), []]):
                if n:
                    time.sleep(UPKEEP_PAUSE_S)
                with self._lock:
                    if not self._still_silent(gw.gateway, now, expiry_ms):
                        logger.warning("gateway %s heard from again while being expired", gw.gateway)
                        break
                    if not part:  # every part done
                        self.store.set_gateway_expired(gw.gateway)
                        expired.append(gw.gateway)
                        break
                    self.store.set_connections_live([c.conn_id for c in part], False)
                    # They were last seen when their gateway was last heard from.
                    self._publish_users({c.user_id for c in part}, max(gw.last_heartbeat, 0) or now, {})
                    marked += len(part)
            logger.warning(
                "gateway %s silent since %d: %d connections marked offline (%.1fs)",
                gw.gateway,
                gw.last_heartbeat,
                marked,
                time.perf_counter() - started,
            )
        retention = int(self.config.tombstone_retention_s * 1000)
        gone = [g.gateway for g in gateways if g.expired and now - g.last_heartbeat > retention]
        with self._lock:
            self.store.delete_tombstones(gone)
        return expired

    def _still_silent(self, gateway: str, now: int, expiry_ms: int) -> bool:
        fresh = [g for g in self.store.get_gateways() if g.gateway == gateway]
        return bool(logic.gateways_to_expire(fresh, now, expiry_ms, self.started_at))

    def remove_pending(self) -> int:
        """Remove up to UPKEEP_PART of the connections heartbeats said are gone and publish their
        users; returns how many are still pending."""
        with self._lock:
            part = list(itertools.islice(self._to_remove.values(), UPKEEP_PART))
            if part:
                self.store.delete_connections([c.conn_id for c in part])
                self._publish_users({c.user_id for c in part}, now_ms(), {})
                for c in part:
                    del self._to_remove[c.conn_id]
            return len(self._to_remove)

    def _upkeep_loop(self) -> None:
        while not self._stopping.is_set():
            pending = 0
            try:
                self.expire_gateways(now_ms())
                pending = self.remove_pending()
            except Exception:
                logger.warning("session upkeep failed", exc_info=True)
            if pending:
                self._stopping.wait(UPKEEP_PAUSE_S)
            else:
                self._upkeep_wanted.wait(self.config.expiry_check_s)
                self._upkeep_wanted.clear()

    # -- publishing -------------------------------------------------------

    def _publish_users(
        self, users: Iterable[str], now: int, touched: Mapping[tuple[str, str], logic.Conn | None]
    ) -> None:
        """Recompute, store and publish the state of these users."""
        user_ids = sorted(set(users))
        if not user_ids:
            return
        conns: dict[str, list[logic.Conn]] = {}
        for c in self.store.get_connections_of_users(user_ids):
            conns.setdefault(c.user_id, []).append(c)
        devices: dict[str, list[logic.DeviceState]] = {}
        for d in self.store.get_devices_of_users(user_ids):
            devices.setdefault(d.user_id, []).append(d)
        previous = self.store.get_users(user_ids)
        updates = [
            logic.compute_user(u, conns.get(u, []), devices.get(u, []), previous.get(u), now, touched) for u in user_ids
        ]
        stored = {(d.user_id, d.device_id): d for ds in devices.values() for d in ds}
        self.store.set_states(
            [d for up in updates for d in up.devices if logic.state_changed(stored.get((d.user_id, d.device_id)), d)],
            [up.user for up in updates if logic.state_changed(previous.get(up.user.user_id), up.user)],
        )
        for up in updates:
            self.producer.send(SESSION_CHANGES, up.sessions, up.user.user_id)
            if up.presence is not None:
                self.producer.send(PRESENCE, up.presence, up.user.user_id)
        # Committed offsets must not run ahead of what was published.
        self.producer.flush()

    def republish_all(self) -> int:
        """Publish every stored user's sessions again, as they were last published; returns how many.

        Holds the lock the consumer and the expiry loop take, so a change made
        meanwhile (when called while serving) is never overtaken. Connections
        of gateways that are gone are put back as they are: those gateways'
        successors report what they hold in their heartbeats, and the silent
        ones expire as usual.
        """
        count = 0
        with self._lock:
            for users in self.store.get_all_users():
                conns: dict[str, list[logic.Conn]] = {}
                for c in self.store.get_connections_of_users([u.user_id for u in users]):
                    conns.setdefault(c.user_id, []).append(c)
                for user in users:
                    sessions = logic.stored_sessions(user, conns.get(user.user_id, []))
                    self.producer.send(SESSION_CHANGES, sessions, user.user_id)
                    count += 1
            self.producer.flush()
        return count

    # -- queries (internal HTTP) -----------------------------------------

    def user_sessions(self, user_id: str) -> dict[str, Any]:
        """A user's devices as stored (internal diagnostics and tests); online ones are seen now."""
        user = self.store.get_users([user_id]).get(user_id)
        devices = self.store.get_devices_of_users([user_id])
        now = now_ms()
        return {
            "user_id": user_id,
            "online": user.online if user else False,
            "last_seen": (now if user.online else user.last_seen) if user else 0,
            "devices": [
                {
                    "device_id": d.device_id,
                    "device_type": d.device_type,
                    "primary": d.primary,
                    "online": d.online,
                    "gateway": d.gateway,
                    "conn_id": d.conn_id,
                    "connected_at": d.connected_at,
                    "last_seen": now if d.online else d.last_seen,
                    "connections": d.connections,
                }
                for d in sorted(devices, key=lambda d: d.device_id)
            ],
        }
