"""In-memory stand-ins for the group service's storage and Kafka publisher."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from chatlib.schemas import Event, GroupChanged, GroupSnapshot


class FakePublisher:
    """Records every event instead of producing it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Event, str | None]] = []

    def send(self, topic: Any, ev: Event, key: str | None = None) -> Any:
        self.sent.append((getattr(topic, "name", topic), ev, key))
        return _Done()

    def publish(self, topic: Any, ev: Event, key: str | None = None, timeout: float = 10.0) -> None:
        self.send(topic, ev, key)

    def flush(self, timeout: float = 10.0) -> None:
        pass

    def of(self, klass: type[Event]) -> list[Any]:
        return [ev for _, ev, _ in self.sent if isinstance(ev, klass)]


class _Done:
    def get(self, timeout: float | None = None) -> None:
        return None

    def add_errback(self, fn: Any) -> _Done:
        return self


class FakeOwnedTopic:
    """Stands in for chatlib.republish.TopicOwner: ``lost`` says whether the topic lost its records."""

    def __init__(self, lost: bool = False) -> None:
        self.lost = lost

    def restore_if_lost(self, republish: Callable[[], int]) -> int:
        return republish() if self.lost else 0


class FakeGroupStore:
    """The GroupStore interface over dicts."""

    def __init__(self) -> None:
        self.groups: dict[str, tuple[GroupSnapshot, int, GroupChanged | None]] = {}
        self.last: dict[str, GroupChanged] = {}
        self.users: dict[str, bool] = {}
        self.meta: dict[str, str] = {}
        self.conflicts = 0  # make the next N set_group calls lose a race

    def get_group(self, group_id: str) -> tuple[GroupSnapshot, int] | None:
        found = self.groups.get(group_id)
        return None if found is None else (found[0], found[1])

    def insert_group(self, group: GroupSnapshot, pending: GroupChanged) -> None:
        assert group.group_id not in self.groups
        self.groups[group.group_id] = (group, 1, pending)
        self.last[group.group_id] = pending

    def set_group(self, group: GroupSnapshot, version: int, pending: GroupChanged) -> bool:
        if self.conflicts:
            self.conflicts -= 1
            return False
        current = self.groups.get(group.group_id)
        if current is None or current[1] != version:
            return False
        self.groups[group.group_id] = (group, version + 1, pending)
        self.last[group.group_id] = pending
        return True

    def delete_pending(self, group_id: str, version: int) -> None:
        g, v, _ = self.groups[group_id]
        if v == version:
            self.groups[group_id] = (g, v, None)

    def get_pending(self) -> list[tuple[GroupChanged, int]]:
        return [(p, v) for _, v, p in self.groups.values() if p is not None]

    def get_all_latest(self) -> Iterator[tuple[GroupSnapshot, GroupChanged | None]]:
        for gid in sorted(self.groups):
            yield self.groups[gid][0], self.last.get(gid)

    def get_groups_of(self, user_id: str) -> list[GroupSnapshot]:
        return [g for g, _, _ in self.groups.values() if not g.deleted and user_id in g.member_ids()]

    def get_public_groups(self) -> list[GroupSnapshot]:
        return [g for g, _, _ in self.groups.values() if not g.deleted and g.public]

    def set_users(self, changes: Any) -> None:
        for user_id, _username, active in changes:
            self.users[user_id] = active

    def get_active_users(self, user_ids: list[str]) -> set[str]:
        return {u for u in user_ids if self.users.get(u)}

    def get_seed(self, key: str) -> str | None:
        return self.meta.get(key)

    def set_seed(self, key: str, value: str) -> bool:
        if key in self.meta:
            return False
        self.meta[key] = value
        return True
