"""In-memory stand-ins for persistence's dependencies (same methods as PersistenceStore)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from chatlib.schemas import Event, GroupChanged, StoredMessage

from services.persistence.logic import Interval, KnownUser, MemberRange, Offsets, parties
from services.persistence.storage import SeqTaken


class FakeStore:
    """Dict-backed PersistenceStore with the same rules (unique keys, $max offsets and lasts)."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, int], StoredMessage] = {}
        #: conversation -> {"last_seq", "last": {seq, ts, message}, "members" (dms)}
        self.conversations: dict[str, dict[str, Any]] = {}
        self.ranges: dict[str, MemberRange] = {}
        self.device_offsets: dict[tuple[str, str, str], Offsets] = {}
        self.user_offsets: dict[tuple[str, str], Offsets] = {}
        self.users: dict[str, KnownUser] = {}
        self.mutes: set[tuple[str, str]] = set()
        #: raise this exception once at the named step (crash simulation)
        self.fail_at: str | None = None
        self.calls: list[str] = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if self.fail_at == name:
            self.fail_at = None
            raise RuntimeError(f"crash at {name}")

    # -- messages
    def get_messages_by_keys(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], StoredMessage]:
        self._step("get_messages_by_keys")
        wanted = set(keys)
        return {(m.sender, m.id): m for m in self.messages.values() if (m.sender, m.id) in wanted}

    def migrate(self) -> int:
        return 0

    def load_lasts(self, conversations: Iterable[str]) -> dict[str, int]:
        self._step("load_lasts")
        out = {}
        for conv in set(conversations):
            last = self.conversations.get(conv, {}).get("last_seq", 0)
            above = [m for (c, seq), m in self.messages.items() if c == conv and seq > last]
            if above:
                newest = max(above, key=lambda m: m.seq)
                self.save_conversations([newest])
                last = newest.seq
            out[conv] = last
        return out

    def insert_new(self, messages: list[StoredMessage]) -> tuple[int, bool]:
        self._step("insert_new")
        keys = {(m.sender, m.id) for m in self.messages.values()}
        for i, m in enumerate(messages):
            if (m.sender, m.id) in keys:
                return i, True
            if (m.conversation, m.seq) in self.messages:
                raise SeqTaken(f"{m.conversation} {m.seq}")
            self.messages[(m.conversation, m.seq)] = m
            keys.add((m.sender, m.id))
        return len(messages), False

    def get_messages(self, conversation: str, intervals: list[Interval]) -> list[StoredMessage]:
        out = [
            m for (c, s), m in self.messages.items() if c == conversation and any(lo <= s <= hi for lo, hi in intervals)
        ]
        return sorted(out, key=lambda m: m.seq)

    def get_message_at(self, conversation: str, seq: int) -> StoredMessage | None:
        return self.messages.get((conversation, seq))

    def count_from_others(self, conversation: str, intervals: list[Interval], user_id: str) -> int:
        return sum(1 for m in self.get_messages(conversation, intervals) if m.sender != user_id)

    # -- conversations
    def save_conversations(self, messages: Iterable[StoredMessage]) -> None:
        self._step("save_conversations")
        for m in messages:
            doc = self.conversations.setdefault(m.conversation, {"last_seq": 0})
            if m.group is None:
                doc.setdefault("members", parties(m.conversation))
            doc["last_seq"] = max(doc["last_seq"], m.seq)
            if m.seq > doc.get("last", {}).get("seq", 0):
                doc["last"] = {"seq": m.seq, "ts": m.ts, "message": m.frame()}

    def get_lasts(self, conversations: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {c: self.conversations[c]["last"] for c in conversations if "last" in self.conversations.get(c, {})}

    def get_dm_conversations(self, user_id: str) -> list[dict[str, Any]]:
        out = []
        for conv, doc in self.conversations.items():
            members = doc.get("members", [])
            if user_id in members:
                peer = next((u for u in members if u != user_id), user_id)
                out.append({"conversation": conv, "peer": peer, "last": doc.get("last", {})})
        return out

    def get_dm_conversations_of(self, user_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        return {u: self.get_dm_conversations(u) for u in set(user_ids)}

    def get_dm_peers(self, user_ids: Iterable[str]) -> dict[str, set[str]]:
        ids = set(user_ids)
        out: dict[str, set[str]] = {u: set() for u in ids}
        for doc in self.conversations.values():
            members = doc.get("members", [])
            for u in members:
                if u in ids:
                    out[u].update(x for x in members if x != u)
        return out

    # -- ranges
    def get_ranges_of_user(self, user_id: str, conversation: str | None = None) -> list[MemberRange]:
        return [r for r in self.ranges.values() if r.user_id == user_id and conversation in (None, r.conversation)]

    def get_ranges_of_user_ids(self, user_ids: Iterable[str]) -> dict[str, list[MemberRange]]:
        return {u: self.get_ranges_of_user(u) for u in set(user_ids)}

    def get_ranges_of_conversations(self, conversations: Iterable[str]) -> list[MemberRange]:
        convs = set(conversations)
        return [r for r in self.ranges.values() if r.conversation in convs]

    def get_ranges_of_users(self, user_ids: Iterable[str], conversations: Iterable[str]) -> list[MemberRange]:
        users, convs = set(user_ids), set(conversations)
        return [r for r in self.ranges.values() if r.user_id in users and r.conversation in convs]

    def save_ranges(self, opened: list[MemberRange], closed: list[MemberRange]) -> None:
        for r in opened:
            self.ranges[r.range_id] = r
        for r in closed:
            if self.ranges[r.range_id].to_seq is None:
                self.ranges[r.range_id] = replace(self.ranges[r.range_id], to_seq=r.to_seq, closed_ts=r.closed_ts)

    # -- offsets
    def get_device_offsets(self, user_id: str, device_id: str) -> dict[str, Offsets]:
        return {c: o for (u, d, c), o in self.device_offsets.items() if (u, d) == (user_id, device_id)}

    def get_offsets_of_devices(self, devices: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, Offsets]]:
        return {(u, d): self.get_device_offsets(u, d) for u, d in set(devices)}

    def get_device_offsets_many(self, keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], Offsets]:
        return {k: self.device_offsets[k] for k in keys if k in self.device_offsets}

    def get_user_offsets(self, user_id: str) -> dict[str, Offsets]:
        return {c: o for (u, c), o in self.user_offsets.items() if u == user_id}

    def get_user_offsets_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Offsets]:
        return {k: self.user_offsets[k] for k in keys if k in self.user_offsets}

    def set_offsets(self, devices: dict[tuple[str, str, str], Offsets], users: dict[tuple[str, str], Offsets]) -> None:
        self._step("set_offsets")
        for table, updates in ((self.device_offsets, devices), (self.user_offsets, users)):
            for k, o in updates.items():
                cur = table.get(k, Offsets())  # type: ignore[call-overload]
                table[k] = Offsets(max(cur.delivered, o.delivered), max(cur.read, o.read))  # type: ignore[index]

    def fold_offsets(self, pace: bool = False) -> int:
        return 0  # set_offsets writes through

    def recover_offsets(self) -> int:
        return 0

    def delete_device_offsets(self, user_id: str, device_id: str | None = None) -> int:
        gone = [k for k in self.device_offsets if k[0] == user_id and device_id in (None, k[1])]
        for k in gone:
            del self.device_offsets[k]
        return len(gone)

    # -- users
    def get_users(self, user_ids: Iterable[str]) -> dict[str, KnownUser]:
        return {u: self.users[u] for u in user_ids if u in self.users}

    def set_user(self, user_id: str, username: str, name: str) -> None:
        self.users.setdefault(user_id, KnownUser(user_id))

    def set_user_deleted(self, user_id: str, ts: int) -> None:
        self.users[user_id] = KnownUser(user_id, deleted=True)

    # -- mutes
    def set_mute(self, user_id: str, conversation: str, muted: bool) -> None:
        if muted:
            self.mutes.add((user_id, conversation))
        else:
            self.mutes.discard((user_id, conversation))

    def get_mutes(self, user_id: str) -> list[str]:
        return sorted(c for u, c in self.mutes if u == user_id)


class FakePublisher:
    """Records what would be produced: (topic name, event, key)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Event, str | None]] = []
        self.flushes = 0

    def send(self, topic: Any, ev: Event, key: str | None = None) -> Any:
        self.sent.append((topic.name if hasattr(topic, "name") else topic, ev, key))
        return _Sent()

    def publish(self, topic: Any, ev: Event, key: str | None = None, timeout: float = 10.0) -> None:
        self.send(topic, ev, key)

    def flush(self, timeout: float = 10.0) -> None:
        self.flushes += 1

    def of(self, kind: type) -> list[Any]:
        return [ev for _, ev, _ in self.sent if isinstance(ev, kind)]

    def to(self, topic_name: str) -> list[Any]:
        return [ev for t, ev, _ in self.sent if t == topic_name]

    def clear(self) -> None:
        self.sent.clear()


class FakeView:
    """The groups view: key -> latest GroupChanged, calling the service hook like the real one."""

    def __init__(self) -> None:
        self.data: dict[str, Event] = {}
        self.on_update: Any = None

    def get(self, key: str) -> Event | None:
        return self.data.get(key)

    def put(self, ev: GroupChanged) -> None:
        self.data[ev.group.group_id] = ev
        if self.on_update is not None:
            self.on_update(ev)


class _Sent:
    """kafka-python's future of a record the broker has."""

    def get(self, timeout: float | None = None) -> None:
        return None

    def add_errback(self, fn: Any) -> _Sent:
        return self
