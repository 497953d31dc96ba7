"""The message-router: 1-to-1 messages, receipts, typing and presence to online devices.

Kafka entry points, each a thin adapter over logic.py:

- :meth:`MessageRouter.on_stored` (``chat.messages.stored.v1``, group
  ``message-router``): MessageStored of ``dm:`` conversations become message
  frames (one Deliver per gateway instance) plus a PushRequest for the
  recipient; ReceiptStored become receipt frames (protocol 8, 9). Group
  conversations belong to the group-router and are skipped.
- :meth:`MessageRouter.on_signals` (``chat.signals.v1``): typing in dms (protocol 10).
- :meth:`MessageRouter.on_route` (``chat.route.v1``): PresenceRoute from
  persistence becomes presence frames (protocol 11).

Online devices come from a live view of ``session.changes.v1`` (UserSessions
keyed by user), never from a per-message lookup. It stores nothing; every
handler flushes before it returns, so the offset commit follows delivery.
A socket the view lists for the first time gets the newest message of each
of its user's dms routed lately (:class:`chatlib.routing.RecentMessages`),
sent without a flush: nothing is committed after it, and the view's reader
must keep up (:func:`chatlib.routing.send_unwaited`).
"""

from __future__ import annotations

import logging
from typing import Any

from chatlib import topics
from chatlib.routing import Outbox, RecentMessages, recent_for_new_devices, send_unwaited
from chatlib.schemas import (
    Event,
    MessageStored,
    PresenceRoute,
    PushRequest,
    ReceiptStored,
    TypingSignal,
    UserSessions,
)
from chatlib.service import Producer, Service, ServiceConfig, View, consume
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import logic

logger = logging.getLogger(__name__)


class MessageRouterConfig(ServiceConfig):
    """MESSAGE_ROUTER_* settings."""

    model_config = SettingsConfigDict(env_prefix="MESSAGE_ROUTER_", extra="ignore")

    port: int = 8105
    # Largest frames payload of one Deliver record (bytes).
    deliver_max_bytes: int = Field(256 * 1024, ge=16 * 1024, le=900 * 1024)
    # How long the newest message of a conversation is kept for a device the session view
    # lists late (seconds; 0: off). See chatlib.routing.RecentMessages.
    recent_window_s: float = Field(120.0, ge=0)


class MessageRouter(Service):
    """Routes stored 1-to-1 traffic to the gateways holding the recipients' sockets."""

    name = "message-router"
    config_class = MessageRouterConfig
    config: MessageRouterConfig

    sessions = View(topics.SESSION_CHANGES, key=lambda e: getattr(e, "user_id", ""))
    publisher = Producer()

    def __init__(self, config: MessageRouterConfig, **overrides: Any):
        super().__init__(config, **overrides)
        self.recent = RecentMessages(config.recent_window_s)

    def on_sessions_update(self, ev: Event, previous: Event | None = None) -> None:
        """A socket the view lists for the first time gets the newest recent message of each of its dms."""
        outbox = recent_for_new_devices(self.recent, ev, previous, self.config.deliver_max_bytes)
        if outbox is not None:
            send_unwaited(self.publisher, outbox)

    def sessions_of(self, user_id: str) -> UserSessions | None:
        ev = self.sessions.get(user_id)
        return ev if isinstance(ev, UserSessions) else None

    @consume(topics.MESSAGES_STORED, group="message-router", batch=True, key_prefix="dm:")
    def on_stored(self, events: list[Event]) -> None:
        """Stored dm messages and receipts to online devices; push requests for the recipients."""
        outbox = Outbox(self.config.deliver_max_bytes)
        pushes: list[PushRequest] = []
        for ev in events:
            if isinstance(ev, MessageStored):
                conv = ev.message.conversation
                parties = logic.dm_parties(conv) if conv.startswith("dm:") else None
                if parties is None:
                    continue
                frame = ev.message.frame()
                # Noted before the devices are looked up (RecentMessages says why).
                self.recent.note(conv, frame, parties)
                targets, requests = logic.route_message(ev.message, self.sessions_of)
                outbox.add(frame, targets)
                pushes += requests
            elif isinstance(ev, ReceiptStored) and ev.conversation.startswith("dm:"):
                outbox.add(logic.receipt_frame_of(ev), logic.route_receipt(ev, self.sessions_of))
        outbox.send(self.publisher)
        for req in pushes:
            self.publisher.send(topics.PUSH_REQUESTS, req, key=req.user_id)
        self.publisher.flush()

    @consume(topics.SIGNALS, group="message-router", batch=True, key_prefix="dm:")
    def on_signals(self, events: list[Event]) -> None:
        """Typing in a dm to the other party's online devices (group typing is the group-router's)."""
        outbox = Outbox(self.config.deliver_max_bytes)
        for ev in events:
            if isinstance(ev, TypingSignal) and ev.conversation.startswith("dm:"):
                outbox.add(logic.typing_frame_of(ev), logic.route_typing(ev, self.sessions_of))
        outbox.send(self.publisher)
        self.publisher.flush()

    @consume(topics.ROUTE, group="message-router", batch=True)
    def on_route(self, events: list[Event]) -> None:
        """Presence of a user to the online devices of everyone persistence named."""
        outbox = Outbox(self.config.deliver_max_bytes)
        for ev in events:
            if isinstance(ev, PresenceRoute):
                outbox.add(logic.presence_frame_of(ev), logic.route_presence(ev, self.sessions_of))
        outbox.send(self.publisher)
        self.publisher.flush()
