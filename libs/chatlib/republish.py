"""Owned state back onto a compacted topic that lost it.

A service that owns records in MongoDB and shares them on a compacted topic
(group: groups on ``group.changes.v1``; session: sessions on
``session.changes.v1``) is the only writer of that topic, and other services
build live views from it. The embedded broker keeps everything in memory: a
restart of it (every restart of ``make run``) leaves those topics empty while
MongoDB still holds every group and session, and each view built on them is
empty for good. :class:`OwnedTopic` puts them back: called by the owner
before it serves, it publishes every owned record again when the topic holds
nothing. A mark in MongoDB is set while that runs, so a republish cut short
by a crash is done again at the next start (the topic is no longer empty
then, but incomplete).

The check is cheap (one metadata and one offsets request), so an owner may
also call it again later, when it learns that the broker came back empty.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from pymongo.database import Database

from .config import SharedConfig
from .schemas import now_ms
from .service import Dependency, Service, _MongoHolder
from .topics import Topic

logger = logging.getLogger(__name__)

#: One document per topic being republished: ``{_id: topic, service, since}``.
MARKS = "republish_marks"


def topic_end_offsets(config: SharedConfig, topic: Topic, wait_s: float = 10.0) -> dict[int, int]:
    """Partition -> end offset of ``topic``; empty when the topic does not exist (after ``wait_s``).

    A reader without a consumer group, closed at once: it commits nothing and
    joins nothing.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=config.kafka_bootstrap_servers,
        group_id=None,
        client_id=f"end-offsets-{topic.name}",
        enable_auto_commit=False,
        request_timeout_ms=int(max(wait_s, 1) * 1000) + 5000,
        metrics_enabled=False,
    )
    try:
        deadline = time.monotonic() + wait_s
        partitions = consumer.partitions_for_topic(topic.name)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic.name)
        if not partitions:
            return {}
        ends = consumer.end_offsets([TopicPartition(topic.name, p) for p in sorted(partitions)])
        return {tp.partition: int(offset) for tp, offset in ends.items()}
    finally:
        consumer.close(autocommit=False)


def topic_is_empty(config: SharedConfig, topic: Topic) -> bool:
    """True when no partition of ``topic`` ever held a record (or the topic does not exist).

    Compaction never lowers an end offset, so a topic whose owner published
    anything keeps a non-zero end offset on a broker that kept its log.
    """
    return all(offset <= 0 for offset in topic_end_offsets(config, topic).values())


class TopicOwner:
    """What a service that owns a compacted topic's records does when the topic lost them."""

    def __init__(self, config: SharedConfig, db: Database[dict[str, Any]], topic: Topic, service: str):
        self.config = config
        self.marks = db[MARKS]
        self.topic = topic
        self.service = service

    def restore_if_lost(self, republish: Callable[[], int]) -> int:
        """Run ``republish`` (which publishes every owned record and returns how many)
        when the topic lost them; returns that count, 0 when nothing had to be done.

        Call it before serving and before any consumer starts, so nothing the
        service publishes afterwards can be overtaken by an older republished record.
        """
        name = self.topic.name
        unfinished = self.marks.find_one({"_id": name}) is not None
        if not unfinished and not topic_is_empty(self.config, self.topic):
            return 0
        return self.republish(republish, "had an unfinished republish" if unfinished else "was empty")

    def republish(self, republish: Callable[[], int], why: str = "is on a new cluster") -> int:
        """Run ``republish`` whatever the topic holds (the broker came back empty while the
        service ran: records published since may already be there); returns its count."""
        name = self.topic.name
        self.marks.replace_one({"_id": name}, {"service": self.service, "since": now_ms()}, upsert=True)
        count = republish()
        self.marks.delete_one({"_id": name})
        logger.log(
            logging.WARNING if count else logging.INFO, "%s %s: republished %d records from MongoDB", name, why, count
        )
        return count


class OwnedTopic(Dependency[TopicOwner]):
    """Declares that the service owns every record of a compacted topic (and keeps them in MongoDB).

    ``self.<attr>.restore_if_lost(self.republish_all)`` in ``on_setup`` puts
    them back when the broker lost them. Unit tests replace it with a stand-in.
    """

    def __init__(self, topic: Topic):
        self.topic = topic

    def setup(self, service: Service) -> TopicOwner:
        return TopicOwner(service.config, _MongoHolder.db(service), self.topic, service.name)
