"""Who gets what: group fan-out planned from the live views, no I/O.

The router looks up each member's online devices (UserSessions from the
session view, each device with the gateway instance holding its socket) and
groups the targets per gateway instance, so one Kafka record per gateway
carries a frame (or a burst of frames) to every device it must reach.
"""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet

from chatlib.routing import SessionsOf, Targets, group_push_request_for, targets_for
from chatlib.schemas import (
    GroupChanged,
    GroupPushRequest,
    ReceiptStored,
    StoredMessage,
    TypingSignal,
)

logger = logging.getLogger(__name__)

#: Seeded channels are owned by this pseudo-user: it has no devices and gets no pushes.
SYSTEM_USER = "system"


def members_of(change: GroupChanged | None) -> AbstractSet[str] | None:
    """Current member ids of a group from its latest GroupChanged; None if unknown or deleted."""
    if change is None or change.group.deleted:
        return None
    return change.group.member_ids()


def route_message(
    msg: StoredMessage, members: AbstractSet[str], sessions_of: SessionsOf
) -> tuple[Targets, GroupPushRequest | None]:
    """Every member's online devices plus the sender's other devices; one push request for the other members.

    The sending device is skipped (persistence acked it). The push request
    names every other member with their online devices excluded: the push
    service knows which devices exist and have a token, this router only
    knows which are online.
    """
    recipients = sorted(members - {SYSTEM_USER})
    users = recipients if msg.sender in members else [*recipients, msg.sender]
    targets = targets_for(users, sessions_of, skip=(msg.sender, msg.from_device))
    push = group_push_request_for(msg, [u for u in recipients if u != msg.sender], sessions_of)
    return targets, push


def route_receipt(
    receipt: ReceiptStored, members: AbstractSet[str], sessions_of: SessionsOf, senders: set[str] | None = None
) -> Targets:
    """The online devices of the senders of the messages the receipt covers, and the reader's other devices.

    ``senders`` None means the router does not remember who sent every seq
    the receipt covers (older messages, or a router that just started): then
    every other member hears of it, as a sender among them may.
    """
    if receipt.user_id not in members:
        return {}
    told = members if senders is None else (senders & members) | {receipt.user_id}
    return targets_for(sorted(told - {SYSTEM_USER}), sessions_of, skip=(receipt.user_id, receipt.device_id))


class SenderLog:
    """Who sent each of the last ``keep`` seqs of every group conversation the router routed.

    A group receipt is for the senders of the messages it covers; with 1,000
    members telling every member of every member's receipt would be a
    million frames per message.
    """

    def __init__(self, keep: int = 2048, conversations: int = 100_000):
        self.keep = keep
        self.max_conversations = conversations
        self._log: dict[str, dict[int, str]] = {}

    def add(self, conversation: str, seq: int, sender: str) -> None:
        log = self._log.get(conversation)
        if log is None:
            if len(self._log) >= self.max_conversations:
                self._log.clear()  # forgetting only widens receipts to every member
            log = self._log[conversation] = {}
        log[seq] = sender
        if len(log) > self.keep:
            for old in sorted(log)[: len(log) - self.keep]:
                del log[old]

    def senders(self, conversation: str, after_seq: int, up_to_seq: int) -> set[str] | None:
        """Senders of the seqs ``after_seq < seq <= up_to_seq``; None unless every one is remembered."""
        log = self._log.get(conversation, {})
        seqs = range(after_seq + 1, up_to_seq + 1)
        if len(seqs) > self.keep or any(s not in log for s in seqs):
            return None
        return {log[s] for s in seqs}


def route_typing(signal: TypingSignal, members: AbstractSet[str], sessions_of: SessionsOf) -> Targets:
    """The other members' online devices; nothing if the typist is not a member."""
    if signal.user_id not in members:
        return {}
    return targets_for(sorted(members - {SYSTEM_USER, signal.user_id}), sessions_of)


def route_group_event(change: GroupChanged, sessions_of: SessionsOf) -> Targets:
    """The members after the change, plus the removed users of a member_removed."""
    users = set(change.group.member_ids())
    if change.event in ("member_removed", "deleted"):
        users |= set(change.users)
    return targets_for(sorted(users - {SYSTEM_USER}), sessions_of)
