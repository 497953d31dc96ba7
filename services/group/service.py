"""The group service: groups and channels, their members and roles.

Every change is stored in MongoDB first, then published as GroupChanged on
the compacted GROUP_CHANGES topic keyed by group_id (persistence and
group-router keep a live view of it). Changes to one group are serialised
in this process (one lock per group stripe) and checked against the stored
version, so the topic's latest record is always the latest stored state.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from chatlib.errors import ApiError, ErrorCode
from chatlib.republish import OwnedTopic
from chatlib.schemas import (
    ChannelCreated,
    ChannelDeleted,
    Event,
    GroupChanged,
    GroupSnapshot,
    UserRegistered,
    UserUnregistered,
    UserUpdated,
    now_ms,
)
from chatlib.service import Producer, Service, ServiceConfig, Storage, consume
from chatlib.topics import CHANNEL_EVENTS, GROUP_CHANGES, USER_EVENTS
from flask import Flask
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from . import logic
from .storage import GroupStore

logger = logging.getLogger(__name__)

SEED_DEFAULT_CHANNEL = "default_channel"
_LOCK_STRIPES = 64
_MAX_RETRIES = 5

#: Takes the current snapshot; returns the new one, the kind of change and the affected users,
#: or None when nothing changes.
Mutation = Callable[[GroupSnapshot], "tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None"]


class GroupConfig(ServiceConfig):
    """Settings of the group service (``GROUP_*``)."""

    model_config = SettingsConfigDict(env_prefix="GROUP_", extra="ignore")
    port: int = 8102
    # Members a group may have, the owner included.
    max_members: int = Field(1000, ge=2)
    # Name of the public channel every user can join, created at first start.
    default_channel: str = Field("general", min_length=1, max_length=logic.NAME_MAX)
    # How long a request waits for a just-registered user to reach this service's user projection.
    user_wait_s: float = Field(2.0, ge=0)


class GroupService(Service):
    """Groups and channels (contract section "Groups")."""

    name = "group"
    config_class = GroupConfig
    config: GroupConfig

    store = Storage(GroupStore)
    producer = Producer()
    owned = OwnedTopic(GROUP_CHANGES)

    def __init__(self, config: GroupConfig, **overrides: Any):
        super().__init__(config, **overrides)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    # -- lifecycle --------------------------------------------------------

    def on_setup(self) -> None:
        """Put every group back on the topic if the broker lost it, publish changes a crash
        left unpublished, then make sure the default channel exists.

        This runs before the worker serves and before any consumer starts, so
        nothing newer can be overtaken by a republished record.
        """
        self.owned.restore_if_lost(self.republish_all)
        self.republish_pending()
        self.seed_default_channel()

    def on_broker_lost(self) -> None:
        """The broker came back empty while serving: put every record of the topic back."""
        self.owned.republish(self.republish_all)
        self.republish_pending()

    def routes(self, app: Flask) -> None:
        from .http import blueprint

        app.register_blueprint(blueprint(self))

    def republish_all(self) -> int:
        """Publish every group's latest change again (the record the compacted topic held).

        Each group is read and published under its lock, so a change made
        meanwhile (when called while serving) is never overtaken. A group
        stored before the latest change was kept gets a snapshot as an
        ``updated`` change. Returns the number of groups published.
        """
        count = 0
        for group, last in self.store.get_all_latest():
            with self._lock(group.group_id):
                found = self.store.get_group(group.group_id)
                if found is None:
                    continue
                current = found[0]
                if last is None or last.group != current:
                    kind: logic.ChangeKind = "deleted" if current.deleted else "updated"
                    last = logic.change(current, kind, [], None, now_ms())
                self.producer.send(GROUP_CHANGES, last, key=current.group_id)
                count += 1
        self.producer.flush()
        return count

    def republish_pending(self) -> None:
        for ch, version in self.store.get_pending():
            logger.info("republishing %s of group %s", ch.event, ch.group.group_id)
            self._publish(ch, version)

    def seed_default_channel(self) -> None:
        """The system-owned public channel, created once (idempotent across restarts)."""
        gid = self.store.get_seed(SEED_DEFAULT_CHANNEL)
        if gid is None:
            gid = uuid.uuid4().hex
            if not self.store.set_seed(SEED_DEFAULT_CHANNEL, gid):
                gid = self.store.get_seed(SEED_DEFAULT_CHANNEL)
        # The marker is written before the group, so a crash in between is repaired here.
        if gid is None or self.store.get_group(gid) is not None:
            return
        now = now_ms()
        group = logic.new_group(
            gid, self.config.default_channel, logic.SYSTEM_USER, [], True, now, self.config.max_members
        )
        ch = logic.change(group, "created", [], logic.SYSTEM_USER, now)
        self.store.insert_group(group, ch)
        self._publish(ch, 1)
        logger.info("default channel %s created as %s", self.config.default_channel, gid)

    # -- reading ----------------------------------------------------------

    def get_group(self, group_id: str, user_id: str) -> GroupSnapshot:
        found = self.store.get_group(group_id)
        return logic.check_viewable(found[0] if found else None, user_id)

    def get_groups_of(self, user_id: str) -> list[GroupSnapshot]:
        return self.store.get_groups_of(user_id)

    def get_public_groups(self) -> list[GroupSnapshot]:
        return self.store.get_public_groups()

    def check_users_exist(self, user_ids: list[str]) -> None:
        """400 naming the ids that are not registered users.

        The user projection follows USER_EVENTS a few milliseconds behind the
        profile service, so an id missing at first is looked up again for up
        to ``user_wait_s`` before it is called unknown.
        """
        active = self.store.get_active_users(user_ids)  # one query, not one per id
        missing = [u for u in user_ids if u not in active]
        deadline = time.monotonic() + self.config.user_wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(0.05)
            active = self.store.get_active_users(missing)
            missing = [u for u in missing if u not in active]
        if missing:
            raise logic.unknown_members_error(missing)

    # -- changes ----------------------------------------------------------

    def create_group(self, owner: str, name: str, members: list[str], public: bool) -> GroupSnapshot:
        others = [u for u in members if u != owner]
        # The size check comes before the lookup, so an oversized request does no work.
        now = now_ms()
        group = logic.new_group(uuid.uuid4().hex, name, owner, others, public, now, self.config.max_members)
        self.check_users_exist(others)
        ch = logic.change(group, "created", group.member_ids(), owner, now)
        self.store.insert_group(group, ch)
        self._publish(ch, 1)
        return group

    def rename_group(self, group_id: str, actor: str, name: str) -> GroupSnapshot:
        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            new = logic.rename(g, actor, name)
            return None if new.name == g.name else (new, "updated", [])

        return self.apply(group_id, actor, mutate)

    def add_members(self, group_id: str, actor: str, user_ids: list[str]) -> GroupSnapshot:
        current = self._load_visible(group_id, actor)
        # Permission and size are checked before looking users up, and again under the lock.
        logic.add_members(current, actor, user_ids, now_ms(), self.config.max_members)
        self.check_users_exist([u for u in user_ids if u not in current.member_ids()])

        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            new, added = logic.add_members(g, actor, user_ids, now_ms(), self.config.max_members)
            return (new, "member_added", added) if added else None

        return self.apply(group_id, actor, mutate)

    def join_group(self, group_id: str, user_id: str) -> GroupSnapshot:
        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            new, added = logic.join(g, user_id, now_ms(), self.config.max_members)
            return (new, "member_added", [user_id]) if added else None

        return self.apply(group_id, user_id, mutate)

    def remove_member(self, group_id: str, actor: str, target: str) -> GroupSnapshot:
        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            return logic.remove_member(g, actor, target), "member_removed", [target]

        return self.apply(group_id, actor, mutate)

    def set_role(self, group_id: str, actor: str, target: str, role: str) -> GroupSnapshot:
        wanted = logic.validate_role(role)

        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            new, changed = logic.set_role(g, actor, target, wanted)
            return (new, "role_changed", [target]) if changed else None

        return self.apply(group_id, actor, mutate)

    def delete_group(self, group_id: str, actor: str, server_admin: bool) -> GroupSnapshot:
        def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
            logic.check_can_delete(g, actor, server_admin)
            return logic.mark_deleted(g), "deleted", sorted(g.member_ids() - {logic.SYSTEM_USER})

        return self.apply(group_id, actor, mutate, allow_private=server_admin)

    def apply(self, group_id: str, actor: str, mutate: Mutation, allow_private: bool = False) -> GroupSnapshot:
        """Load, change, store (if still at the loaded version), publish; retried on a concurrent change.

        A caller who may not see the group gets 403 (404 if it does not exist)
        before ``mutate`` runs, so a non-member learns nothing more.
        """
        with self._lock(group_id):
            for _ in range(_MAX_RETRIES):
                found = self.store.get_group(group_id)
                if found is None or found[0].deleted:
                    raise ApiError(ErrorCode.NOT_FOUND, "no such group")
                group, version = found
                if not allow_private:
                    logic.check_viewable(group, actor)
                result = mutate(group)
                if result is None:
                    return group
                new, kind, users = result
                ch = logic.change(new, kind, users, actor, now_ms())
                if self.store.set_group(new, version, ch):
                    self._publish(ch, version + 1)
                    return new
                logger.info("group %s changed concurrently; retrying", group_id)
        raise ApiError(ErrorCode.CONFLICT, "the group is being changed by someone else; try again")

    # -- Kafka ------------------------------------------------------------

    @consume(USER_EVENTS, group="group-users", batch=True)
    def on_user_events(self, events: list[Event]) -> None:
        """Keep the users projection (who may be added to a group) and end the memberships of unregistered users."""
        changes: list[tuple[str, str | None, bool]] = []
        departed: list[str] = []
        for ev in events:
            if isinstance(ev, UserRegistered | UserUpdated):
                changes.append((ev.user_id, ev.username, True))
            elif isinstance(ev, UserUnregistered):
                changes.append((ev.user_id, None, False))
                departed.append(ev.user_id)
        self.store.set_users(changes)
        for user_id in departed:
            self.on_user_unregistered(user_id)

    def on_user_unregistered(self, user_id: str) -> None:
        """End every membership of an unregistered user; owned groups pass on or are deleted.

        Idempotent: on a redelivered event the user is in no group any more.
        """
        for group in self.store.get_groups_of(user_id):

            def mutate(g: GroupSnapshot) -> tuple[GroupSnapshot, logic.ChangeKind, list[str]] | None:
                new, kind, heir = logic.depart(g, user_id)
                if kind == "updated":
                    return None
                if kind == "deleted":
                    return new, kind, [user_id]
                return new, kind, [user_id] + ([heir] if heir else [])

            try:
                self.apply(group.group_id, user_id, mutate, allow_private=True)
            except ApiError as err:
                # Deleted meanwhile: nothing left to end.
                if err.code is not ErrorCode.NOT_FOUND:
                    raise

    def _publish(self, ch: GroupChanged, version: int) -> None:
        """Publish a stored change (and the channel event of a public group), then clear the outbox."""
        gid = ch.group.group_id
        self.producer.publish(GROUP_CHANGES, ch, key=gid)
        if ch.group.public and ch.event == "created":
            self.producer.publish(
                CHANNEL_EVENTS,
                ChannelCreated(group_id=gid, name=ch.group.name, owner=ch.group.owner, ts=ch.ts),
                key=gid,
            )
        elif ch.group.public and ch.event == "deleted":
            self.producer.publish(CHANNEL_EVENTS, ChannelDeleted(group_id=gid, actor=ch.actor, ts=ch.ts), key=gid)
        self.store.delete_pending(gid, version)

    def _load_visible(self, group_id: str, actor: str) -> GroupSnapshot:
        found = self.store.get_group(group_id)
        if found is None or found[0].deleted:
            raise ApiError(ErrorCode.NOT_FOUND, "no such group")
        return logic.check_viewable(found[0], actor)

    def _lock(self, group_id: str) -> threading.Lock:
        return self._locks[hash(group_id) % _LOCK_STRIPES]
