"""Fixtures and event builders for the persistence unit tests."""

from __future__ import annotations

import pytest
from chatlib.schemas import (
    DeviceConnected,
    GroupChanged,
    GroupMember,
    GroupSnapshot,
    InboundMessage,
    InboundReceipt,
    ReplayRequest,
    UserRegistered,
    dm_conversation,
    group_conversation,
)

from services.persistence.service import Persistence, PersistenceConfig
from tests.unit.persistence.fakes import FakePublisher, FakeStore, FakeView

USERS = ("alice", "bob", "carol", "dave")


def make_service(**config: object) -> Persistence:
    view = FakeView()
    cfg = PersistenceConfig(**{"catchup_wait_ms": 0, **config})  # type: ignore[arg-type]
    svc = Persistence(cfg, store=FakeStore(), publisher=FakePublisher(), groups=view)
    view.on_update = svc.on_groups_update
    svc.on_user_events([UserRegistered(user_id=u, username=u, name=u.title()) for u in USERS])
    return svc


@pytest.fixture
def svc() -> Persistence:
    return make_service()


def dm(
    sender: str = "alice",
    to: str = "bob",
    cid: str = "c1",
    device: str | None = None,
    gateway: str = "gw1",
    body: str = "hi",
) -> InboundMessage:
    return InboundMessage(
        id=cid,
        conversation=dm_conversation(sender, to) if sender != to else f"dm:{sender}:{to}",
        sender=sender,
        sender_device=device or f"{sender}-phone",
        gateway=gateway,
        to=to,
        body=body,
        received_ts=1,
    )


def gmsg(
    sender: str, group: str = "g1", cid: str = "c1", device: str | None = None, gateway: str = "gw1"
) -> InboundMessage:
    return InboundMessage(
        id=cid,
        conversation=group_conversation(group),
        sender=sender,
        sender_device=device or f"{sender}-phone",
        gateway=gateway,
        group=group,
        body="to the group",
        received_ts=1,
    )


def receipt(user: str, conv: str, status: str, up_to: int, device: str | None = None) -> InboundReceipt:
    return InboundReceipt(
        conversation=conv,
        user_id=user,
        device_id=device or f"{user}-phone",
        gateway="gw2",
        status=status,
        up_to_seq=up_to,  # type: ignore[arg-type]
    )


def connected(user: str, device: str | None = None, conn: str = "conn-1", gateway: str = "gw2") -> DeviceConnected:
    return DeviceConnected(user_id=user, device_id=device or f"{user}-phone", gateway=gateway, conn_id=conn, ts=1)


def replay_request(user: str, conv: str, after: int, up_to: int, device: str | None = None) -> ReplayRequest:
    return ReplayRequest(
        conversation=conv,
        user_id=user,
        device_id=device or f"{user}-phone",
        gateway="gw2",
        conn_id="conn-9",
        after_seq=after,
        up_to_seq=up_to,
    )


def group_change(
    members: list[str], event: str = "updated", ts: int = 100, group: str = "g1", deleted: bool = False
) -> GroupChanged:
    snap = GroupSnapshot(
        group_id=group,
        name="G",
        owner=members[0] if members else "alice",
        members=[
            GroupMember(user_id=u, role="owner" if i == 0 else "member", joined_ts=ts) for i, u in enumerate(members)
        ],
        created_ts=1,
        deleted=deleted,
    )
    return GroupChanged(group=snap, event=event, ts=ts)  # type: ignore[arg-type]


def set_group(svc: Persistence, members: list[str], ts: int = 100, group: str = "g1", deleted: bool = False) -> None:
    """The group as both the live view and the member-range stream see it."""
    change = group_change(members, ts=ts, group=group, deleted=deleted)
    svc.groups.put(change)  # type: ignore[attr-defined]
    svc.on_group_changes([change])
