"""The read side of persistence, served over HTTP: conversation list, history, sync, mutes.

Every answer is cut out of what the user may read: a dm's two parties read
all of it; a group member reads the seqs of their membership ranges (from
joining to leaving), so a removed member keeps the history of their time in
the group and nothing after.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chatlib.errors import forbidden, not_found
from chatlib.schemas import GroupSnapshot, parse_conversation

from . import logic
from .inbound import Part
from .logic import Interval, Offsets


@dataclass
class ConvInfo:
    """One conversation as a user sees it."""

    conversation: str
    #: the seqs the user may read, up to ``last``
    intervals: list[Interval]
    #: the newest stored seq of the conversation
    last: int
    #: the newest message the user may read (a message frame), if any
    last_message: dict[str, Any] | None
    #: ordering key: newest activity first
    activity: int


class Reads(Part):
    """Conversations, history and sync for the HTTP side (and the replays)."""

    def _member_snapshot(self, group_id: str, user_id: str) -> GroupSnapshot | None:
        """The group as the view has it, after waiting briefly for a group or membership that
        the group service recorded a moment ago (read-your-writes for the REST side)."""
        deadline = time.monotonic() + self.config.catchup_wait_ms / 1000
        seen = self.svc.groups_catchup.version
        snap = self.svc.snapshot(group_id)
        while (snap is None or snap.deleted or user_id not in snap.member_ids()) and time.monotonic() < deadline:
            seen = self.svc.groups_catchup.wait_change(seen, deadline)
            snap = self.svc.snapshot(group_id)
        return snap

    def conversations_of(self, user_id: str) -> list[ConvInfo]:
        """Every conversation the user can read: dms from user_conversations, groups from member ranges."""
        return self.conversations_of_users([user_id])[user_id]

    def conversations_of_users(self, user_ids: Iterable[str]) -> dict[str, list[ConvInfo]]:
        """:meth:`conversations_of` for many users in a few ``$in`` queries (a storm of connects)."""
        ids = sorted(set(user_ids))
        out: dict[str, list[ConvInfo]] = {
            u: [
                ConvInfo(
                    conversation=d["conversation"],
                    intervals=logic.dm_intervals(int(d.get("last", {}).get("seq", 0))),
                    last=int(d.get("last", {}).get("seq", 0)),
                    last_message=d.get("last", {}).get("message"),
                    activity=int(d.get("last", {}).get("ts", 0)),
                )
                for d in dms
            ]
            for u, dms in self.store.get_dm_conversations_of(ids).items()
        }
        ranges: dict[str, dict[str, list[logic.MemberRange]]] = {}
        for u, rs in self.store.get_ranges_of_user_ids(ids).items():
            for r in rs:
                ranges.setdefault(u, {}).setdefault(r.conversation, []).append(r)
        lasts = self.store.get_lasts({conv for mine in ranges.values() for conv in mine})
        for u, mine in ranges.items():
            for conv, rs in mine.items():
                out[u].append(self._group_info(conv, rs, lasts.get(conv)))
        return out

    def _group_info(self, conv: str, ranges: list[logic.MemberRange], last: dict[str, Any] | None) -> ConvInfo:
        last_seq = int(last["seq"]) if last else 0
        intervals = logic.visible_intervals(ranges, last_seq)
        top = intervals[-1][1] if intervals else 0
        message: dict[str, Any] | None = None
        activity = max(r.opened_ts for r in ranges)
        if last and top == last_seq and top > 0:
            message, activity = last.get("message"), int(last.get("ts", activity))
        elif top > 0:
            # A removed member: the newest message they may still read.
            m = self.store.get_message_at(conv, top)
            if m is not None:
                message, activity = m.frame(), m.ts
        return ConvInfo(conv, intervals, last_seq, message, activity)

    def conversation_of(self, user_id: str, conversation: str) -> ConvInfo:
        """One conversation for the REST side: 403 for a stranger or a malformed id, 404 for an unknown group."""
        try:
            kind, ids = parse_conversation(conversation)
        except ValueError:
            raise forbidden("you are not a participant of this conversation") from None
        if kind == "dm":
            if user_id not in ids:
                raise forbidden("you are not a participant of this conversation")
            last = int(self.store.get_lasts([conversation]).get(conversation, {}).get("seq", 0))
            return ConvInfo(conversation, logic.dm_intervals(last), last, None, 0)
        ranges = self.store.get_ranges_of_user(user_id, conversation)
        if not ranges:
            snap = self._member_snapshot(ids[0], user_id)
            if snap is None or snap.deleted:
                raise not_found("unknown group")
            if user_id not in snap.member_ids():
                raise forbidden("you are not a member of this group")
            # Joined a moment ago: the readable range is being recorded; nothing to read yet.
            return ConvInfo(conversation, [], 0, None, 0)
        return self._group_info(conversation, ranges, self.store.get_lasts([conversation]).get(conversation))

    def unread(self, user_id: str, info: ConvInfo, read_seq: int) -> int:
        """Messages from others above the user's read offset (plain seq difference when very many)."""
        span = logic.unread_span(info.intervals, read_seq)
        n = logic.size(span)
        if n == 0 or n > self.config.unread_exact_max:
            return n
        return self.store.count_from_others(info.conversation, span, user_id)

    def list_conversations(self, user_id: str) -> list[dict[str, Any]]:
        """GET /v1/conversations: newest activity first."""
        infos = sorted(self.conversations_of(user_id), key=lambda i: (-i.activity, i.conversation))
        offsets = self.store.get_user_offsets(user_id)
        muted = set(self.store.get_mutes(user_id))
        deleted = self._deleted_senders([i.last_message for i in infos if i.last_message])
        out = []
        for info in infos:
            read = offsets.get(info.conversation, Offsets()).read
            out.append(
                {
                    "conversation": info.conversation,
                    "last_message": _mark(info.last_message, deleted) if info.last_message else None,
                    "unread": self.unread(user_id, info, read),
                    "read_seq": read,
                    "muted": info.conversation in muted,
                }
            )
        return out

    def history(self, user_id: str, conversation: str, before_seq: int | None, limit: int) -> dict[str, Any]:
        """GET /v1/conversations/{c}/messages: newest first, within what the user may read."""
        info = self.conversation_of(user_id, conversation)
        page, next_before = logic.history_page(info.intervals, before_seq, limit)
        messages = self.store.get_messages(conversation, page) if page else []
        frames = [m.frame() for m in reversed(messages)]
        deleted = self._deleted_senders(frames)
        return {"messages": [_mark(f, deleted) for f in frames], "next_before_seq": next_before}

    def sync(self, user_id: str, device_id: str, per_conversation: int) -> dict[str, Any]:
        """GET /v1/sync: every conversation with this device's offsets and its latest messages; my groups."""
        infos = sorted(self.conversations_of(user_id), key=lambda i: (-i.activity, i.conversation))
        device = self.store.get_device_offsets(user_id, device_id)
        user = self.store.get_user_offsets(user_id)
        muted = set(self.store.get_mutes(user_id))
        conversations = []
        for info in infos:
            page, _ = logic.history_page(info.intervals, None, per_conversation)
            messages = self.store.get_messages(info.conversation, page) if page else []
            mine = device.get(info.conversation, Offsets())
            conversations.append(
                {
                    "conversation": info.conversation,
                    "read_seq": mine.read,
                    "delivered_seq": mine.delivered,
                    "unread": self.unread(user_id, info, user.get(info.conversation, Offsets()).read),
                    "muted": info.conversation in muted,
                    "messages": [m.frame() for m in reversed(messages)],
                }
            )
        deleted = self._deleted_senders([f for c in conversations for f in c["messages"]])
        for c in conversations:
            c["messages"] = [_mark(f, deleted) for f in c["messages"]]
        groups = []
        for gid in sorted(self.svc.groups_of.get(user_id, set())):
            snap = self.svc.snapshot(gid)
            if snap is not None and not snap.deleted and user_id in snap.member_ids():
                groups.append(snap.public_dict())
        return {"conversations": conversations, "groups": groups}

    def _deleted_senders(self, frames: list[dict[str, Any]]) -> set[str]:
        """Senders of these messages whose account was deleted (one lookup for them all)."""
        users = self.store.get_users({f["from"] for f in frames})
        return {u for u, known in users.items() if known.deleted}

    def set_mute(self, user_id: str, conversation: str, muted: bool) -> None:
        """PUT /v1/conversations/{c}/mute: only a participant may mute a conversation."""
        self.conversation_of(user_id, conversation)
        self.store.set_mute(user_id, conversation, muted)

    def mutes(self, user_id: str) -> list[str]:
        """The conversations a user muted (for the push service)."""
        return self.store.get_mutes(user_id)


def _mark(frame: dict[str, Any], deleted: set[str]) -> dict[str, Any]:
    """A message for the REST side: ``from`` is kept, ``from_deleted`` says the account is gone."""
    return {**frame, "from_deleted": frame["from"] in deleted}
