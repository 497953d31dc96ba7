"""Pure rules of persistence: no Mongo, no Kafka, unit-testable.

- who may write to a conversation (:func:`authorise_dm`, :func:`authorise_group`);
- how a batch's new messages are numbered (:func:`number_batch`);
- how offsets move (:func:`advance`: never backwards, read implies delivered)
  and which user-level advances become receipts (:func:`receipt_events`);
- which seqs a member may read (:class:`MemberRange`, :func:`visible_intervals`,
  :func:`apply_group_change`) and how a history page or a replay is cut out of
  them (:func:`history_page`, :func:`clip`);
- how frames are packed into Deliver events (:func:`chunk_frames`,
  :func:`connect_delivers`, :func:`replay_delivers`).

Intervals are inclusive ``(lo, hi)`` seq pairs, sorted and disjoint.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from chatlib.errors import ErrorCode
from chatlib.schemas import (
    Deliver,
    DeviceRef,
    GroupChanged,
    GroupSnapshot,
    InboundMessage,
    ReceiptStored,
    StoredMessage,
    ack_frame,
    dm_conversation,
    group_conversation,
    parse_conversation,
)

Interval = tuple[int, int]
Frame = dict[str, Any]
#: A seq above every real one: the open end of a range.
INFINITY = 2**62


# ---------------------------------------------------------------------------
# Authorisation of a new message
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a message is not stored; becomes an error frame to the sending device."""

    code: ErrorCode
    message: str

    def frame(self, ref: str | None) -> Frame:
        out: Frame = {"type": "error", "code": self.code.value, "message": self.message}
        if ref is not None:
            out["ref"] = ref
        return out


@dataclass(frozen=True)
class KnownUser:
    """The users projection's view of one account."""

    user_id: str
    deleted: bool = False


def target_conversation(ev: InboundMessage) -> str | None:
    """The conversation a message belongs to, computed here (never trusted from the event)."""
    if ev.group is not None:
        return group_conversation(ev.group)
    if ev.to is not None and ev.to != ev.sender:
        return dm_conversation(ev.sender, ev.to)
    return None


def authorise_dm(sender: str, to: str | None, recipient: KnownUser | None) -> Refusal | None:
    """A 1-to-1 message needs a recipient that exists and is not deleted (and is not the sender)."""
    if not to or to == sender:
        return Refusal(ErrorCode.INVALID_REQUEST, "a message needs a recipient other than yourself")
    if recipient is None:
        return Refusal(ErrorCode.NOT_FOUND, "unknown recipient")
    if recipient.deleted:
        return Refusal(ErrorCode.NOT_FOUND, "the recipient's account no longer exists")
    return None


def authorise_group(sender: str, snapshot: GroupSnapshot | None) -> Refusal | None:
    """A group message needs a live group the sender is a current member of."""
    if snapshot is None or snapshot.deleted:
        return Refusal(ErrorCode.NOT_FOUND, "unknown group")
    if sender not in snapshot.member_ids():
        return Refusal(ErrorCode.FORBIDDEN, "you are not a member of this group")
    return None


# ---------------------------------------------------------------------------
# Numbering and storing
# ---------------------------------------------------------------------------


def new_message_id() -> str:
    """Message ids are opaque: a random 128-bit hex string."""
    return uuid.uuid4().hex


def number_batch(
    accepted: Sequence[tuple[InboundMessage, str]], last_seqs: dict[str, int], ts: int
) -> list[tuple[InboundMessage, StoredMessage]]:
    """Give each accepted message its seq, in batch order per conversation.

    ``last_seqs[conv]`` is the counter *after* it was raised by the number of
    new messages of that conversation, so they take ``last - k + 1 .. last``.
    """
    counts: dict[str, int] = {}
    for _, conv in accepted:
        counts[conv] = counts.get(conv, 0) + 1
    next_seq = {conv: last_seqs[conv] - n + 1 for conv, n in counts.items()}
    out = []
    for ev, conv in accepted:
        seq = next_seq[conv]
        next_seq[conv] = seq + 1
        out.append(
            (
                ev,
                StoredMessage(
                    message_id=new_message_id(),
                    id=ev.id,
                    conversation=conv,
                    seq=seq,
                    sender=ev.sender,
                    from_device=ev.sender_device,
                    to=ev.to if ev.group is None else None,
                    group=ev.group,
                    body=ev.body,
                    ts=ts,
                ),
            )
        )
    return out


def raised(lasts: dict[str, int], accepted: Sequence[tuple[InboundMessage, str]]) -> dict[str, int]:
    """Each conversation's last seq after numbering ``accepted`` on top of ``lasts``
    (the form :func:`number_batch` takes)."""
    out = dict(lasts)
    for _, conv in accepted:
        out[conv] = out.get(conv, 0) + 1
    return out


def ack_for(msg: StoredMessage) -> Frame:
    """The ack frame of a stored message (the same for its first copy and every retry)."""
    return ack_frame(msg.id, msg.message_id, msg.conversation, msg.seq, msg.ts)


def parties(conversation: str) -> list[str]:
    """The two users of a dm conversation, or [] for anything else."""
    try:
        kind, ids = parse_conversation(conversation)
    except ValueError:
        return []
    return ids if kind == "dm" else []


# ---------------------------------------------------------------------------
# Offsets and receipts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Offsets:
    """How far a device (or a user, over all devices) has received and read a conversation."""

    delivered: int = 0
    read: int = 0


def advance(current: Offsets, status: Literal["delivered", "read"], up_to: int) -> Offsets:
    """Move offsets forward only; reading up to n means having received up to n too."""
    read = max(current.read, up_to) if status == "read" else current.read
    return Offsets(delivered=max(current.delivered, up_to, read), read=read)


class OffsetCache:
    """Delivered and read offsets this process owns, so a receipt costs no database read.

    Offsets of a conversation only move through the consumer that owns its
    partition (receipts travel keyed by conversation), so what this process
    read or wrote stays true until its partitions change (``clear``) or the
    user events remove a device's queue (``drop``). A miss is not an answer:
    the caller reads the store and ``put``s what it found (absent = zero).
    """

    def __init__(self, max_entries: int = 1_000_000):
        self.max_entries = max_entries
        self.devices: dict[tuple[str, str, str], Offsets] = {}
        self.users: dict[tuple[str, str], Offsets] = {}

    def put(self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets]) -> None:
        if len(self.devices) + len(self.users) + len(devices) + len(users) > self.max_entries:
            self.clear()  # forgetting only costs reads
        self.devices.update(devices)
        self.users.update(users)

    def drop(self, user_id: str, device_id: str | None = None) -> None:
        """Forget one device's offsets (or every device of a user)."""
        gone = [k for k in self.devices if k[0] == user_id and device_id in (None, k[1])]
        for k in gone:
            del self.devices[k]

    def clear(self) -> None:
        self.devices.clear()
        self.users.clear()


@dataclass
class ReceiptState:
    """One (user, conversation) during a receipt batch: where it started and where it is."""

    before: Offsets
    now: Offsets
    read_device: str = ""
    delivered_device: str = ""


def receipt_events(states: dict[tuple[str, str], ReceiptState]) -> list[ReceiptStored]:
    """The ReceiptStored events of a batch: one per user-level offset that advanced.

    A read advance is reported as ``read`` (it implies delivered); a delivered
    advance beyond the read offset is reported as ``delivered`` too.
    """
    out = []
    for (user_id, conv), st in states.items():
        if st.now.read > st.before.read:
            out.append(
                ReceiptStored(
                    conversation=conv,
                    user_id=user_id,
                    device_id=st.read_device,
                    status="read",
                    up_to_seq=st.now.read,
                    after_seq=st.before.read,
                )
            )
        if st.now.delivered > st.before.delivered and st.now.delivered > st.now.read:
            out.append(
                ReceiptStored(
                    conversation=conv,
                    user_id=user_id,
                    device_id=st.delivered_device,
                    status="delivered",
                    up_to_seq=st.now.delivered,
                    after_seq=max(st.before.delivered, st.now.read),
                )
            )
    return out


# ---------------------------------------------------------------------------
# Group member ranges and visibility
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberRange:
    """The seqs ``from_seq..to_seq`` of a group a user may read (``to_seq`` None while a member)."""

    range_id: str
    conversation: str
    user_id: str
    from_seq: int
    to_seq: int | None = None
    opened_ts: int = 0
    closed_ts: int | None = None
    joined_ts: int = 0

    @property
    def open(self) -> bool:
        return self.to_seq is None


def apply_group_change(
    ranges: list[MemberRange], change: GroupChanged, last_seq: int
) -> tuple[list[MemberRange], list[MemberRange]]:
    """New and closed ranges after one GroupChanged, given a group's current ranges.

    A member without an open range gets one starting after ``last_seq`` (they
    see messages from their joining on); a user with an open range who is no
    longer a member (or the group is gone) has it closed at ``last_seq`` (they
    keep history up to their removal). Events older than a range's own
    opening or closing are ignored, so a redelivered snapshot changes nothing;
    a member whose membership (``joined_ts``) already had a range closed is not
    reopened by an old snapshot either.
    """
    conv = group_conversation(change.group.group_id)
    members = {} if change.group.deleted else {m.user_id: m.joined_ts for m in change.group.members}
    by_user: dict[str, list[MemberRange]] = {}
    for r in ranges:
        by_user.setdefault(r.user_id, []).append(r)
    opened: list[MemberRange] = []
    closed: list[MemberRange] = []
    for user_id, rs in by_user.items():
        for r in rs:
            if r.open and user_id not in members and change.ts >= r.opened_ts:
                closed.append(replace(r, to_seq=max(last_seq, r.from_seq - 1), closed_ts=change.ts))
    for user_id, joined_ts in members.items():
        rs = by_user.get(user_id, [])
        if any(r.open for r in rs):
            continue
        if any(r.closed_ts is not None and r.closed_ts > change.ts for r in rs):
            continue  # a stale snapshot from before this user's removal
        if joined_ts and any(r.joined_ts == joined_ts for r in rs):
            continue  # this very membership was already recorded (and closed)
        opened.append(
            MemberRange(
                range_id=uuid.uuid4().hex,
                conversation=conv,
                user_id=user_id,
                from_seq=last_seq + 1,
                opened_ts=change.ts,
                joined_ts=joined_ts,
            )
        )
    return opened, closed


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint, non-empty intervals."""
    out: list[Interval] = []
    for lo, hi in sorted(i for i in intervals if i[0] <= i[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def visible_intervals(ranges: Iterable[MemberRange], last_seq: int) -> list[Interval]:
    """The seqs a group member may read, up to the conversation's last seq."""
    return merge((max(1, r.from_seq), min(last_seq, r.to_seq if r.to_seq is not None else INFINITY)) for r in ranges)


def dm_intervals(last_seq: int) -> list[Interval]:
    """Both parties of a dm read all of it."""
    return [(1, last_seq)] if last_seq > 0 else []


def clip(intervals: Iterable[Interval], after: int, up_to: int) -> list[Interval]:
    """The part of ``intervals`` with ``after < seq <= up_to``."""
    return merge((max(lo, after + 1), min(hi, up_to)) for lo, hi in intervals)


def size(intervals: Iterable[Interval]) -> int:
    return sum(hi - lo + 1 for lo, hi in intervals)


def history_page(intervals: list[Interval], before_seq: int | None, limit: int) -> tuple[list[Interval], int | None]:
    """The seq ranges of one history page (newest first) and the next page's ``before_seq``.

    Seqs are dense, so a page is the ``limit`` highest visible seqs below
    ``before_seq``: bounded index ranges, never a sort over the conversation.
    """
    top = INFINITY if before_seq is None else before_seq - 1
    page: list[Interval] = []
    left = limit
    for lo, hi in reversed(clip(intervals, 0, top)):
        if left <= 0:
            break
        take_lo = max(lo, hi - left + 1)
        page.append((take_lo, hi))
        left -= hi - take_lo + 1
    page.reverse()
    if not page:
        return [], None
    lowest = page[0][0]
    more = size(clip(intervals, 0, lowest - 1)) > 0
    return page, lowest if more else None


# ---------------------------------------------------------------------------
# Unread counts
# ---------------------------------------------------------------------------


def unread_span(intervals: list[Interval], read_seq: int) -> list[Interval]:
    """The visible seqs above the user's read offset."""
    return clip(intervals, read_seq, INFINITY)


# ---------------------------------------------------------------------------
# Deliver packing
# ---------------------------------------------------------------------------


def frame_bytes(frame: Frame) -> int:
    """The size a frame takes inside a Deliver record."""
    return len(json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode())


def chunk_frames(frames: list[Frame], max_bytes: int) -> list[list[Frame]]:
    """Split frames, in order, into lists of at most ``max_bytes`` each (at least one frame per list)."""
    chunks: list[list[Frame]] = []
    current: list[Frame] = []
    used = 0
    for f in frames:
        n = frame_bytes(f)
        if current and used + n > max_bytes:
            chunks.append(current)
            current, used = [], 0
        current.append(f)
        used += n
    if current:
        chunks.append(current)
    return chunks


def message_or_ack(msg: StoredMessage, device: DeviceRef) -> Frame:
    """What a replay sends a device for one message: its own sends come back as acks."""
    if msg.sender == device.user_id and msg.from_device == device.device_id:
        return ack_for(msg)
    return msg.frame()


@dataclass
class ConnectReplay:
    """Everything a freshly connected socket must get (protocol point 5).

    The device's own messages above its delivered offset come as acks, not
    left out: the sync passes their seqs, after which the gateway drops any
    ack still on its way, so a socket that lost an ack gets it here.
    """

    #: conversation -> the messages to send, in seq order
    messages: dict[str, list[StoredMessage]] = field(default_factory=dict)
    #: conversation -> current last seq (every conversation of the user)
    last: dict[str, int] = field(default_factory=dict)
    #: conversation -> this device's delivered offset
    delivered: dict[str, int] = field(default_factory=dict)


def connect_delivers(replay: ConnectReplay, device: DeviceRef, conn_id: str, max_bytes: int) -> list[Deliver]:
    """The Delivers of a connect replay: the initial one first, then the rest of a large replay.

    The initial Deliver carries as many frames as fit and a sync entry for
    every conversation: its last seq when all of its frames are in, otherwise
    the highest seq it does carry (or the device's delivered offset). Each
    following Deliver is a sync Deliver for the socket carrying the next
    frames, so the gateway never holds more than one record's worth back.
    """
    frames = [message_or_ack(m, device) for conv in sorted(replay.messages) for m in replay.messages[conv]]
    chunks = chunk_frames(frames, max_bytes) or [[]]
    remaining: dict[str, int] = {}
    for f in frames:
        remaining[f["conversation"]] = remaining.get(f["conversation"], 0) + 1
    reached = dict(replay.delivered)
    out = []
    for i, chunk in enumerate(chunks):
        touched: set[str] = set()
        for f in chunk:
            conv = f["conversation"]
            remaining[conv] -= 1
            reached[conv] = f["seq"]
            touched.add(conv)
        convs = set(replay.last) | touched if i == 0 else touched
        sync = {}
        for conv in sorted(convs):
            if remaining.get(conv, 0) == 0:
                sync[conv] = max(replay.last.get(conv, 0), reached.get(conv, 0))
            else:
                sync[conv] = reached.get(conv, 0)
        out.append(Deliver(targets=[device], frames=chunk, sync=sync, conn_id=conn_id, initial=i == 0))
    return out


def replay_delivers(
    conversation: str, messages: list[StoredMessage], device: DeviceRef, conn_id: str, up_to_seq: int, max_bytes: int
) -> list[Deliver]:
    """The answer to a ReplayRequest: the missing frames, the last Deliver syncing up to ``up_to_seq``."""
    frames = [message_or_ack(m, device) for m in messages]
    chunks = chunk_frames(frames, max_bytes) or [[]]
    out = []
    for i, chunk in enumerate(chunks):
        final = i == len(chunks) - 1
        through = up_to_seq if final else chunk[-1]["seq"]
        out.append(Deliver(targets=[device], frames=chunk, sync={conversation: through}, conn_id=conn_id))
    return out
