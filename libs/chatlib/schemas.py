"""Every Kafka event and WebSocket frame of the system, defined once.

Events travel in one envelope ``{type, version, event_id, occurred_at,
producer, payload}``. Each event class names its ``TYPE`` as a constant
(never derived from the class name) and lists the topic it lives on in
:mod:`chatlib.topics`. Unknown fields are ignored, so an old consumer keeps
working when a newer producer adds fields; the version lives in the topic name.

WebSocket frames are validated with the ``Client*`` models (what a device may
send) and built with the ``*Frame`` helpers (what the server sends).
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ErrorCode

# ---------------------------------------------------------------------------
# Limits of the public contract
# ---------------------------------------------------------------------------

MAX_FRAME_BYTES = 64 * 1024
MAX_BODY_CHARS = 16 * 1024
MAX_CLIENT_ID = 128


def now_ms() -> int:
    """Milliseconds since the Unix epoch: the contract's ``ts``."""
    return int(time.time() * 1000)


def dm_conversation(a: str, b: str) -> str:
    """The id of the 1-to-1 conversation between two users (ids sorted)."""
    x, y = sorted((a, b))
    return f"dm:{x}:{y}"


def group_conversation(group_id: str) -> str:
    return f"group:{group_id}"


def parse_conversation(conversation: str) -> tuple[str, list[str]]:
    """Split a conversation id into its kind and ids.

    ``dm:a:b`` gives ``("dm", [a, b])``; ``group:g`` gives ``("group", [g])``.
    Raises ValueError for anything else.
    """
    kind, _, rest = conversation.partition(":")
    if kind == "dm":
        a, sep, b = rest.partition(":")
        if not a or not sep or not b or ":" in b or a >= b:
            raise ValueError("malformed dm conversation id")
        return "dm", [a, b]
    if kind == "group" and rest and ":" not in rest:
        return "group", [rest]
    raise ValueError("unknown conversation id")


# ---------------------------------------------------------------------------
# Envelope and event base
# ---------------------------------------------------------------------------


class Event(BaseModel):
    """Base of every Kafka event payload."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


_REGISTRY: dict[str, type[Event]] = {}
E = TypeVar("E", bound=Event)


def event(cls: type[E]) -> type[E]:
    """Class decorator: register an event class under its constant TYPE."""
    if not cls.TYPE:
        raise TypeError(f"{cls.__name__} has no TYPE")
    if cls.TYPE in _REGISTRY:
        raise TypeError(f"duplicate event type {cls.TYPE}")
    _REGISTRY[cls.TYPE] = cls
    return cls


def event_class(type_name: str) -> type[Event] | None:
    return _REGISTRY.get(type_name)


class Envelope(BaseModel):
    """The wire form of every event on Kafka."""

    model_config = ConfigDict(extra="ignore")
    type: str
    version: int = 1
    event_id: str = Field(default_factory=lambda: os.urandom(16).hex())
    occurred_at: int = Field(default_factory=now_ms)
    producer: str = ""
    payload: dict[str, Any]

    @classmethod
    def wrap(cls, ev: Event, producer: str) -> Envelope:
        return cls(type=ev.TYPE, version=ev.VERSION, producer=producer, payload=ev.model_dump(mode="json"))

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return cls.model_validate_json(raw)

    def parse(self) -> Event | None:
        """The typed payload, or None for an event type this code does not know."""
        klass = event_class(self.type)
        if klass is None:
            return None
        return klass.model_validate(self.payload)


@functools.lru_cache(maxsize=64)
def _quoted(text: str) -> str:
    return json.dumps(text)


def to_bytes(ev: Event, producer: str = "") -> bytes:
    """Serialise an event inside its envelope.

    The same bytes as ``Envelope.wrap(ev, producer).to_bytes()`` without the payload's
    round trip through a dict and a second validation: the event is dumped to JSON
    once, by pydantic-core, and the envelope's fixed fields are put around it.
    """
    # TYPE is a literal of this code base (no quotes, no escapes); the producer's name is quoted.
    head = (
        f'{{"type":"{ev.TYPE}","version":{ev.VERSION},"event_id":"{os.urandom(16).hex()}",'
        f'"occurred_at":{now_ms()},"producer":{_quoted(producer)},"payload":'
    )
    return b"%s%s}" % (head.encode(), ev.model_dump_json().encode())


def from_bytes(raw: bytes) -> Event | None:
    """Parse an enveloped event; None if its type is unknown here."""
    return Envelope.from_bytes(raw).parse()


# ---------------------------------------------------------------------------
# Shared value objects
# ---------------------------------------------------------------------------


class DeviceRef(BaseModel):
    """One device of one user."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str
    device_id: str


class StoredMessage(BaseModel):
    """A message as stored and as every device receives it."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)
    message_id: str
    id: str
    conversation: str
    seq: int
    sender: str = Field(alias="from")
    from_device: str
    to: str | None = None
    group: str | None = None
    body: str
    ts: int

    def frame(self) -> dict[str, Any]:
        """The contract's server ``message`` frame."""
        f: dict[str, Any] = {
            "type": "message",
            "message_id": self.message_id,
            "id": self.id,
            "conversation": self.conversation,
            "seq": self.seq,
            "from": self.sender,
            "from_device": self.from_device,
            "body": self.body,
            "ts": self.ts,
        }
        if self.group is not None:
            f["group"] = self.group
        else:
            f["to"] = self.to
        return f


class GroupMember(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str
    role: Literal["owner", "admin", "member"]
    joined_ts: int = 0


class GroupSnapshot(BaseModel):
    """A group as the group service publishes it (the compacted topic's value)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    group_id: str
    name: str
    public: bool = False
    owner: str
    members: list[GroupMember]
    created_ts: int
    deleted: bool = False

    def member_ids(self) -> frozenset[str]:
        """The members' user ids, built once per members list: routers and persistence ask per
        event, and a group of thousands made building it the largest cost of a receipt.

        Kept beside the fields (not one of them: not compared, dumped or validated), with the
        list it was built from, so a copy with other members (``model_copy(update=...)``)
        builds its own.
        """
        cached = self.__dict__.get("_member_ids")
        if cached is None or cached[0] is not self.members:
            cached = (self.members, frozenset(m.user_id for m in self.members))
            self.__dict__["_member_ids"] = cached
        return cached[1]

    def public_dict(self) -> dict[str, Any]:
        """The contract's group object."""
        return {
            "group_id": self.group_id,
            "name": self.name,
            "public": self.public,
            "owner": self.owner,
            "members": [{"user_id": m.user_id, "role": m.role} for m in self.members],
            "created_ts": self.created_ts,
        }


class SessionDevice(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    device_id: str
    gateway: str
    conn_id: str
    connected_at: int
    device_type: str = "mobile"
    primary: bool = False


# ---------------------------------------------------------------------------
# user.events.v1 (profile) — keyed by user_id
# ---------------------------------------------------------------------------


@event
class UserRegistered(Event):
    TYPE = "user.registered"
    user_id: str
    username: str
    name: str


@event
class UserUpdated(Event):
    TYPE = "user.updated"
    user_id: str
    username: str
    name: str


@event
class UserUnregistered(Event):
    TYPE = "user.unregistered"
    user_id: str


@event
class UserDisabled(Event):
    TYPE = "user.disabled"
    user_id: str


@event
class UserEnabled(Event):
    TYPE = "user.enabled"
    user_id: str


@event
class DeviceRegistered(Event):
    TYPE = "device.registered"
    user_id: str
    device_id: str
    device_type: Literal["mobile", "web"]
    primary: bool


@event
class DevicePushToken(Event):
    """A device's push token was set or replaced (never logged)."""

    TYPE = "device.push_token"
    user_id: str
    device_id: str
    push_token: str


@event
class DeviceLoggedOut(Event):
    """The device's tokens stopped working: gateways close its sockets."""

    TYPE = "device.logged_out"
    user_id: str
    device_id: str


@event
class DeviceRemoved(Event):
    """The device was removed from the account: sockets closed, queue dropped."""

    TYPE = "device.removed"
    user_id: str
    device_id: str


# ---------------------------------------------------------------------------
# session.events.v1 (gateway) — keyed by user_id (heartbeats by gateway id)
# ---------------------------------------------------------------------------


@event
class DeviceConnected(Event):
    TYPE = "session.connected"
    user_id: str
    device_id: str
    device_type: str = "mobile"
    primary: bool = False
    gateway: str
    conn_id: str
    ts: int


@event
class DeviceDisconnected(Event):
    TYPE = "session.disconnected"
    user_id: str
    device_id: str
    gateway: str
    conn_id: str
    ts: int


@event
class GatewayHeartbeat(Event):
    """A gateway instance is alive and holds these connections."""

    TYPE = "session.gateway_heartbeat"
    gateway: str
    connections: list[tuple[str, str, str]] = []  # (user_id, device_id, conn_id)
    ts: int
    # A gateway with many sockets splits one heartbeat (same ts) into ``chunks``
    # records so each stays far below Kafka's record size limit.
    chunk: int = 0
    chunks: int = 1


# ---------------------------------------------------------------------------
# session.changes.v1 (compacted, keyed by user_id) and presence.v1
# ---------------------------------------------------------------------------


@event
class UserSessions(Event):
    """The full set of a user's connected devices (compacted: latest wins)."""

    TYPE = "session.user_sessions"
    user_id: str
    devices: list[SessionDevice]
    online: bool
    last_seen: int


@event
class PresenceChanged(Event):
    TYPE = "presence.changed"
    user_id: str
    online: bool
    last_seen: int


# ---------------------------------------------------------------------------
# chat.messages.in.v1 — keyed by conversation
# ---------------------------------------------------------------------------


@event
class InboundMessage(Event):
    """A client's message frame, stamped by the gateway with the verified identity."""

    TYPE = "chat.inbound_message"
    id: str
    conversation: str
    sender: str
    sender_device: str
    gateway: str
    to: str | None = None
    group: str | None = None
    body: str
    received_ts: int


@event
class InboundReceipt(Event):
    TYPE = "chat.inbound_receipt"
    conversation: str
    user_id: str
    device_id: str
    gateway: str
    status: Literal["delivered", "read"]
    up_to_seq: int


@event
class ReplayRequest(Event):
    """A gateway asks for the messages of one conversation it is missing for a device.

    Produced on chat.messages.in.v1 keyed by the conversation, so it is handled
    after every message of that conversation stored before it.
    """

    TYPE = "chat.replay_request"
    conversation: str
    user_id: str
    device_id: str
    gateway: str
    conn_id: str
    after_seq: int
    up_to_seq: int


# ---------------------------------------------------------------------------
# chat.signals.v1 — keyed by conversation (not stored)
# ---------------------------------------------------------------------------


@event
class TypingSignal(Event):
    TYPE = "chat.typing"
    conversation: str
    user_id: str
    device_id: str
    state: Literal["start", "stop"]


# ---------------------------------------------------------------------------
# chat.messages.stored.v1 (persistence) — keyed by conversation
# ---------------------------------------------------------------------------


@event
class MessageStored(Event):
    TYPE = "chat.message_stored"
    message: StoredMessage


@event
class ReceiptStored(Event):
    """A user's delivered or read offset in a conversation advanced, from ``after_seq`` to ``up_to_seq``.

    The receipt frame goes to the senders of the messages in that range (and
    to the reader's other devices): a router that remembers who sent which
    recent seq tells only them.
    """

    TYPE = "chat.receipt_stored"
    conversation: str
    user_id: str
    device_id: str
    status: Literal["delivered", "read"]
    up_to_seq: int
    #: the offset before this advance (0 when not known: every seq up to up_to_seq)
    after_seq: int = 0


# ---------------------------------------------------------------------------
# chat.route.v1 — requests to the routers keyed by user
# ---------------------------------------------------------------------------


@event
class PresenceRoute(Event):
    """Presence of ``user_id`` to send to these users' online devices."""

    TYPE = "chat.presence_route"
    user_id: str
    online: bool
    last_seen: int
    to_users: list[str]


# ---------------------------------------------------------------------------
# gateway.<instance>.v1 — deliveries to one gateway instance
# ---------------------------------------------------------------------------


@event
class Deliver(Event):
    """Frames for some devices connected to one gateway instance.

    ``sync`` (conversation -> seq) says that, for the target device, everything
    up to that seq has now been sent or is not visible to it; gateways use it to
    keep per-conversation order across replay and live traffic. ``conn_id``
    restricts delivery to one socket (replies to a replay request).
    """

    TYPE = "gateway.deliver"
    targets: list[DeviceRef]
    frames: list[dict[str, Any]]
    sync: dict[str, int] | None = None
    conn_id: str | None = None
    initial: bool = False


@event
class CloseDevice(Event):
    """Close a device's sockets, with an error frame first."""

    TYPE = "gateway.close_device"
    user_id: str
    device_id: str
    code: str = "unauthorized"
    reason: str = "logged out"


# ---------------------------------------------------------------------------
# group.changes.v1 (compacted, keyed by group_id)
# ---------------------------------------------------------------------------


@event
class GroupChanged(Event):
    """A group's new state, with what changed and whom it affects."""

    TYPE = "group.changed"
    group: GroupSnapshot
    event: Literal["created", "updated", "member_added", "member_removed", "role_changed", "deleted"]
    users: list[str] = []
    actor: str | None = None
    ts: int


@event
class ChannelCreated(Event):
    """A public group (channel) was created; on channel.events.v1 keyed by group_id."""

    TYPE = "channel.created"
    group_id: str
    name: str
    owner: str
    ts: int


@event
class ChannelDeleted(Event):
    """A public group (channel) was deleted; on channel.events.v1 keyed by group_id."""

    TYPE = "channel.deleted"
    group_id: str
    actor: str | None = None
    ts: int


# ---------------------------------------------------------------------------
# push.requests.v1 — keyed by user
# ---------------------------------------------------------------------------


@event
class PushRequest(Event):
    """Notify a user's offline devices (all but ``exclude_devices``)."""

    TYPE = "push.request"
    user_id: str
    exclude_devices: list[str] = []
    conversation: str
    message_id: str
    seq: int
    sender: str
    preview: str
    ts: int


class PushRecipient(BaseModel):
    """One recipient of a group push: a user and their devices that are online (not notified)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str
    exclude_devices: list[str] = []


@event
class GroupPushRequest(Event):
    """Notify the offline devices of many users about one group message (one record, not one per member)."""

    TYPE = "push.group_request"
    recipients: list[PushRecipient]
    conversation: str
    message_id: str
    seq: int
    sender: str
    preview: str
    ts: int

    def requests(self) -> list[PushRequest]:
        """The same notification as one PushRequest per recipient."""
        return [
            PushRequest(
                user_id=r.user_id,
                exclude_devices=r.exclude_devices,
                conversation=self.conversation,
                message_id=self.message_id,
                seq=self.seq,
                sender=self.sender,
                preview=self.preview,
                ts=self.ts,
            )
            for r in self.recipients
        ]


# ---------------------------------------------------------------------------
# dead letters
# ---------------------------------------------------------------------------


@event
class DeadLetter(Event):
    TYPE = "dlq.dead_letter"
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str
    error: str
    consumer_group: str


# ---------------------------------------------------------------------------
# WebSocket frames: client to server
# ---------------------------------------------------------------------------


class _Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ClientMessage(_Frame):
    """Send a message: ``to`` a user, or to a ``group`` (exactly one of them).

    ``id`` is the sender's client id: sending again with the same ``id`` never
    makes a second message (idempotent retry). The server answers with ``ack``.
    """

    type: Literal["message"]
    id: str = Field(min_length=1, max_length=MAX_CLIENT_ID)
    to: str | None = Field(default=None, min_length=1, max_length=128)
    group: str | None = Field(default=None, min_length=1, max_length=128)
    body: str

    @model_validator(mode="after")
    def _one_target(self) -> ClientMessage:
        if (self.to is None) == (self.group is None):
            raise ValueError("exactly one of 'to' or 'group' is required")
        return self

    @field_validator("body")
    @classmethod
    def _body(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("body must not be empty")
        return v


class ClientReceipt(_Frame):
    """This device has received (``delivered``) or shown (``read``) everything up to ``up_to_seq``."""

    type: Literal["receipt"]
    conversation: str = Field(min_length=1, max_length=300)
    status: Literal["delivered", "read"]
    up_to_seq: int = Field(ge=0)


class ClientTyping(_Frame):
    """The user started or stopped typing in a conversation (not stored)."""

    type: Literal["typing"]
    conversation: str = Field(min_length=1, max_length=300)
    state: Literal["start", "stop"]


class ClientPing(_Frame):
    """Keep-alive; the server answers ``pong``."""

    type: Literal["ping"]


CLIENT_FRAMES: dict[str, type[_Frame]] = {
    "message": ClientMessage,
    "receipt": ClientReceipt,
    "typing": ClientTyping,
    "ping": ClientPing,
}


class FrameError(Exception):
    """A client frame is malformed; ``code`` is the contract's error code."""

    def __init__(self, code: str, message: str, ref: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


#: A JSON escape of a UTF-16 surrogate; the only way one gets into a frame that is valid UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    """True if a decoded JSON value holds a string with an unpaired surrogate (keys included)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_client_frame(text: str | bytes) -> _Frame:
    """Validate one client frame; raises FrameError with the contract's code."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameError("payload_too_large", f"frame larger than {MAX_FRAME_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise FrameError("invalid_request", "frame is not valid JSON") from None
    except RecursionError:
        # A few kilobytes of "[[[[..." exhaust the decoder's stack: still the client's fault.
        raise FrameError("invalid_request", "frame is nested too deeply") from None
    if not isinstance(data, dict):
        raise FrameError("invalid_request", "frame must be a JSON object")
    ref = data.get("id") if isinstance(data.get("id"), str) else None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(data):
        # "\ud800" alone is valid JSON but no Unicode text: it cannot be stored, forwarded,
        # or even echoed back in an error's ``ref`` (UTF-8 cannot encode it).
        ref = None if ref is None or _has_lone_surrogate(ref) else ref
        raise FrameError("invalid_request", "frame contains a lone UTF-16 surrogate (not Unicode text)", ref)
    kind = data.get("type")
    klass = CLIENT_FRAMES.get(kind) if isinstance(kind, str) else None
    if klass is None:
        raise FrameError("invalid_request", "unknown frame type", ref)
    if kind == "message" and isinstance(data.get("body"), str) and len(data["body"]) > MAX_BODY_CHARS:
        raise FrameError("payload_too_large", f"message body longer than {MAX_BODY_CHARS} characters", ref)
    try:
        return klass.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        raise FrameError("invalid_request", f"{where}: {first['msg']}", ref) from None


# ---------------------------------------------------------------------------
# WebSocket frames: server to client
# ---------------------------------------------------------------------------


def ack_frame(client_id: str, message_id: str, conversation: str, seq: int, ts: int) -> dict[str, Any]:
    """The message with client ``id`` is durably stored: after an ack the server never loses it."""
    return {
        "type": "ack",
        "id": client_id,
        "message_id": message_id,
        "conversation": conversation,
        "seq": seq,
        "ts": ts,
    }


def receipt_frame(conversation: str, user_id: str, status: str, up_to_seq: int) -> dict[str, Any]:
    """``user_id`` has received or read up to ``up_to_seq``: to the senders and the reader's other devices."""
    return {
        "type": "receipt",
        "conversation": conversation,
        "user_id": user_id,
        "status": status,
        "up_to_seq": up_to_seq,
    }


def typing_frame(conversation: str, user_id: str, state: str) -> dict[str, Any]:
    """``user_id`` started or stopped typing in ``conversation``."""
    return {"type": "typing", "conversation": conversation, "user_id": user_id, "state": state}


def presence_frame(user_id: str, online: bool, last_seen: int) -> dict[str, Any]:
    """``user_id`` came online or went offline: to users who share a conversation with them."""
    return {"type": "presence", "user_id": user_id, "online": online, "last_seen": last_seen}


def group_event_frame(change: GroupChanged) -> dict[str, Any]:
    """A group changed (``event``), with the users it affects and the group's new state: to its members."""
    return {
        "type": "group_event",
        "group_id": change.group.group_id,
        "event": change.event,
        "users": list(change.users),
        "actor": change.actor,
        "group": change.group.public_dict(),
        "ts": change.ts,
    }


def error_frame(code: str, message: str, ref: str | None = None) -> dict[str, Any]:
    """A frame was refused; ``ref`` is the client ``id`` of that frame. The socket stays open."""
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    return frame


PONG_FRAME: dict[str, Any] = {"type": "pong"}


# ---------------------------------------------------------------------------
# WebSocket frames: server to client, as models
# ---------------------------------------------------------------------------
# The builders above make the frames (plain dicts, on the hot path); these
# models describe the same frames for docs/asyncapi.yaml, and a unit test
# holds every builder's output to its model, so the two cannot drift.


class _ServerFrame(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class ServerAck(_ServerFrame):
    """The message with client ``id`` is durably stored: after an ack the server never loses it."""

    type: Literal["ack"]
    id: str
    message_id: str
    conversation: str
    seq: int
    ts: int


class ServerMessage(_ServerFrame):
    """A message, to every device of every recipient and to the sender's other devices.

    ``to`` for a 1-to-1 message, ``group`` (instead of ``to``) for a group message. A
    client drops a message whose (``conversation``, ``seq``) it already has.
    """

    type: Literal["message"]
    message_id: str
    id: str
    conversation: str
    seq: int
    sender: str = Field(alias="from")
    from_device: str
    to: str | None = None
    group: str | None = None
    body: str
    ts: int


class ServerReceipt(_ServerFrame):
    """``user_id`` has received or read up to ``up_to_seq``: to the senders and the reader's other devices."""

    type: Literal["receipt"]
    conversation: str
    user_id: str
    status: Literal["delivered", "read"]
    up_to_seq: int


class ServerTyping(_ServerFrame):
    """``user_id`` started or stopped typing in ``conversation``."""

    type: Literal["typing"]
    conversation: str
    user_id: str
    state: Literal["start", "stop"]


class ServerPresence(_ServerFrame):
    """``user_id`` came online or went offline: to users who share a conversation with them."""

    type: Literal["presence"]
    user_id: str
    online: bool
    last_seen: int


class ServerGroupMember(BaseModel):
    """A member in the contract's group object."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    user_id: str
    role: Literal["owner", "admin", "member"]


class ServerGroup(BaseModel):
    """The contract's group object (as ``GET /v1/groups/{id}`` answers it)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    group_id: str
    name: str
    public: bool
    owner: str
    members: list[ServerGroupMember]
    created_ts: int


class ServerGroupEvent(_ServerFrame):
    """A group changed (``event``), with the users it affects and the group's new state: to its members."""

    type: Literal["group_event"]
    group_id: str
    event: Literal["created", "updated", "member_added", "member_removed", "role_changed", "deleted"]
    users: list[str]
    actor: str | None
    group: ServerGroup
    ts: int


class ServerError(_ServerFrame):
    """A frame was refused, or the socket is about to close; ``ref`` is the client ``id`` of that frame.

    After a refused frame the socket stays open.
    """

    type: Literal["error"]
    code: ErrorCode
    message: str
    ref: str | None = None
    details: dict[str, Any] | None = None


class ServerPong(_ServerFrame):
    """The answer to a ``ping``."""

    type: Literal["pong"]


SERVER_FRAMES: dict[str, type[_ServerFrame]] = {
    "ack": ServerAck,
    "message": ServerMessage,
    "receipt": ServerReceipt,
    "typing": ServerTyping,
    "presence": ServerPresence,
    "group_event": ServerGroupEvent,
    "error": ServerError,
    "pong": ServerPong,
}
