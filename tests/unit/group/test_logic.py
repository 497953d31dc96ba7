"""The group rules: permissions by role, size limits, ownership transfer, validation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from chatlib.errors import ApiError
from chatlib.schemas import GroupMember, GroupSnapshot

from services.group import logic


def make_group(public: bool = False, **roles: str) -> GroupSnapshot:
    """owner 'o', admin 'a', members 'm' and 'm2' joined in that order, plus ``roles``."""
    members = [("o", "owner"), ("a", "admin"), ("m", "member"), ("m2", "member"), *roles.items()]
    return GroupSnapshot(
        group_id="g1",
        name="team",
        public=public,
        owner="o",
        members=[GroupMember(user_id=u, role=r, joined_ts=i) for i, (u, r) in enumerate(members)],  # type: ignore[arg-type]
        created_ts=0,
    )


ACTIONS: dict[str, Callable[[GroupSnapshot, str], Any]] = {
    "rename": lambda g, actor: logic.rename(g, actor, "new name"),
    "add": lambda g, actor: logic.add_members(g, actor, ["x"], 1, 1000),
    "remove_member": lambda g, actor: logic.remove_member(g, actor, "m2"),
    "remove_admin": lambda g, actor: logic.remove_member(g, actor, "a"),
    "remove_owner": lambda g, actor: logic.remove_member(g, actor, "o"),
    "promote": lambda g, actor: logic.set_role(g, actor, "m2", "admin"),
    "demote": lambda g, actor: logic.set_role(g, actor, "a", "member"),
    "delete": lambda g, actor: logic.check_can_delete(g, actor, server_admin=False),
}

# actor -> actions allowed ('o' owner, 'a' admin, 'm' member, 'x' outsider)
ALLOWED = {
    "o": {"rename", "add", "remove_member", "remove_admin", "promote", "demote", "delete"},
    "a": {"rename", "add", "remove_member", "remove_admin"},
    "m": set(),
    "x": set(),
}


@pytest.mark.parametrize("actor", ["o", "a", "m", "x"])
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_permission_matrix(actor: str, action: str) -> None:
    group = make_group()
    if actor == "a" and action == "remove_admin":
        # An admin removing itself is a leave, allowed; use a second admin as the target.
        group = make_group(a2="admin")
        logic.remove_member(group, "a", "a2")
        return
    if action in ALLOWED[actor]:
        ACTIONS[action](group, actor)
    else:
        with pytest.raises(ApiError) as err:
            ACTIONS[action](group, actor)
        assert err.value.status == 403


def test_nobody_removes_the_owner_and_the_owner_cannot_leave() -> None:
    group = make_group()
    for actor in ("o", "a"):
        with pytest.raises(ApiError) as err:
            logic.remove_member(group, actor, "o")
        assert err.value.status == 403
    assert "owner" in str(err.value.message)


def test_any_member_leaves() -> None:
    for who in ("a", "m"):
        group = logic.remove_member(make_group(), who, who)
        assert who not in group.member_ids()


def test_removing_a_non_member_is_404() -> None:
    with pytest.raises(ApiError) as err:
        logic.remove_member(make_group(), "o", "nobody")
    assert err.value.status == 404


def test_owner_role_cannot_be_changed_nor_given() -> None:
    with pytest.raises(ApiError) as err:
        logic.set_role(make_group(), "o", "o", "member")
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        logic.validate_role("owner")
    assert err.value.status == 400


def test_promote_then_demote() -> None:
    group, changed = logic.set_role(make_group(), "o", "m", "admin")
    assert changed and logic.role_of(group, "m") == "admin"
    group, changed = logic.set_role(group, "o", "m", "admin")
    assert not changed
    group, changed = logic.set_role(group, "o", "m", "member")
    assert changed and logic.role_of(group, "m") == "member"


def test_server_admin_deletes_any_group() -> None:
    logic.check_can_delete(make_group(), "x", server_admin=True)


def test_view_private_requires_membership_public_does_not() -> None:
    assert logic.check_viewable(make_group(), "m").group_id == "g1"
    with pytest.raises(ApiError) as err:
        logic.check_viewable(make_group(), "x")
    assert err.value.status == 403
    assert logic.check_viewable(make_group(public=True), "x").public
    with pytest.raises(ApiError) as err:
        logic.check_viewable(None, "x")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        logic.check_viewable(logic.mark_deleted(make_group()), "o")
    assert err.value.status == 404


def test_join_public_only_and_idempotent() -> None:
    with pytest.raises(ApiError) as err:
        logic.join(make_group(), "x", 5, 1000)
    assert err.value.status == 403
    group, added = logic.join(make_group(public=True), "x", 5, 1000)
    assert added and logic.role_of(group, "x") == "member"
    again, added = logic.join(group, "x", 6, 1000)
    assert not added and again == group


# -- size -----------------------------------------------------------------


def test_create_counts_the_owner_against_the_limit() -> None:
    group = logic.new_group("g", "n", "o", ["b", "c", "o", "b"], False, 1, max_members=3)
    assert [(m.user_id, m.role) for m in group.members] == [("o", "owner"), ("b", "member"), ("c", "member")]
    with pytest.raises(ApiError) as err:
        logic.new_group("g", "n", "o", ["b", "c", "d"], False, 1, max_members=3)
    assert err.value.status == 409
    assert err.value.details == {"max_members": 3}


def test_add_and_join_respect_the_limit() -> None:
    group = make_group(public=True)  # 4 members
    with pytest.raises(ApiError) as err:
        logic.add_members(group, "o", ["x", "y"], 1, max_members=5)
    assert err.value.status == 409 and err.value.details == {"max_members": 5}
    full, added = logic.add_members(group, "o", ["x", "m"], 1, max_members=5)
    assert added == ["x"] and len(full.members) == 5
    with pytest.raises(ApiError) as err:
        logic.join(full, "y", 1, max_members=5)
    assert err.value.status == 409


def test_adding_existing_members_changes_nothing() -> None:
    group, added = logic.add_members(make_group(), "a", ["m", "o"], 1, 1000)
    assert added == [] and group == make_group()


# -- ownership transfer ------------------------------------------------------


def test_departing_owner_passes_to_longest_standing_admin() -> None:
    group = make_group(a2="admin")
    new, kind, heir = logic.depart(group, "o")
    assert (kind, heir) == ("member_removed", "a")
    assert new.owner == "a" and logic.role_of(new, "a") == "owner"
    assert "o" not in new.member_ids() and logic.role_of(new, "a2") == "admin"


def test_departing_owner_without_admins_passes_to_longest_standing_member() -> None:
    group = GroupSnapshot(
        group_id="g",
        name="n",
        owner="o",
        created_ts=0,
        members=[
            GroupMember(user_id="o", role="owner", joined_ts=1),
            GroupMember(user_id="late", role="member", joined_ts=9),
            GroupMember(user_id="early", role="member", joined_ts=3),
        ],
    )
    new, _, heir = logic.depart(group, "o")
    assert heir == "early" and new.owner == "early"
    assert [m.user_id for m in new.members] == ["late", "early"]


def test_departing_last_member_deletes_the_group() -> None:
    alone = logic.new_group("g", "n", "o", [], False, 1, 10)
    new, kind, heir = logic.depart(alone, "o")
    assert kind == "deleted" and new.deleted and heir is None


def test_departing_member_is_removed_and_stranger_changes_nothing() -> None:
    new, kind, heir = logic.depart(make_group(), "m")
    assert kind == "member_removed" and heir is None and new.owner == "o" and "m" not in new.member_ids()
    same, kind, _ = logic.depart(make_group(), "x")
    assert kind == "updated" and same == make_group()


# -- validation ----------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "   ", "\t", "\u2003\n", "x" * 101, " " + "x" * 100, None, 5])
def test_bad_names(bad: Any) -> None:
    with pytest.raises(ApiError) as err:
        logic.validate_name(bad)
    assert err.value.status == 400


def test_good_names_are_trimmed() -> None:
    assert logic.validate_name("  team  ") == "team"
    assert logic.validate_name("x" * 100) == "x" * 100


@pytest.mark.parametrize("bad", ["u1", [1], [""], ["x" * 129], {"a": 1}])
def test_bad_member_lists(bad: Any) -> None:
    with pytest.raises(ApiError) as err:
        logic.validate_user_ids(bad)
    assert err.value.status == 400


def test_member_list_drops_duplicates() -> None:
    assert logic.validate_user_ids(["b", "a", "b"]) == ["b", "a"]
    assert logic.validate_user_ids(None) == []
