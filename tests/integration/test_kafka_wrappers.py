"""The library's Kafka wrappers against the real (Tansu) broker.

Commit-after-success, no commit while a handler fails, dead-lettering of a
poison record, and the compacted live view.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from chatlib.config import SharedConfig
from chatlib.kafka import CompactedView, ConsumerWorker, Publisher, ensure_topics
from chatlib.schemas import DeadLetter, Envelope, UserRegistered, UserSessions
from chatlib.topics import DEAD_LETTERS, Topic
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2
from pymongo.errors import AutoReconnect

from helper.stack import Stack


@pytest.fixture
def config(stack: Stack) -> SharedConfig:
    return SharedConfig(
        kafka_bootstrap_servers=stack.kafka, mongo_url=stack.mongo_url, kafka_wakeup_dir=str(stack.wakeup_dir)
    )


@pytest.fixture
def topic(stack: Stack) -> Topic:
    t = Topic(f"test.{uuid.uuid4().hex[:10]}.v1", partitions=1)
    ensure_topics(stack.kafka, [t])
    return t


def wait_for(cond: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def committed(config: SharedConfig, group: str, topic: str, partition: int = 0) -> int | None:
    probe = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        return probe.committed(TopicPartition(topic, partition))
    finally:
        probe.close()


def event(i: int) -> UserRegistered:
    return UserRegistered(user_id=f"u{i}", username=f"name{i}", name=f"N{i}")


def test_consumed_then_committed_after_handler(config: SharedConfig, topic: Topic) -> None:
    pub = Publisher(config, "test")
    seen: list[str] = []
    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = ConsumerWorker(config, "t", [topic.name], group, handler=lambda ev: seen.append(ev.user_id))
    worker.start()
    try:
        for i in range(5):
            pub.send(topic, event(i), key=f"u{i}")
        pub.flush()
        wait_for(lambda: len(seen) == 5)
        assert seen == [f"u{i}" for i in range(5)]
        wait_for(lambda: committed(config, group, topic.name) == 5)
    finally:
        worker.stop()
        pub.close()


def test_batch_handler_gets_a_poll_across_partitions_in_key_order_and_commits_each(
    config: SharedConfig, stack: Stack
) -> None:
    topic = Topic(f"test.{uuid.uuid4().hex[:10]}.v1", partitions=4)
    ensure_topics(stack.kafka, [topic])
    pub = Publisher(config, "test")
    keys = [f"k{j}" for j in range(8)]
    partition_of = {k: (murmur2(k.encode()) & 0x7FFFFFFF) % 4 for k in keys}  # the producer's default
    assert len(set(partition_of.values())) > 1
    for i in range(10):
        for k in keys:
            pub.send(topic, UserRegistered(user_id=k, username=f"{k}-{i}", name=""), key=k)
    pub.flush()
    batches: list[list[tuple[str, str]]] = []
    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = ConsumerWorker(
        config,
        "t",
        [topic.name],
        group,
        batch_handler=lambda evs: batches.append([(e.user_id, e.username) for e in evs]),
    )
    worker.start()
    try:
        wait_for(lambda: sum(map(len, batches)) == 80)
        # Everything was there before the first poll: one call spans the partitions.
        assert any(len({partition_of[k] for k, _ in b}) > 1 for b in batches)
        seen = [pair for b in batches for pair in b]
        for k in keys:  # order per key holds
            assert [n for key, n in seen if key == k] == [f"{k}-{i}" for i in range(10)]
        for p in set(partition_of.values()):
            count = sum(1 for k in keys if partition_of[k] == p) * 10
            wait_for(lambda p=p, count=count: committed(config, group, topic.name, p) == count)
    finally:
        worker.stop()
        pub.close()


def test_failing_handler_does_not_commit_and_is_retried(config: SharedConfig, topic: Topic) -> None:
    pub = Publisher(config, "test")
    group = f"g-{uuid.uuid4().hex[:8]}"
    calls: list[str] = []
    healthy = threading.Event()

    def handler(ev: UserRegistered) -> None:  # type: ignore[override]
        calls.append(ev.user_id)
        if not healthy.is_set():
            raise AutoReconnect("database away")

    worker = ConsumerWorker(config, "t", [topic.name], group, handler=handler)  # type: ignore[arg-type]
    worker.start()
    try:
        pub.publish(topic, event(1), key="u1")
        wait_for(lambda: len(calls) >= 3)
        # Still failing: nothing committed, the same record is retried.
        assert committed(config, group, topic.name) is None
        assert set(calls) == {"u1"}
        healthy.set()
        wait_for(lambda: committed(config, group, topic.name) == 1)
    finally:
        worker.stop()
        pub.close()


def test_uncommitted_record_is_redelivered_to_the_next_consumer(config: SharedConfig, topic: Topic) -> None:
    pub = Publisher(config, "test")
    group = f"g-{uuid.uuid4().hex[:8]}"
    first: list[str] = []
    block = threading.Event()

    def stuck(ev: UserRegistered) -> None:  # type: ignore[override]
        first.append(ev.user_id)
        raise AutoReconnect("never succeeds before the crash")

    w1 = ConsumerWorker(config, "t1", [topic.name], group, handler=stuck)  # type: ignore[arg-type]
    w1.start()
    pub.publish(topic, event(7), key="u7")
    wait_for(lambda: len(first) >= 1)
    w1.stop()
    assert committed(config, group, topic.name) is None
    second: list[str] = []
    w2 = ConsumerWorker(config, "t2", [topic.name], group, handler=lambda ev: second.append(ev.user_id))
    w2.start()
    try:
        wait_for(lambda: second == ["u7"], timeout=30)
        wait_for(lambda: committed(config, group, topic.name) == 1)
    finally:
        block.set()
        w2.stop()
        pub.close()


def test_poison_record_is_dead_lettered_and_partition_moves_on(config: SharedConfig, topic: Topic) -> None:
    pub = Publisher(config, "test")
    dlq = Publisher(config, "test-dlq")
    group = f"g-{uuid.uuid4().hex[:8]}"
    seen: list[str] = []

    def handler(ev: UserRegistered) -> None:  # type: ignore[override]
        if ev.user_id == "bad":
            raise ValueError("cannot handle this one")
        seen.append(ev.user_id)

    dead: list[DeadLetter] = []
    reader = ConsumerWorker(
        config,
        "dlq-reader",
        [DEAD_LETTERS.name],
        None,
        handler=lambda ev: dead.append(ev) if isinstance(ev, DeadLetter) and ev.topic == topic.name else None,
        from_beginning=True,
    )
    reader.start()
    worker = ConsumerWorker(config, "t", [topic.name], group, handler=handler, dead_letters=dlq)  # type: ignore[arg-type]
    worker.start()
    try:
        pub.send(topic, UserRegistered(user_id="bad", username="b", name="b"), key="x")
        pub.producer.send(topic.name, value=b"{not json", key=b"x")
        pub.send(topic, event(2), key="x")
        pub.flush()
        wait_for(lambda: seen == ["u2"])
        wait_for(lambda: len(dead) == 2)
        assert {d.offset for d in dead} == {0, 1}
        assert "cannot handle" in dead[0].error or "cannot handle" in dead[1].error
        wait_for(lambda: committed(config, group, topic.name) == 3)
    finally:
        worker.stop()
        reader.stop()
        pub.close()
        dlq.close()


def test_compacted_view_reads_history_then_follows(config: SharedConfig, stack: Stack) -> None:
    topic = Topic(f"test.view.{uuid.uuid4().hex[:8]}.v1", partitions=2, compacted=True)
    ensure_topics(stack.kafka, [topic])
    pub = Publisher(config, "test")
    for i in range(3):
        pub.send(topic, UserSessions(user_id=f"u{i}", devices=[], online=False, last_seen=i), key=f"u{i}")
    pub.send(topic, UserSessions(user_id="u1", devices=[], online=True, last_seen=99), key="u1")
    pub.flush()
    updates: list[tuple[str, int, int | None]] = []

    def on_update(ev: Any, previous: Any) -> None:
        updates.append((ev.user_id, ev.last_seen, previous.last_seen if previous is not None else None))

    view = CompactedView(config, "v", topic, key_of=lambda ev: ev.user_id, on_update=on_update)  # type: ignore[attr-defined]
    view.start()
    try:
        assert view.ready.wait(20)
        assert set(view.data) == {"u0", "u1", "u2"}
        assert view.data["u1"].online is True  # type: ignore[attr-defined]
        pub.publish(topic, UserSessions(user_id="u3", devices=[], online=True, last_seen=1), key="u3")
        wait_for(lambda: "u3" in view.data)
        pub.publish(topic, UserSessions(user_id="u3", devices=[], online=False, last_seen=7), key="u3")
        wait_for(lambda: view.data["u3"].last_seen == 7)  # type: ignore[attr-defined]
        # The hook gets each change with what the key held before it (None for a new key).
        assert ("u0", 0, None) in updates
        assert updates[-2:] == [("u3", 1, None), ("u3", 7, 1)]
    finally:
        view.stop()
        pub.close()


def test_envelope_on_the_wire(config: SharedConfig, topic: Topic) -> None:
    pub = Publisher(config, "wire-test")
    pub.publish(topic, event(9), key="u9")
    pub.close()
    c = KafkaConsumer(bootstrap_servers=config.kafka_bootstrap_servers, enable_auto_commit=False)
    tp = TopicPartition(topic.name, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    try:
        records = c.poll(timeout_ms=5000).get(tp, [])
        assert records, "record not found"
        env = Envelope.from_bytes(records[0].value)
        assert records[0].key == b"u9"
        assert env.type == "user.registered" and env.producer == "wire-test"
        assert env.payload == {"user_id": "u9", "username": "name9", "name": "N9"}
    finally:
        c.close()
