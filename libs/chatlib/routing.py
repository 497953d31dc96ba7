"""What both routers share: who is online where, and packing frames per gateway.

A router turns an event into frames for some users' online devices. The
devices come from the live session view; the frames travel as Deliver
records on each gateway instance's topic, one record per gateway (not one per
device), in the order they were added.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .schemas import Deliver, DeviceRef, GroupPushRequest, PushRecipient, PushRequest, StoredMessage, UserSessions

#: user id -> that user's live sessions (None: no device online)
SessionsOf = Callable[[str], UserSessions | None]
#: gateway instance -> the devices on it
Targets = dict[str, list[DeviceRef]]


def targets_for(users: Iterable[str], sessions_of: SessionsOf, skip: tuple[str, str] | None = None) -> Targets:
    """Online devices of ``users`` per gateway (each device once), except the ``skip`` (user, device)."""
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
    """The ids of a user's online devices, sorted (each once)."""
    return sorted({d.device_id for d in sessions.devices}) if sessions is not None else []


#: Characters of the body a push notification may show.
PREVIEW_CHARS = 100


def group_push_request_for(msg: StoredMessage, user_ids: list[str], sessions_of: SessionsOf) -> GroupPushRequest | None:
    """One push request for every recipient of a group message (None when there is none)."""
    if not user_ids:
        return None
    return GroupPushRequest(
        recipients=[PushRecipient(user_id=u, exclude_devices=online_device_ids(sessions_of(u))) for u in user_ids],
        conversation=msg.conversation,
        message_id=msg.message_id,
        seq=msg.seq,
        sender=msg.sender,
        preview=msg.body[:PREVIEW_CHARS],
        ts=msg.ts,
    )


def push_request_for(msg: StoredMessage, user_id: str, sessions_of: SessionsOf) -> PushRequest:
    """A push request for one recipient of ``msg``, its online devices excluded.

    A router only knows which devices are online; the push service knows which
    exist and have a token, and drops the request when none is left.
    """
    return PushRequest(
        user_id=user_id,
        exclude_devices=online_device_ids(sessions_of(user_id)),
        conversation=msg.conversation,
        message_id=msg.message_id,
        seq=msg.seq,
        sender=msg.sender,
        preview=msg.body[:PREVIEW_CHARS],
        ts=msg.ts,
    )


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
    that record (a burst in one conversation becomes one record); otherwise a
    new record starts, so each gateway's records keep the order frames were
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
            if last is None or last.key != key or (last.frames and last.size + size > self.max_bytes):
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

    def __len__(self) -> int:
        return sum(len(r) for r in self._records.values())
