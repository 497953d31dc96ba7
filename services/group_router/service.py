"""group-router: fan-out of group messages, receipts, typing and group events to online devices.

Nothing durable: membership comes from a live view of GROUP_CHANGES and
online devices from a live view of SESSION_CHANGES, so routing a message
costs no database round trip. Each poll's output is one Deliver per gateway
instance (per target set), plus PushRequests; the consumer commits only
after the broker confirmed all of them. A socket the session view lists for
the first time gets the newest message of each of its user's groups routed
lately (:class:`chatlib.routing.RecentMessages`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set as AbstractSet
from typing import Any

from chatlib.routing import Outbox, RecentMessages, recent_for_new_devices, send_unwaited
from chatlib.schemas import (
    Event,
    GroupChanged,
    GroupPushRequest,
    MessageStored,
    ReceiptStored,
    TypingSignal,
    UserSessions,
    group_event_frame,
    receipt_frame,
    typing_frame,
)
from chatlib.service import Producer, Service, ServiceConfig, View, consume
from chatlib.topics import GROUP_CHANGES, MESSAGES_STORED, PUSH_REQUESTS, SESSION_CHANGES, SIGNALS
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import logic

logger = logging.getLogger(__name__)

GROUP_PREFIX = "group:"


class GroupRouterConfig(ServiceConfig):
    """Settings of group-router (``GROUP_ROUTER_*``)."""

    model_config = SettingsConfigDict(env_prefix="GROUP_ROUTER_", extra="ignore")
    port: int = 8106
    # How long routing waits for a group it does not know yet to reach its view (seconds).
    view_wait_s: float = Field(1.0, ge=0)
    # Upper bound of the frames carried by one Deliver record (bytes).
    deliver_max_bytes: int = Field(256 * 1024, ge=1024)
    # How long the newest message of a group is kept for a device the session view
    # lists late (seconds; 0: off). See chatlib.routing.RecentMessages.
    recent_window_s: float = Field(120.0, ge=0)


class GroupRouter(Service):
    """Routes group traffic to the gateways holding the members' sockets."""

    name = "group-router"
    config_class = GroupRouterConfig
    config: GroupRouterConfig

    sessions = View(SESSION_CHANGES, key=lambda e: getattr(e, "user_id", ""))
    groups = View(GROUP_CHANGES, key=lambda e: e.group.group_id if isinstance(e, GroupChanged) else "")
    producer = Producer()

    def __init__(self, config: GroupRouterConfig, **overrides: Any):
        super().__init__(config, **overrides)
        #: who sent each recent seq: group receipts go to those senders only
        self.sender_log = logic.SenderLog()
        self.recent = RecentMessages(config.recent_window_s)

    def on_start(self) -> None:
        """Report started only once the consumers have their partitions.

        The group-event consumer starts at the end of GROUP_CHANGES the first
        time its group exists; waiting for the assignment here (before
        /healthz answers) means no change made after start-up is skipped.
        """
        for worker in self._workers:
            if not worker.assigned.wait(self.config.startup_timeout_s):
                logger.warning("consumer %s has no partitions yet; continuing", worker.name)

    # -- Kafka ------------------------------------------------------------

    @consume(MESSAGES_STORED, SIGNALS, group="group-router", batch=True, key_prefix=GROUP_PREFIX)
    def on_traffic(self, events: list[Event]) -> None:
        """Group messages, receipts and typing to the members' online devices (pushes for the rest).

        One consumer reads both topics: stored messages and receipts from
        persistence, typing signals straight from the gateways; 1-to-1
        records are skipped by key, undecoded.
        """
        outbox = Outbox(self.config.deliver_max_bytes)
        pushes: list[GroupPushRequest] = []
        for ev in events:
            if isinstance(ev, MessageStored) and ev.message.conversation.startswith(GROUP_PREFIX):
                members = self._members(ev.message.conversation)
                if members is None:
                    logger.warning(
                        "message %s for unknown group %s not routed", ev.message.message_id, ev.message.conversation
                    )
                    continue
                self.sender_log.add(ev.message.conversation, ev.message.seq, ev.message.sender)
                frame = ev.message.frame()
                # Noted before the devices are looked up (RecentMessages says why).
                self.recent.note(ev.message.conversation, frame, [*members, ev.message.sender])
                targets, push = logic.route_message(ev.message, members, self._sessions_of)
                outbox.add(frame, targets)
                if push is not None:
                    pushes.append(push)
            elif isinstance(ev, ReceiptStored) and ev.conversation.startswith(GROUP_PREFIX):
                members = self._members(ev.conversation)
                if members is not None:
                    frame = receipt_frame(ev.conversation, ev.user_id, ev.status, ev.up_to_seq)
                    senders = self.sender_log.senders(ev.conversation, ev.after_seq, ev.up_to_seq)
                    outbox.add(frame, logic.route_receipt(ev, members, self._sessions_of, senders))
            elif isinstance(ev, TypingSignal) and ev.conversation.startswith(GROUP_PREFIX):
                members = self._members(ev.conversation)
                if members is not None:
                    frame = typing_frame(ev.conversation, ev.user_id, ev.state)
                    outbox.add(frame, logic.route_typing(ev, members, self._sessions_of))
        self._emit(outbox, pushes)

    @consume(GROUP_CHANGES, group="group-router-events", batch=True, from_beginning=False)
    def on_group_changes(self, events: list[Event]) -> None:
        """Each group change as a group_event frame to its members (and to removed users)."""
        outbox = Outbox(self.config.deliver_max_bytes)
        for ev in events:
            if isinstance(ev, GroupChanged):
                outbox.add(group_event_frame(ev), logic.route_group_event(ev, self._sessions_of))
        self._emit(outbox, [])

    def on_sessions_update(self, ev: Event, previous: Event | None = None) -> None:
        """A socket the view lists for the first time gets the newest recent message of each of its groups."""
        outbox = recent_for_new_devices(self.recent, ev, previous, self.config.deliver_max_bytes)
        if outbox is not None:
            send_unwaited(self.producer, outbox)

    # -- helpers ----------------------------------------------------------

    def _sessions_of(self, user_id: str) -> UserSessions | None:
        ev = self.sessions.get(user_id)
        return ev if isinstance(ev, UserSessions) else None

    def _members(self, conversation: str) -> AbstractSet[str] | None:
        """Members of the conversation's group, waiting briefly for a group the view has not seen yet."""
        group_id = conversation[len(GROUP_PREFIX) :]
        change = self.groups.get(group_id)
        deadline = time.monotonic() + self.config.view_wait_s
        while change is None and time.monotonic() < deadline:
            time.sleep(0.02)
            change = self.groups.get(group_id)
        return logic.members_of(change if isinstance(change, GroupChanged) else None)

    def _emit(self, outbox: Outbox, pushes: list[GroupPushRequest]) -> None:
        """Send everything, then wait for the broker to confirm every record (raises on failure: retried)."""
        futures = outbox.send(self.producer)
        for req in pushes:
            futures.append(self.producer.send(PUSH_REQUESTS, req, key=req.conversation))
        if not futures:
            return
        self.producer.flush()
        for fut in futures:
            fut.get(timeout=10)
