"""chatlib.mongo helpers that do not need a server."""

from __future__ import annotations

from typing import Any

from chatlib.mongo import IN_CHUNK, chunked, find_in


class RecordingCollection:
    """Answers ``find`` from a list of documents and records every query."""

    def __init__(self, docs: list[dict[str, Any]]):
        self.docs = docs
        self.queries: list[tuple[dict[str, Any], Any]] = []

    def find(self, query: dict[str, Any], projection: Any = None) -> list[dict[str, Any]]:
        self.queries.append((query, projection))
        wanted = set(query["_id"]["$in"])
        rest = {k: v for k, v in query.items() if k != "_id"}
        return [d for d in self.docs if d["_id"] in wanted and all(d.get(k) == v for k, v in rest.items())]


def test_chunked_keeps_order_and_every_value() -> None:
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []


def test_find_in_splits_a_long_in_list_and_keeps_the_rest_of_the_query() -> None:
    docs = [{"_id": f"u{i}", "active": i % 2 == 0} for i in range(250)]
    coll = RecordingCollection(docs)
    found = list(find_in(coll, "_id", [d["_id"] for d in docs], {"active": True}, {"_id": 1}))  # type: ignore[arg-type]
    assert sorted(d["_id"] for d in found) == sorted(d["_id"] for d in docs if d["active"])
    assert [len(q["_id"]["$in"]) for q, _ in coll.queries] == [IN_CHUNK, IN_CHUNK, 250 - 2 * IN_CHUNK]
    assert all(q["active"] is True and p == {"_id": 1} for q, p in coll.queries)


def test_find_in_of_nothing_sends_nothing() -> None:
    coll = RecordingCollection([])
    assert list(find_in(coll, "_id", [])) == []  # type: ignore[arg-type]
    assert coll.queries == []


def test_journaled_adds_the_journal_and_keeps_the_urls_write_concern() -> None:
    from chatlib.mongo import journaled
    from pymongo import MongoClient

    replica = MongoClient("mongodb://127.0.0.1:1/?w=majority&wtimeoutMS=5000", connect=False)
    assert journaled(replica.chat.messages).write_concern.document == {"w": "majority", "wtimeout": 5000, "j": True}
    embedded = MongoClient("mongodb://127.0.0.1:1/?retryWrites=false", connect=False)
    assert journaled(embedded.chat.messages).write_concern.document == {"j": True}
