"""The gateway: WebSocket sockets in, Kafka events out; deliveries from Kafka to sockets.

One instance per ``GATEWAY_INSTANCE_ID``. It reads its own delivery topic
(Deliver, CloseDevice) and USER_EVENTS (logouts, disabled accounts) as a
private reader from the end, stamps every client frame with the identity
Nginx verified, and reports sockets to the session service (connect,
disconnect, heartbeat). See the delivery protocol, points 1 to 4.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import gevent
from chatlib import kafka as k
from chatlib import metrics
from chatlib.errors import ApiError
from chatlib.schemas import (
    PONG_FRAME,
    ClientMessage,
    ClientPing,
    CloseDevice,
    Deliver,
    DeviceConnected,
    DeviceDisconnected,
    DeviceLoggedOut,
    DeviceRemoved,
    Event,
    FrameError,
    GatewayHeartbeat,
    ReplayRequest,
    UserDisabled,
    UserSessions,
    UserUnregistered,
    error_frame,
    now_ms,
    parse_client_frame,
)
from chatlib.service import Producer, Service, ServiceConfig, View
from chatlib.topics import MESSAGES_IN, SESSION_CHANGES, SESSION_EVENTS, USER_EVENTS, Topic, gateway_topic
from flask import Flask
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import http
from .logic import PRIMARY_OFFLINE, Identity, SeqOutput, frame_to_event, parse_origins, primary_online
from .sockets import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    Connection,
    Hub,
    Transport,
    WsTransport,
    encode,
    spawn,
)

logger = logging.getLogger(__name__)

#: Connections per heartbeat record: keeps each record far below Kafka's size limit.
HEARTBEAT_CHUNK = 2000
#: How often sequencers are checked for overdue replays.
TICK_S = 0.5
#: Largest client message read (fragments included): frames up to this size are read and
#: answered with payload_too_large; anything larger closes the socket (1009) before it is buffered.
MAX_MESSAGE_BYTES = 1024 * 1024


class GatewayConfig(ServiceConfig):
    """GATEWAY_* settings (see .env.tmpl)."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    port: int = 8111
    instance_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    allowed_origins: str = ""
    rate_per_socket: float = 50.0
    # How long a gap in a conversation's seqs may stay open before a replay is asked for.
    gap_grace_ms: int = Field(300, ge=0, le=10000)
    worker_connections: int = Field(20000, ge=1)
    heartbeat_s: float = Field(5.0, gt=0)
    ping_interval_s: float = Field(25.0, ge=0)
    send_queue_max: int = Field(10000, ge=10)
    graceful_timeout_s: int = Field(10, ge=1)
    # Socket connects and disconnects gathered this long are produced together (ms; 0 = one by one).
    announce_linger_ms: int = Field(10, ge=0, le=1000)


def _user_key(ev: Event) -> str:
    return str(getattr(ev, "user_id", ""))


class SessionEvents:
    """The session events of this instance (connects, disconnects, heartbeats), produced in bursts.

    Every produce is a broker round trip that costs kafka-python 1-2 ms of CPU
    whatever it carries, and a reconnect storm brings hundreds of sockets a
    second: the events queued within ``linger_s`` of the first go out
    together, in one request. Their order is kept, so a socket's disconnect
    never overtakes its connect.
    """

    def __init__(self, send: Callable[[Event, str], None], linger_s: float):
        self._send = send
        self.linger_s = linger_s
        self._items: list[tuple[Event, str]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def add(self, ev: Event, key: str) -> None:
        if self.linger_s <= 0:
            self._send(ev, key)
            return
        with self._lock:
            self._items.append((ev, key))
            if self._scheduled:
                return
            self._scheduled = True
        timer = threading.Timer(self.linger_s, self.flush)
        timer.daemon = True
        timer.start()

    def flush(self) -> None:
        """Produce what is queued now (no yield between the sends: one batch for the producer)."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for ev, key in items:
            self._send(ev, key)


class Gateway(Service):
    """WebSocket gateway instance."""

    name = "gateway"
    config_class = GatewayConfig
    max_body_bytes = 64 * 1024

    producer = Producer()
    #: UserSessions by user: only kept when REQUIRE_PRIMARY_ONLINE is on.
    sessions = View(SESSION_CHANGES, key=_user_key)

    config: GatewayConfig

    def __init__(self, config: GatewayConfig, **overrides: Any):
        if not config.require_primary_online:
            overrides.setdefault("sessions", None)
        super().__init__(config, **overrides)
        self.instance = config.instance_id
        self.topic: Topic = gateway_topic(config.instance_id)
        self.origins = parse_origins(config.allowed_origins)
        self.hub = Hub()
        self.session_events = SessionEvents(
            lambda ev, key: self._send(SESSION_EVENTS, ev, key), config.announce_linger_ms / 1000
        )
        self._stopping = threading.Event()
        self._shutdown_started = False
        self._shutdown_done = threading.Event()

    # -- lifecycle --------------------------------------------------------

    def on_setup(self) -> None:
        """Make sure this instance's delivery topic exists."""
        try:
            k.ensure_topics(self.config.kafka_bootstrap_servers, [self.topic])
        except Exception as exc:  # noqa: BLE001 - any failure here means Kafka is not usable
            raise k.InfrastructureUnavailable(f"cannot create {self.topic.name}: {exc}") from None

    def on_start(self) -> None:
        """Start the delivery reader (waiting until it is positioned), the ticker and the SIGTERM hook.

        One private reader, from the end, of this instance's delivery topic and
        of the user events that close sockets: one fetch loop rather than two.
        """
        ready = threading.Event()
        worker = k.ConsumerWorker(
            self.config,
            name=f"{self.name}.deliveries",
            topics=[self.topic.name, USER_EVENTS.name],
            group_id=None,
            handler=self.on_event,
            from_beginning=False,
        )
        # Positioned at the end only after its first poll: sockets are accepted after that,
        # so no Deliver for a new socket can slip before the reader's start position.
        worker.after_poll = lambda _consumer: ready.set()
        worker.start()
        self._workers.append(worker)
        if not ready.wait(self.config.startup_timeout_s * 3):
            raise k.InfrastructureUnavailable(f"delivery reader of {self.topic.name} did not start")
        threading.Thread(target=self._ticker, name="gateway-ticker", daemon=True).start()
        self._hook_sigterm()

    def topics_owned_on_broker(self) -> list[Topic]:
        return [*super().topics_owned_on_broker(), self.topic]

    def on_broker_lost(self) -> None:
        """The broker came back empty: every socket here is announced again (DeviceConnected), so
        session knows it is online and persistence replays what the loss kept from it (deliveries
        on their way when the broker went are gone with it; the sequencer drops what it already
        wrote)."""
        conns = self.hub.all()
        for conn in conns:
            self._announce(conn)
        self.session_events.flush()
        logger.warning("announced %d sockets again after the broker loss", len(conns))

    def _hook_sigterm(self) -> None:
        # gunicorn waits for open requests (our sockets) before it runs the stop hooks;
        # close the sockets as soon as SIGTERM arrives so it does not wait in vain.
        try:
            previous = signal.getsignal(signal.SIGTERM)
        except ValueError:
            return

        def on_term(sig: int, frame: Any) -> None:
            # Nothing that may block runs in a signal handler: under gevent starting a thread
            # waits for it to start, a blocking switch from the hub (BlockingSwitchOutError).
            # A greenlet is only scheduled; gunicorn defers its own handlers the same way.
            gevent.spawn(self.shutdown)
            if callable(previous):
                previous(sig, frame)

        try:
            signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread (tests)
            logger.debug("SIGTERM hook not installed")

    def shutdown(self) -> None:
        """Graceful stop: every socket gets a disconnect event and a 1001 close.

        Runs once; a second caller waits for the first to finish (gunicorn no
        longer waits for the sockets, which left its pool at the upgrade).
        """
        if self._shutdown_started:
            self._shutdown_done.wait(30)
            return
        self._shutdown_started = True
        try:
            conns = self.hub.all()
            logger.info("closing %d sockets", len(conns))
            for conn in conns:
                self.forget_socket(conn)
                conn.close(CLOSE_GOING_AWAY, "server shutting down")
            self.session_events.flush()
            try:
                self.producer.flush(timeout=5)
            except Exception:
                logger.warning("flushing disconnect events failed", exc_info=True)
            deadline = time.monotonic() + 5
            for conn in conns:
                conn.wait_written(max(0.0, deadline - time.monotonic()))
        finally:
            self._shutdown_done.set()

    def on_stop(self) -> None:
        self._stopping.set()
        self.shutdown()

    def routes(self, app: Flask) -> None:
        app.register_blueprint(http.blueprint(self))

    # -- sockets ------------------------------------------------------------

    def open_socket(self, transport: Transport, who: Identity) -> Connection | None:
        """Register a new socket and announce it; None if the device policy refuses it."""
        conn = Connection(
            transport,
            who,
            uuid.uuid4().hex,
            self.config.rate_per_socket,
            self.config.send_queue_max,
            gap_grace_s=self.config.gap_grace_ms / 1000,
        )
        if self._shutdown_started:
            conn.close(CLOSE_TRY_AGAIN, "server shutting down", error_frame("unavailable", "server shutting down"))
            conn.wait_written(5)
            return None
        if self.config.require_primary_online and not who.primary and not self._primary_online(who.user_id):
            logger.info("refusing a secondary device socket: primary offline")
            conn.close(CLOSE_POLICY, PRIMARY_OFFLINE, error_frame("forbidden", PRIMARY_OFFLINE))
            conn.wait_written(5)
            return None
        # Registered before it is announced: the initial Deliver must find it.
        self.hub.add(conn)
        metrics.WS_CONNECTIONS.inc()
        self._announce(conn)
        logger.debug("socket %s opened", conn.conn_id)
        return conn

    def full(self) -> bool:
        """No room for another socket (GATEWAY_WORKER_CONNECTIONS): the upgrade is refused."""
        return len(self.hub) >= self.config.worker_connections

    def run_socket(self, transport: WsTransport, who: Identity) -> None:
        """One accepted socket's whole life, in its own greenlet: open, read until it ends, forget."""
        try:
            conn = self.open_socket(transport, who)
            if conn is None:
                return
            try:
                transport.run(
                    conn, lambda data: self.on_frame(conn, data), self.config.ping_interval_s, MAX_MESSAGE_BYTES
                )
            finally:
                self.forget_socket(conn)
                conn.stop()
                # Let a queued error frame and close frame go out before the socket is closed.
                conn.wait_written(2)
        except Exception:
            logger.exception("socket failed")
        finally:
            transport.finish()

    def accept(self, transport: WsTransport, who: Identity) -> None:
        """Take over an upgraded socket: its reader runs in a greenlet of its own."""
        spawn(lambda: self.run_socket(transport, who), "ws-reader")

    def forget_socket(self, conn: Connection) -> None:
        """The socket is closed or closing: unregister it and report the disconnect (once)."""
        if not self.hub.remove(conn):
            return
        metrics.WS_CONNECTIONS.dec()
        self.session_events.add(
            DeviceDisconnected(
                user_id=conn.who.user_id,
                device_id=conn.who.device_id,
                gateway=self.instance,
                conn_id=conn.conn_id,
                ts=now_ms(),
            ),
            conn.who.user_id,
        )
        logger.debug("socket %s closed", conn.conn_id)

    def on_frame(self, conn: Connection, data: str | bytes) -> None:
        """One client frame: rate limit, validate, answer or produce (never log its body)."""
        if not conn.bucket.take(time.monotonic()):
            metrics.child(metrics.WS_FRAMES, "in", "rate_limited").inc()
            conn.send_frame(error_frame("rate_limited", "too many frames, slow down"))
            return
        try:
            if isinstance(data, bytes):
                # The contract's frames are JSON text frames; a binary one is refused, whatever it holds.
                raise FrameError("invalid_request", "frames must be JSON text frames, not binary")
            frame = parse_client_frame(data)
        except FrameError as exc:
            metrics.child(metrics.WS_FRAMES, "in", "invalid").inc()
            conn.send_frame(error_frame(exc.code, exc.message, exc.ref))
            return
        kind = str(getattr(frame, "type", "?"))
        metrics.child(metrics.WS_FRAMES, "in", kind).inc()
        if isinstance(frame, ClientPing):
            conn.send_frame(PONG_FRAME)
            return
        ref = frame.id if isinstance(frame, ClientMessage) else None
        try:
            topic, key, ev = frame_to_event(frame, conn.who, self.instance, now_ms())
        except ApiError as exc:
            conn.send_frame(exc.to_frame(ref))
            return
        self._send(topic, ev, key, conn=conn, ref=ref)

    def _send(self, topic: Topic, ev: Event, key: str, conn: Connection | None = None, ref: str | None = None) -> None:
        """Produce without waiting (linger 0); a failure tells the socket, if there is one."""

        def failed(exc: BaseException) -> None:
            logger.warning("producing %s to %s failed: %s", ev.TYPE, topic.name, exc.__class__.__name__)
            if conn is not None:
                conn.send_frame(error_frame("unavailable", "could not accept the frame, try again", ref))

        try:
            future = self.producer.send(topic, ev, key)
        except Exception as exc:  # noqa: BLE001 - broker away or buffer full
            failed(exc)
            return
        if future is not None and hasattr(future, "add_errback"):
            future.add_errback(failed)

    # -- deliveries ---------------------------------------------------------

    def on_event(self, ev: Event) -> None:
        """Handler of the instance's reader: deliveries, and user events that close sockets."""
        if isinstance(ev, (Deliver, CloseDevice)):
            self.on_delivery(ev)
        else:
            self.on_user_event(ev)

    def on_delivery(self, ev: Event) -> None:
        """Handler of this instance's delivery topic: Deliver and CloseDevice."""
        if isinstance(ev, Deliver):
            self.deliver(ev)
        elif isinstance(ev, CloseDevice):
            self.close_device(ev.user_id, ev.device_id, ev.code, ev.reason)

    def deliver(self, ev: Deliver) -> None:
        """Write a Deliver's frames to the target devices' sockets, through each socket's sequencer."""
        now = time.monotonic()
        texts: dict[int, str] = {}
        targets = dict.fromkeys((t.user_id, t.device_id) for t in ev.targets)
        for user_id, device_id in targets:
            for conn in self.hub.device(user_id, device_id):
                if ev.conn_id is not None and conn.conn_id != ev.conn_id:
                    continue
                out = conn.sequencer.deliver(ev.frames, ev.sync, ev.initial, now)
                self._apply(conn, out, texts)

    def _apply(self, conn: Connection, out: SeqOutput, texts: dict[int, str]) -> None:
        for frame in out.frames:
            # One Deliver's frames are encoded once, whatever the number of sockets.
            text = texts.get(id(frame))
            if text is None:
                text = texts[id(frame)] = encode(frame)
            conn.send_text(text, str(frame.get("type", "?")))
        for ask in out.asks:
            self._send(
                MESSAGES_IN,
                ReplayRequest(
                    conversation=ask.conversation,
                    user_id=conn.who.user_id,
                    device_id=conn.who.device_id,
                    gateway=self.instance,
                    conn_id=conn.conn_id,
                    after_seq=ask.after_seq,
                    up_to_seq=ask.up_to_seq,
                ),
                ask.conversation,
            )
        if out.resync:
            # The initial sync never came (persistence was away?): announce the socket again.
            logger.info("socket %s: initial sync overdue, announcing it again", conn.conn_id)
            self._announce(conn)
        if out.overflow:
            logger.warning("socket %s: too many frames held back, closing it", conn.conn_id)
            conn.close(CLOSE_TRY_AGAIN, "reconnect", error_frame("unavailable", "too many pending frames, reconnect"))

    def close_device(self, user_id: str, device_id: str, code: str, reason: str) -> None:
        """Close every socket of one device, with an error frame first."""
        for conn in self.hub.device(user_id, device_id):
            conn.close(CLOSE_POLICY, reason, error_frame(code, reason))

    def close_user(self, user_id: str, code: str, reason: str) -> None:
        """Close every socket of one user, with an error frame first."""
        for conn in self.hub.user(user_id):
            conn.close(CLOSE_POLICY, reason, error_frame(code, reason))

    def on_user_event(self, ev: Event) -> None:
        """Logouts, removed devices, disabled and deleted accounts close sockets here."""
        if isinstance(ev, DeviceLoggedOut):
            self.close_device(ev.user_id, ev.device_id, "unauthorized", "logged out")
        elif isinstance(ev, DeviceRemoved):
            self.close_device(ev.user_id, ev.device_id, "unauthorized", "device removed")
        elif isinstance(ev, UserDisabled):
            self.close_user(ev.user_id, "unauthorized", "account disabled")
        elif isinstance(ev, UserUnregistered):
            self.close_user(ev.user_id, "unauthorized", "account deleted")

    # -- device policy --------------------------------------------------------

    def _announce(self, conn: Connection) -> None:
        """DeviceConnected for this socket: session marks it online, persistence replays to it."""
        who = conn.who
        self.session_events.add(
            DeviceConnected(
                user_id=who.user_id,
                device_id=who.device_id,
                device_type=who.device_type,
                primary=who.primary,
                gateway=self.instance,
                conn_id=conn.conn_id,
                ts=conn.connected_at,
            ),
            who.user_id,
        )

    def _primary_online(self, user_id: str) -> bool:
        local = any(c.who.primary for c in self.hub.user(user_id))
        view = self.sessions
        current = view.get(user_id) if view is not None else None
        return primary_online(current if isinstance(current, UserSessions) else None, local)

    def on_sessions_update(self, ev: Event, previous: Event | None = None) -> None:
        """REQUIRE_PRIMARY_ONLINE: a user's primary went offline -> close their secondary sockets."""
        if not self.config.require_primary_online or not isinstance(ev, UserSessions):
            return
        conns = self.hub.user(ev.user_id)
        if not conns or all(c.who.primary for c in conns):
            return
        if primary_online(ev, any(c.who.primary for c in conns)):
            return
        for conn in conns:
            if not conn.who.primary:
                logger.info("closing a secondary device socket: primary offline")
                conn.close(CLOSE_POLICY, PRIMARY_OFFLINE, error_frame("forbidden", PRIMARY_OFFLINE))

    # -- periodic work ----------------------------------------------------------

    def heartbeats(self, ts: int) -> list[GatewayHeartbeat]:
        """This instance's heartbeat, split in chunks of HEARTBEAT_CHUNK connections."""
        entries = self.hub.heartbeat_entries()
        parts = [entries[i : i + HEARTBEAT_CHUNK] for i in range(0, len(entries), HEARTBEAT_CHUNK)] or [[]]
        return [
            GatewayHeartbeat(gateway=self.instance, connections=part, ts=ts, chunk=i, chunks=len(parts))
            for i, part in enumerate(parts)
        ]

    def tick(self, now: float) -> None:
        """Re-ask overdue replays, re-announce sockets whose initial sync is overdue."""
        for conn in self.hub.all():
            seq = conn.sequencer
            if seq.ready and not seq.asked and not seq.gaps:
                continue
            out = seq.tick(now)
            if out.asks or out.resync:
                self._apply(conn, out, {})

    def _ticker(self) -> None:
        next_beat = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_beat:
                    next_beat = now + self.config.heartbeat_s
                    for beat in self.heartbeats(now_ms()):
                        self.session_events.add(beat, self.instance)
                self.tick(now)
            except Exception:
                logger.exception("gateway ticker failed")
            self._stopping.wait(TICK_S)
