"""Who gets what for 1-to-1 conversations: pure functions over the live session view.

"Online" devices come from the session view (UserSessions keyed by user:
each connected device with the gateway instance holding its socket). Every
function returns its targets grouped per gateway instance, and
:class:`Outbox` packs a batch into as few Deliver records as possible: one
per gateway and target set, frames in the order they were added.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chatlib.schemas import (
    Deliver,
    DeviceRef,
    PresenceRoute,
    PushRequest,
    ReceiptStored,
    StoredMessage,
    TypingSignal,
    UserSessions,
    parse_conversation,
    presence_frame,
    receipt_frame,
    typing_frame,
)

PREVIEW_CHARS = 100

SessionsOf = Callable[[str], UserSessions | None]
#: gateway instance -> the devices on it
Targets = dict[str, list[DeviceRef]]


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


def targets_for(users: Iterable[str], sessions_of: SessionsOf, skip: tuple[str, str] | None = None) -> Targets:
    """Online devices of ``users`` per gateway (each device once), except the ``skip`` device."""
    out: Targets = {}
    seen: set[tuple[str, str, str]] = set()
    for user_id in users:
        sessions = sessions_of(user_id)
        if sessions is None:
            continue
        for dev in sessions.devices:
            key = (dev.gateway, user_id, dev.device_id)
            if skip == (user_id, dev.device_id) or key in seen:
                continue
            seen.add(key)
            out.setdefault(dev.gateway, []).append(DeviceRef(user_id=user_id, device_id=dev.device_id))
    return out


def online_device_ids(sessions: UserSessions | None) -> list[str]:
    return sorted({d.device_id for d in sessions.devices}) if sessions is not None else []


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
    push = PushRequest(
        user_id=other,
        exclude_devices=online_device_ids(sessions_of(other)),
        conversation=msg.conversation,
        message_id=msg.message_id,
        seq=msg.seq,
        sender=msg.sender,
        preview=msg.body[:PREVIEW_CHARS],
        ts=msg.ts,
    )
    return targets, [push]


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


@dataclass
class _Record:
    key: tuple[tuple[str, str], ...]
    targets: list[DeviceRef]
    frames: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


@dataclass
class Outbox:
    """The Deliver records of one batch, per gateway instance.

    A frame for the same target set as the last record of its gateway joins
    that record (a burst in one conversation becomes one record); otherwise
    a new record starts, so each gateway's records keep the order frames were
    added in. ``max_bytes`` keeps a record well below Kafka's message limit.
    """

    max_bytes: int = 256 * 1024
    _records: dict[str, list[_Record]] = field(default_factory=dict)

    def add(self, frame: dict[str, Any], targets: Targets) -> None:
        size = len(json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode())
        for gateway, devices in targets.items():
            if not devices:
                continue
            key = tuple(sorted((d.user_id, d.device_id) for d in devices))
            records = self._records.setdefault(gateway, [])
            last = records[-1] if records else None
            if last is None or last.key != key or last.size + size > self.max_bytes:
                last = _Record(key, list(devices))
                records.append(last)
            last.frames.append(frame)
            last.size += size

    def delivers(self) -> list[tuple[str, Deliver]]:
        """(gateway instance, Deliver) in the order each gateway must receive them."""
        return [
            (gateway, Deliver(targets=r.targets, frames=r.frames))
            for gateway, records in self._records.items()
            for r in records
        ]
