"""Who gets what: group fan-out planned from the live views, no I/O.

The router looks up each member's online devices (UserSessions from the
session view, each device with the gateway instance holding its socket) and
groups the targets per gateway instance, so one Kafka record per gateway
carries a frame (or a burst of frames) to every device it must reach.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from chatlib.schemas import (
    Deliver,
    DeviceRef,
    GroupChanged,
    PushRequest,
    ReceiptStored,
    StoredMessage,
    TypingSignal,
    UserSessions,
)

logger = logging.getLogger(__name__)

#: Seeded channels are owned by this pseudo-user: it has no devices and gets no pushes.
SYSTEM_USER = "system"
PREVIEW_CHARS = 100

SessionsOf = Callable[[str], UserSessions | None]
#: gateway instance -> device targets on it
Targets = dict[str, list[DeviceRef]]


def members_of(change: GroupChanged | None) -> set[str] | None:
    """Current member ids of a group from its latest GroupChanged; None if unknown or deleted."""
    if change is None or change.group.deleted:
        return None
    return change.group.member_ids()


def targets_for(users: Iterable[str], sessions_of: SessionsOf, skip_device: tuple[str, str] | None = None) -> Targets:
    """Online devices of ``users``, grouped per gateway (each device once per gateway)."""
    out: Targets = {}
    seen: set[tuple[str, str, str]] = set()
    for user_id in users:
        sessions = sessions_of(user_id)
        if sessions is None:
            continue
        for dev in sessions.devices:
            if skip_device == (user_id, dev.device_id):
                continue
            key = (dev.gateway, user_id, dev.device_id)
            if key in seen:
                continue
            seen.add(key)
            out.setdefault(dev.gateway, []).append(DeviceRef(user_id=user_id, device_id=dev.device_id))
    return out


def online_device_ids(sessions: UserSessions | None) -> list[str]:
    if sessions is None:
        return []
    return sorted({d.device_id for d in sessions.devices})


def route_message(msg: StoredMessage, members: set[str], sessions_of: SessionsOf) -> tuple[Targets, list[PushRequest]]:
    """Every member's online devices plus the sender's other devices; a PushRequest per other member.

    The sending device is skipped (persistence acked it). A PushRequest goes
    to every other member, listing their online devices as excluded: the
    push service knows which devices exist and have a token, this router
    only knows which are online.
    """
    recipients = sorted(members - {SYSTEM_USER})
    users = recipients if msg.sender in members else [*recipients, msg.sender]
    targets = targets_for(users, sessions_of, skip_device=(msg.sender, msg.from_device))
    pushes = [
        PushRequest(
            user_id=user_id,
            exclude_devices=online_device_ids(sessions_of(user_id)),
            conversation=msg.conversation,
            message_id=msg.message_id,
            seq=msg.seq,
            sender=msg.sender,
            preview=msg.body[:PREVIEW_CHARS],
            ts=msg.ts,
        )
        for user_id in recipients
        if user_id != msg.sender
    ]
    return targets, pushes


def route_receipt(receipt: ReceiptStored, members: set[str], sessions_of: SessionsOf) -> Targets:
    """The other members' online devices and the reader's other devices."""
    if receipt.user_id not in members:
        return {}
    return targets_for(sorted(members - {SYSTEM_USER}), sessions_of, skip_device=(receipt.user_id, receipt.device_id))


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


@dataclass
class _Pending:
    key: tuple[tuple[str, str], ...]
    targets: list[DeviceRef]
    frames: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0


@dataclass
class Outbox:
    """Deliver records being assembled for one batch, per gateway instance.

    A frame for the same target set as the last record of that gateway joins
    it (a burst in one group becomes one record); otherwise a new record is
    started, so every gateway's records keep the order frames were added in.
    ``max_bytes`` bounds a record's frames well below Kafka's message limit.
    """

    max_bytes: int = 256 * 1024
    _by_gateway: dict[str, list[_Pending]] = field(default_factory=dict)

    def add(self, frame: dict[str, Any], targets: Targets) -> None:
        size = len(json.dumps(frame, separators=(",", ":")))
        for gateway, devices in targets.items():
            if not devices:
                continue
            key = tuple(sorted((d.user_id, d.device_id) for d in devices))
            records = self._by_gateway.setdefault(gateway, [])
            last = records[-1] if records else None
            if last is None or last.key != key or (last.frames and last.size + size > self.max_bytes):
                last = _Pending(key, list(devices))
                records.append(last)
            last.frames.append(frame)
            last.size += size

    def delivers(self) -> list[tuple[str, Deliver]]:
        return [
            (gateway, Deliver(targets=p.targets, frames=p.frames))
            for gateway, records in self._by_gateway.items()
            for p in records
        ]

    def __len__(self) -> int:
        return sum(len(r) for r in self._by_gateway.values())
