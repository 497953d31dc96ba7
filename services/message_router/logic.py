"""Who gets what for 1-to-1 conversations: pure functions over the live session view.

"Online" devices come from the session view (UserSessions keyed by user:
each connected device with the gateway instance holding its socket). Every
function returns its targets grouped per gateway instance, and
:class:`Outbox` packs a batch into as few Deliver records as possible: one
per gateway and target set, frames in the order they were added.
"""

from __future__ import annotations

from typing import Any

from chatlib.routing import SessionsOf, Targets, push_request_for, targets_for
from chatlib.schemas import (
    PresenceRoute,
    PushRequest,
    ReceiptStored,
    StoredMessage,
    TypingSignal,
    parse_conversation,
    presence_frame,
    receipt_frame,
    typing_frame,
)


def dm_parties(conversation: str) -> tuple[str, str] | None:
    """The two users of a ``dm:`` conversation; None for groups and malformed ids."""
    try:
        kind, ids = parse_conversation(conversation)
    except ValueError:
        return None
    if kind != "dm":
        return None
    return ids[0], ids[1]


def peer(conversation: str, user_id: str) -> str | None:
    """The other party of a dm, or None if ``user_id`` is not in it."""
    pair = dm_parties(conversation)
    if pair is None or user_id not in pair:
        return None
    return pair[1] if pair[0] == user_id else pair[0]


def route_message(msg: StoredMessage, sessions_of: SessionsOf) -> tuple[Targets, list[PushRequest]]:
    """A stored dm: every online device of the recipient and the sender's other online devices.

    The sending device is skipped (persistence acked it). The recipient gets a
    PushRequest listing their online devices as excluded: the push service
    knows which devices exist and have a token; this router only knows which
    are online. Malformed or group conversations route nothing.
    """
    other = peer(msg.conversation, msg.sender)
    if other is None:
        return {}, []
    targets = targets_for([other, msg.sender], sessions_of, skip=(msg.sender, msg.from_device))
    return targets, [push_request_for(msg, other, sessions_of)]


def route_receipt(receipt: ReceiptStored, sessions_of: SessionsOf) -> Targets:
    """The other party's online devices and the reader's other online devices."""
    other = peer(receipt.conversation, receipt.user_id)
    if other is None:
        return {}
    return targets_for([other, receipt.user_id], sessions_of, skip=(receipt.user_id, receipt.device_id))


def route_typing(signal: TypingSignal, sessions_of: SessionsOf) -> Targets:
    """The other party's online devices; nothing if the typist is not in the conversation."""
    other = peer(signal.conversation, signal.user_id)
    return targets_for([other], sessions_of) if other is not None else {}


def route_presence(route: PresenceRoute, sessions_of: SessionsOf) -> Targets:
    """Every online device of the users persistence named (never the user themselves)."""
    return targets_for([u for u in route.to_users if u != route.user_id], sessions_of)


def receipt_frame_of(receipt: ReceiptStored) -> dict[str, Any]:
    return receipt_frame(receipt.conversation, receipt.user_id, receipt.status, receipt.up_to_seq)


def typing_frame_of(signal: TypingSignal) -> dict[str, Any]:
    return typing_frame(signal.conversation, signal.user_id, signal.state)


def presence_frame_of(route: PresenceRoute) -> dict[str, Any]:
    return presence_frame(route.user_id, route.online, route.last_seen)
