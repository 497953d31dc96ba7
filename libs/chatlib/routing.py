"""What both routers share: who is online where, and packing frames per gateway.

A router turns an event into frames for some users' online devices. The
devices come from the live session view; the frames travel as Deliver
records on each gateway instance's topic, one record per gateway (not one per
device), in the order they were added.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .schemas import (
    Deliver,
    DeviceRef,
    Event,
    GroupPushRequest,
    PushRecipient,
    PushRequest,
    StoredMessage,
    UserSessions,
)
from .topics import gateway_topic

logger = logging.getLogger(__name__)

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

    def send(self, publisher: Any) -> list[Any]:
        """Produce every Deliver to its gateway's topic, keyed by its first target's user (a
        record always has one); returns the futures, in order."""
        return [
            publisher.send(gateway_topic(gateway), deliver, key=deliver.targets[0].user_id)
            for gateway, deliver in self.delivers()
        ]

    def __len__(self) -> int:
        return sum(len(r) for r in self._records.values())


def new_devices(current: UserSessions, previous: Event | None) -> Targets:
    """The devices ``current`` lists with a socket ``previous`` did not list, per gateway."""
    before = {d.conn_id for d in previous.devices} if isinstance(previous, UserSessions) else set()
    out: Targets = {}
    for dev in current.devices:
        if dev.conn_id in before:
            continue
        ref = DeviceRef(user_id=current.user_id, device_id=dev.device_id)
        refs = out.setdefault(dev.gateway, [])
        if ref not in refs:
            refs.append(ref)
    return out


class RecentMessages:
    """The newest message a router routed in each conversation lately, found by user.

    It closes the one window the delivery protocol leaves open: a device
    connects, persistence replays what was stored up to that moment, and a
    message stored just after is routed before the router's session view lists
    the device (the view lags under a reconnect storm) — so it goes to push
    only, and the open socket would see it only when a later message in that
    conversation shows the gap. A router notes each message with the users it
    is for *before* it looks their devices up; when the view then lists a
    socket it did not list before, the router sends that device the newest
    message of each of the user's conversations noted within ``window_s``
    (:meth:`for_user`). The gateway writes it if it is next in line, drops it
    if the socket has it already, and asks persistence for the range before
    it if anything is missing, so one frame per conversation is enough.
    Noting first means a lookup that missed the device is always followed by
    a note the view's update sees. ``window_s`` 0 turns it off.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        #: conversation -> (noted at, frame of its newest message)
        self._last: dict[str, tuple[float, dict[str, Any]]] = {}
        #: user -> conversation -> noted at
        self._convs: dict[str, dict[str, float]] = {}
        self._swept = clock()
        # The traffic consumer notes, the session view's reader looks up: two threads.
        self._lock = threading.Lock()

    def note(self, conversation: str, frame: dict[str, Any], users: Iterable[str]) -> None:
        if self.window_s <= 0:
            return
        now = self._clock()
        with self._lock:
            self._last[conversation] = (now, frame)
            for user in users:
                convs = self._convs.get(user)
                if convs is None:
                    convs = self._convs[user] = {}
                convs[conversation] = now
            if now - self._swept >= self.window_s:
                self._sweep(now)

    def for_user(self, user: str) -> list[dict[str, Any]]:
        """The newest message of each conversation of ``user`` noted within the window."""
        horizon = self._clock() - self.window_s
        with self._lock:
            convs = self._convs.get(user)
            if not convs:
                return []
            frames = []
            for conv, at in convs.items():
                last = self._last.get(conv)
                if at >= horizon and last is not None and last[0] >= horizon:
                    frames.append(last[1])
            return frames

    def __len__(self) -> int:
        return len(self._last)

    def _sweep(self, now: float) -> None:
        horizon = now - self.window_s
        self._last = {c: v for c, v in self._last.items() if v[0] >= horizon}
        kept: dict[str, dict[str, float]] = {}
        for user, convs in self._convs.items():
            fresh = {c: at for c, at in convs.items() if at >= horizon}
            if fresh:
                kept[user] = fresh
        self._convs = kept
        self._swept = now


def recent_for_new_devices(
    recent: RecentMessages, current: Event, previous: Event | None, max_bytes: int
) -> Outbox | None:
    """Session-view hook of a router: the recent messages a device the view just listed may lack."""
    if not isinstance(current, UserSessions) or not current.devices:
        return None
    targets = new_devices(current, previous)
    if not targets:
        return None
    frames = recent.for_user(current.user_id)
    if not frames:
        return None
    outbox = Outbox(max_bytes)
    for frame in frames:
        outbox.add(frame, targets)
    return outbox


def send_unwaited(publisher: Any, outbox: Outbox) -> None:
    """Send an outbox's Delivers without waiting for the broker, failures logged.

    For the recent messages of a new socket: the session view's reader must
    keep up with a reconnect storm (a flush per update would hold it ~5 ms
    each), and a frame lost here is found by the next message's gap.
    """
    try:
        for future in outbox.send(publisher):
            future.add_errback(_log_unsent)
    except Exception as exc:  # noqa: BLE001 - broker away: the next message shows the gap
        _log_unsent(exc)


def _log_unsent(exc: BaseException) -> None:
    logger.warning("recent messages for a new socket not sent: %s", exc)
