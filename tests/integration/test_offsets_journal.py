"""Receipt offsets through the journal, against the real database: readable at once, folded
into ``offsets`` one upsert per (user, conversation), recovered after a crash, never lowered."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from helper.stack import Stack
from services.persistence.logic import Offsets
from services.persistence.storage import OFFSET_JOURNAL, OFFSETS, PersistenceStore

G = "group:g1"


@pytest.fixture
def db(stack: Stack) -> Iterator[Database]:  # type: ignore[type-arg]
    client: MongoClient = MongoClient(stack.mongo_url)  # type: ignore[type-arg]
    name = f"offsets_{uuid.uuid4().hex[:8]}"
    try:
        yield client[name]
    finally:
        client.drop_database(name)
        client.close()


def test_a_poll_of_receipts_is_one_journal_document_readable_at_once_and_folded_later(db: Database) -> None:  # type: ignore[type-arg]
    store = PersistenceStore(db)
    members = [f"u{i}" for i in range(300)]
    store.set_offsets(
        {(u, "phone", G): Offsets(delivered=7) for u in members}, {(u, G): Offsets(delivered=7) for u in members}
    )
    assert db[OFFSET_JOURNAL].count_documents({}) == 1
    assert db[OFFSETS].count_documents({}) == 0  # not folded yet...
    assert store.get_device_offsets("u5", "phone") == {G: Offsets(delivered=7)}  # ...but read at once
    assert store.get_user_offsets("u5") == {G: Offsets(delivered=7)}
    assert store.get_device_offsets_many([("u1", "phone", G), ("u2", "tablet", G)]) == {
        ("u1", "phone", G): Offsets(delivered=7)
    }
    assert store.get_user_offsets_many([("u1", G)]) == {("u1", G): Offsets(delivered=7)}

    # Later receipts of the same members: one journal document each, one upsert each at the fold.
    store.set_offsets({("u5", "phone", G): Offsets(delivered=9, read=8)}, {("u5", G): Offsets(delivered=9, read=8)})
    assert store.fold_offsets() == 300  # one upsert per (user, conversation), not per receipt
    assert db[OFFSET_JOURNAL].count_documents({}) == 0
    doc = db[OFFSETS].find_one({"user_id": "u5"})
    assert doc is not None and (doc["delivered_seq"], doc["read_seq"]) == (9, 8)
    assert doc["devices"]["phone"] == {"delivered_seq": 9, "read_seq": 8}
    assert PersistenceStore(db).get_device_offsets("u5", "phone") == {G: Offsets(delivered=9, read=8)}
    assert store.fold_offsets() == 0  # nothing new


def test_what_a_crashed_process_journaled_is_folded_by_the_next(db: Database) -> None:  # type: ignore[type-arg]
    dead = PersistenceStore(db)
    dead.set_offsets(
        {("alice", "phone", G): Offsets(delivered=4, read=2)}, {("alice", G): Offsets(delivered=4, read=2)}
    )
    # The process dies here, before any fold: a successor does not see it in memory...
    successor = PersistenceStore(db)
    assert successor.get_user_offsets("alice") == {}
    # ...but folds the journal at start (migrate) or when partitions move to it.
    assert successor.recover_offsets() == 1
    assert successor.get_user_offsets("alice") == {G: Offsets(delivered=4, read=2)}
    assert successor.get_device_offsets("alice", "phone") == {G: Offsets(delivered=4, read=2)}
    assert db[OFFSET_JOURNAL].count_documents({}) == 0
    # The dead process's own fold, had it come late, changes nothing.
    assert dead.fold_offsets() == 1
    assert successor.get_user_offsets("alice") == {G: Offsets(delivered=4, read=2)}


def test_offsets_never_go_back_and_a_removed_device_stays_removed(db: Database) -> None:  # type: ignore[type-arg]
    store = PersistenceStore(db)
    store.set_offsets(
        {("bob", "phone", G): Offsets(delivered=10, read=10)}, {("bob", G): Offsets(delivered=10, read=10)}
    )
    store.fold_offsets()
    store.set_offsets({("bob", "phone", G): Offsets(delivered=3, read=1)}, {("bob", G): Offsets(delivered=3, read=1)})
    assert store.get_user_offsets("bob") == {G: Offsets(delivered=10, read=10)}  # a late receipt, unfolded
    store.fold_offsets()
    assert store.get_user_offsets("bob") == {G: Offsets(delivered=10, read=10)}  # and folded

    store.set_offsets({("bob", "phone", G): Offsets(delivered=12)}, {("bob", G): Offsets(delivered=12, read=10)})
    store.delete_device_offsets("bob", "phone")  # folds what is journaled first
    assert store.get_device_offsets("bob", "phone") == {G: Offsets()}
    assert PersistenceStore(db).recover_offsets() == 0  # nothing left to bring the device back
    assert store.get_user_offsets("bob") == {G: Offsets(delivered=12, read=10)}  # their own state stays


def test_a_storm_of_connects_reads_many_users_at_once_as_it_reads_each(db: Database) -> None:  # type: ignore[type-arg]
    """The batched reads of connect replays (many users per ``$in`` query, chunked): every user's
    own conversations, ranges and device offsets, folded and journaled offsets included."""
    from chatlib.schemas import StoredMessage, dm_conversation

    from services.persistence.logic import MemberRange

    store = PersistenceStore(db)
    users = [f"u{i:03d}" for i in range(250)]  # more than one $in chunk
    messages = [
        StoredMessage(
            message_id=uuid.uuid4().hex, id=f"m{i}", conversation=dm_conversation(u, users[(i + 1) % 250]), seq=1,
            sender=u, from_device="phone", to=users[(i + 1) % 250], body="hi", ts=i,
        )
        for i, u in enumerate(users)
    ]  # fmt: skip
    store.insert_new(messages)
    store.save_conversations(messages)
    store.save_ranges([MemberRange(f"r{i}", G, u, from_seq=1, opened_ts=1) for i, u in enumerate(users[:120])], [])
    store.set_offsets({(u, "phone", m.conversation): Offsets(delivered=1) for u, m in zip(users, messages)}, {})
    store.fold_offsets()
    store.set_offsets({(u, "tablet", G): Offsets(delivered=3) for u in users[:10]}, {})  # journaled, not folded
    devices = [(u, d) for u in users for d in ("phone", "tablet")]
    many = store.get_offsets_of_devices(devices)
    # Each user has an offsets document for the dm they started (the phone's receipt, folded);
    # the first ten also the tablet's journaled offset in G.
    expected: dict[tuple[str, str], dict[str, Offsets]] = {}
    for i, (u, m) in enumerate(zip(users, messages)):
        expected[(u, "phone")] = {m.conversation: Offsets(delivered=1)}
        expected[(u, "tablet")] = {m.conversation: Offsets(), **({G: Offsets(delivered=3)} if i < 10 else {})}
    assert many == expected
    assert store.get_device_offsets("u001", "tablet") == expected[("u001", "tablet")]  # the one-device read
    dms = store.get_dm_conversations_of(users)
    # The dm each user started and the one started with them, once each (a dm whose two members
    # fall into two chunks of the $in comes back twice from the database).
    assert {u: sorted(d["conversation"] for d in v) for u, v in dms.items()} == {
        u: sorted({messages[i].conversation, messages[i - 1].conversation}) for i, u in enumerate(users)
    }
    assert all({d["peer"] for d in v} == {users[i - 1], users[(i + 1) % 250]} for i, v in enumerate(dms.values()))
    ranges = store.get_ranges_of_user_ids(users)
    assert {u: [r.range_id for r in v] for u, v in ranges.items()} == {
        u: [r.range_id for r in store.get_ranges_of_user(u)] for u in users
    }
    assert sum(len(v) for v in ranges.values()) == 120
