"""What to notify: devices, exclusions, mutes and burst collapsing (no I/O).

For one PushRequest the candidates are the user's devices that have a push
token, minus ``exclude_devices`` (those online when the message was routed).
A muted conversation gives a ``muted`` outcome per device. Otherwise the
first request for a (user, device, conversation) opens a collapse window of
``window_ms`` (measured on the messages' own timestamps, so a redelivered
batch decides the same way): it is sent, later ones inside the window are
``collapsed``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from chatlib.schemas import PushRequest

logger = logging.getLogger(__name__)

Status = Literal["sent", "recorded", "collapsed", "muted", "unregistered", "failed"]
DEFAULT_TITLE = "New message"


@dataclass(frozen=True)
class PushDevice:
    """A device of the projection that has a push token."""

    user_id: str
    device_id: str
    token: str


@dataclass(frozen=True)
class Notification:
    """One push to one device (``token`` and ``body`` are never logged)."""

    user_id: str
    device_id: str
    token: str
    conversation: str
    message_id: str
    seq: int
    title: str
    body: str

    def data(self) -> dict[str, str]:
        """The data payload the app uses to open the conversation (FCM data values are strings)."""
        return {"conversation": self.conversation, "message_id": self.message_id, "seq": str(self.seq)}


@dataclass(frozen=True)
class Outcome:
    """What happened to one message for one device: a ``push_outcomes`` record."""

    user_id: str
    device_id: str
    conversation: str
    message_id: str
    seq: int
    status: Status
    ts: int

    @property
    def id(self) -> str:
        return outcome_id(self.message_id, self.device_id)


def outcome_id(message_id: str, device_id: str) -> str:
    # One outcome per message and device: a redelivered request finds it and is skipped.
    return f"{message_id}:{device_id}"


@dataclass
class Collapser:
    """Per (user, device, conversation) collapse windows, on message timestamps."""

    window_ms: int
    _opened: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def admit(self, user_id: str, device_id: str, conversation: str, ts: int) -> bool:
        """True: send now (a window opens at ``ts``); False: inside an open window, collapse."""
        key = (user_id, device_id, conversation)
        opened = self._opened.get(key)
        if opened is not None and opened <= ts < opened + self.window_ms:
            return False
        self._opened[key] = ts
        return True

    def prune(self, now_ts: int) -> None:
        """Forget windows that closed long ago (bounded memory)."""
        horizon = now_ts - 10 * self.window_ms - 60_000
        for key in [k for k, opened in self._opened.items() if opened < horizon]:
            del self._opened[key]

    def __len__(self) -> int:
        return len(self._opened)


def plan(
    req: PushRequest,
    devices: Iterable[PushDevice],
    muted: bool,
    collapser: Collapser,
    done: set[str],
    title: str,
    now: int,
) -> tuple[list[Notification], list[Outcome]]:
    """Notifications to send now, and the outcomes already decided (muted, collapsed)."""
    excluded = set(req.exclude_devices)
    to_send: list[Notification] = []
    decided: list[Outcome] = []
    for dev in devices:
        if dev.device_id in excluded or outcome_id(req.message_id, dev.device_id) in done:
            continue
        if muted:
            status: Status | None = "muted"
        elif not collapser.admit(req.user_id, dev.device_id, req.conversation, req.ts):
            status = "collapsed"
        else:
            status = None
        if status is not None:
            decided.append(outcome(req, dev.device_id, status, now))
            continue
        to_send.append(
            Notification(
                user_id=req.user_id,
                device_id=dev.device_id,
                token=dev.token,
                conversation=req.conversation,
                message_id=req.message_id,
                seq=req.seq,
                title=title or DEFAULT_TITLE,
                body=req.preview,
            )
        )
    return to_send, decided


def outcome(req: PushRequest | Notification, device_id: str, status: Status, now: int) -> Outcome:
    user_id = req.user_id
    return Outcome(user_id, device_id, req.conversation, req.message_id, req.seq, status, now)
