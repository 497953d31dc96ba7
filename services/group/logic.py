"""The rules of groups: who may do what, size limits, ownership transfer.

Pure functions on :class:`GroupSnapshot` (no I/O): each returns the new
snapshot and the users the change affects, or raises :class:`ApiError` in the
contract's shape. The service stores the result and publishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

from chatlib.errors import ApiError, ErrorCode, conflict, forbidden, invalid, not_found
from chatlib.schemas import GroupChanged, GroupMember, GroupSnapshot

logger = logging.getLogger(__name__)

OWNER: Literal["owner"] = "owner"
ADMIN: Literal["admin"] = "admin"
MEMBER: Literal["member"] = "member"
MANAGERS = frozenset({OWNER, ADMIN})
#: The owner of seeded channels: not a user, never removed, never unregistered.
SYSTEM_USER = "system"
NAME_MAX = 100
USER_ID_MAX = 128

ChangeKind = Literal["created", "updated", "member_added", "member_removed", "role_changed", "deleted"]


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def validate_name(value: Any) -> str:
    """A group name: at most 100 characters with at least one that is not whitespace; kept trimmed.

    The length counts the name as sent, as the reference's ``maxLength`` does.
    """
    if not isinstance(value, str):
        raise invalid("name must be a string", field="name")
    name = value.strip()
    if not name or len(value) > NAME_MAX:
        raise invalid(f"name must be 1 to {NAME_MAX} characters, not all whitespace", field="name")
    return name


def validate_user_ids(value: Any, field: str = "members", limit: int = 10_000) -> list[str]:
    """A list of user ids, duplicates dropped, order kept."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > limit:
        raise invalid(f"{field} must be a list of at most {limit} user ids", field=field)
    seen: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= USER_ID_MAX:
            raise invalid(f"{field} must contain user id strings", field=field)
        seen[item] = None
    return list(seen)


def validate_role(value: Any) -> Literal["admin", "member"]:
    """The role a member can be given: ``admin`` or ``member`` (ownership is not handed out here)."""
    if value == ADMIN:
        return ADMIN
    if value == MEMBER:
        return MEMBER
    raise invalid("role must be 'admin' or 'member'", field="role")


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def role_of(group: GroupSnapshot, user_id: str) -> str | None:
    for m in group.members:
        if m.user_id == user_id:
            return m.role
    return None


def can_view(group: GroupSnapshot, user_id: str) -> bool:
    """Members see their groups; anyone sees a public group (a channel)."""
    return group.public or role_of(group, user_id) is not None


def check_viewable(group: GroupSnapshot | None, user_id: str) -> GroupSnapshot:
    """The group, or 404 (unknown or deleted) / 403 (private and not a member)."""
    if group is None or group.deleted:
        raise not_found("no such group")
    if not can_view(group, user_id):
        raise forbidden("you are not a member of this group")
    return group


def _require_manager(group: GroupSnapshot, actor: str, what: str) -> None:
    role = role_of(group, actor)
    if role not in MANAGERS:
        raise forbidden(f"only the group's owner or an admin may {what}")


def _check_size(count: int, max_members: int) -> None:
    if count > max_members:
        raise conflict(f"a group has at most {max_members} members", max_members=max_members)


# ---------------------------------------------------------------------------
# Changes
# ---------------------------------------------------------------------------


def new_group(
    group_id: str,
    name: str,
    owner: str,
    members: Iterable[str],
    public: bool,
    now: int,
    max_members: int,
) -> GroupSnapshot:
    """A new group: the creator is its owner, the others plain members."""
    others = [u for u in dict.fromkeys(members) if u != owner]
    _check_size(1 + len(others), max_members)
    return GroupSnapshot(
        group_id=group_id,
        name=name,
        public=public,
        owner=owner,
        members=[GroupMember(user_id=owner, role=OWNER, joined_ts=now)]
        + [GroupMember(user_id=u, role=MEMBER, joined_ts=now) for u in others],
        created_ts=now,
    )


def rename(group: GroupSnapshot, actor: str, name: str) -> GroupSnapshot:
    _require_manager(group, actor, "rename it")
    return group.model_copy(update={"name": name})


def add_members(
    group: GroupSnapshot, actor: str, user_ids: Iterable[str], now: int, max_members: int
) -> tuple[GroupSnapshot, list[str]]:
    """Owner/admin adds users; those already in are ignored. Returns the snapshot and who was added."""
    _require_manager(group, actor, "add members")
    present = group.member_ids()
    added = [u for u in dict.fromkeys(user_ids) if u not in present]
    if not added:
        return group, []
    _check_size(len(group.members) + len(added), max_members)
    members = list(group.members) + [GroupMember(user_id=u, role=MEMBER, joined_ts=now) for u in added]
    return group.model_copy(update={"members": members}), added


def join(group: GroupSnapshot, user_id: str, now: int, max_members: int) -> tuple[GroupSnapshot, bool]:
    """Anyone joins a public group; a private one is 403. Returns whether the user was added."""
    if not group.public:
        raise forbidden("only public groups can be joined; ask an admin to add you")
    if user_id in group.member_ids():
        return group, False
    _check_size(len(group.members) + 1, max_members)
    members = [*group.members, GroupMember(user_id=user_id, role=MEMBER, joined_ts=now)]
    return group.model_copy(update={"members": members}), True


def remove_member(group: GroupSnapshot, actor: str, target: str) -> GroupSnapshot:
    """Owner/admin removes anyone but the owner; any member removes self (leaves).

    The owner can neither be removed nor leave while owning the group: it must
    delete the group instead (ownership only passes on when the owner's
    account is unregistered).
    """
    target_role = role_of(group, target)
    if actor == target:
        if target_role is None:
            raise not_found("you are not a member of this group")
        if target_role == OWNER:
            raise forbidden("the owner cannot leave the group; delete the group instead")
    else:
        _require_manager(group, actor, "remove members")
        if target_role is None:
            raise not_found("that user is not a member of this group")
        if target_role == OWNER:
            raise forbidden("the group's owner cannot be removed")
    members = [m for m in group.members if m.user_id != target]
    return group.model_copy(update={"members": members})


def set_role(
    group: GroupSnapshot, actor: str, target: str, role: Literal["admin", "member"]
) -> tuple[GroupSnapshot, bool]:
    """The owner promotes a member to admin or demotes an admin. Returns whether anything changed."""
    if role_of(group, actor) != OWNER:
        raise forbidden("only the group's owner may change roles")
    current = role_of(group, target)
    if current is None:
        raise not_found("that user is not a member of this group")
    if current == OWNER:
        raise forbidden("the owner's role cannot be changed")
    if current == role:
        return group, False
    members = [m.model_copy(update={"role": role}) if m.user_id == target else m for m in group.members]
    return group.model_copy(update={"members": members}), True


def check_can_delete(group: GroupSnapshot, actor: str, server_admin: bool) -> None:
    """The owner, or a server administrator, deletes a group."""
    if server_admin or group.owner == actor:
        return
    raise forbidden("only the group's owner may delete it")


def mark_deleted(group: GroupSnapshot) -> GroupSnapshot:
    # The members stay in the tombstone so routers know whom to tell.
    return group.model_copy(update={"deleted": True})


def depart(group: GroupSnapshot, user_id: str) -> tuple[GroupSnapshot, ChangeKind, str | None]:
    """A member's account was unregistered: end the membership.

    A group they own passes to the longest-standing admin, else the
    longest-standing member; with nobody left it is deleted. Returns the new
    snapshot, the kind of change and the new owner (if ownership moved).
    """
    rest = [m for m in group.members if m.user_id != user_id]
    if len(rest) == len(group.members):
        return group, "updated", None
    if group.owner != user_id:
        return group.model_copy(update={"members": rest}), "member_removed", None
    if not rest:
        return group.model_copy(update={"members": [], "deleted": True}), "deleted", None
    # Ties on joined_ts keep member-list order (the order they were added).
    admins = [m for m in rest if m.role == ADMIN]
    heir = min(admins or rest, key=lambda m: m.joined_ts)
    members = [m.model_copy(update={"role": OWNER}) if m.user_id == heir.user_id else m for m in rest]
    return group.model_copy(update={"members": members, "owner": heir.user_id}), "member_removed", heir.user_id


def change(group: GroupSnapshot, kind: ChangeKind, users: Iterable[str], actor: str | None, now: int) -> GroupChanged:
    """The event published for a stored change."""
    return GroupChanged(group=group, event=kind, users=list(users), actor=actor, ts=now)


def unknown_members_error(unknown: list[str]) -> ApiError:
    return ApiError(ErrorCode.INVALID_REQUEST, "some members are not registered users", {"unknown_members": unknown})
