"""Who gets what: group fan-out planned from the live views, no I/O.

The router looks up each member's online devices (UserSessions from the
session view, each device with the gateway instance holding its socket) and
groups the targets per gateway instance, so one Kafka record per gateway
carries a frame (or a burst of frames) to every device it must reach.
"""

from __future__ import annotations

import logging

from chatlib.routing import SessionsOf, Targets, push_request_for, targets_for
from chatlib.schemas import (
    GroupChanged,
    PushRequest,
    ReceiptStored,
    StoredMessage,
    TypingSignal,
)

logger = logging.getLogger(__name__)

#: Seeded channels are owned by this pseudo-user: it has no devices and gets no pushes.
SYSTEM_USER = "system"


def members_of(change: GroupChanged | None) -> set[str] | None:
    """Current member ids of a group from its latest GroupChanged; None if unknown or deleted."""
    if change is None or change.group.deleted:
        return None
    return change.group.member_ids()


def route_message(msg: StoredMessage, members: set[str], sessions_of: SessionsOf) -> tuple[Targets, list[PushRequest]]:
    """Every member's online devices plus the sender's other devices; a PushRequest per other member.

    The sending device is skipped (persistence acked it). A PushRequest goes
    to every other member, listing their online devices as excluded: the
    push service knows which devices exist and have a token, this router
    only knows which are online.
    """
    recipients = sorted(members - {SYSTEM_USER})
    users = recipients if msg.sender in members else [*recipients, msg.sender]
    targets = targets_for(users, sessions_of, skip=(msg.sender, msg.from_device))
    pushes = [push_request_for(msg, user_id, sessions_of) for user_id in recipients if user_id != msg.sender]
    return targets, pushes


def route_receipt(receipt: ReceiptStored, members: set[str], sessions_of: SessionsOf) -> Targets:
    """The other members' online devices and the reader's other devices."""
    if receipt.user_id not in members:
        return {}
    return targets_for(sorted(members - {SYSTEM_USER}), sessions_of, skip=(receipt.user_id, receipt.device_id))


def route_typing(signal: TypingSignal, members: set[str], sessions_of: SessionsOf) -> Targets:
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
