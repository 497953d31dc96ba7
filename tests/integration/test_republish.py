"""chatlib.republish against the real broker and database: an owner republishes its
records when its compacted topic holds nothing, and again after a republish that
was cut short, and leaves a topic that kept them alone."""

from __future__ import annotations

import uuid

from chatlib.config import SharedConfig
from chatlib.kafka import Publisher, ensure_topics
from chatlib.republish import MARKS, TopicOwner, topic_end_offsets, topic_is_empty
from chatlib.schemas import UserSessions
from chatlib.topics import Topic
from kafka import KafkaConsumer, TopicPartition
from pymongo import MongoClient

from helper.stack import Stack


def records(stack: Stack, topic: Topic) -> int:
    """How many records the topic holds, read from the start.

    Not from the end offsets: Tansu reports the end of a partition that took a
    batch of several records as the batch's first offset + 1.
    """
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, enable_auto_commit=False, fetch_max_wait_ms=50)
    try:
        parts = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        count, idle = 0, 0
        while idle < 5:
            got = sum(len(r) for r in consumer.poll(timeout_ms=200).values())
            count, idle = count + got, 0 if got else idle + 1
        return count
    finally:
        consumer.close()


def test_an_owner_republishes_only_when_the_topic_lost_its_records(stack: Stack) -> None:
    config = SharedConfig(kafka_bootstrap_servers=stack.kafka, mongo_url=stack.mongo_url)
    topic = Topic(f"test.owned.{uuid.uuid4().hex[:10]}.v1", partitions=2, compacted=True)
    ensure_topics(stack.kafka, [topic])
    client: MongoClient[dict[str, object]] = MongoClient(stack.mongo_url)
    db = client[f"test_{uuid.uuid4().hex[:8]}"]
    pub = Publisher(config, "test-owner")
    published: list[int] = []

    def republish() -> int:
        for u in ("u1", "u2", "u3"):
            pub.send(topic, UserSessions(user_id=u, devices=[], online=False, last_seen=1), key=u)
        pub.flush()
        published.append(3)
        return 3

    try:
        owner = TopicOwner(config, db, topic, "test")
        assert topic_is_empty(config, topic)
        assert owner.restore_if_lost(republish) == 3
        assert records(stack, topic) == 3
        assert db[MARKS].find_one({"_id": topic.name}) is None

        # The topic holds them now: nothing to do.
        assert not topic_is_empty(config, topic)
        assert owner.restore_if_lost(republish) == 0 and published == [3]

        # A republish cut short (the mark is still there) is done again, though the topic is not empty.
        db[MARKS].insert_one({"_id": topic.name, "service": "test", "since": 0})
        assert owner.restore_if_lost(republish) == 3 and published == [3, 3]
        assert records(stack, topic) == 6  # not compacted yet
        assert db[MARKS].find_one({"_id": topic.name}) is None

        # A topic that does not exist holds nothing.
        assert topic_end_offsets(config, Topic(f"test.absent.{uuid.uuid4().hex[:8]}.v1"), wait_s=0.5) == {}
    finally:
        pub.close()
        client.drop_database(db.name)
        client.close()
