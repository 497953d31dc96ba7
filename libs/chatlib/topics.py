"""The single declaration of every Kafka topic.

``helper/create_topics.py`` (and the test fixtures) create exactly these; a
service names topics only through these constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Topic:
    """A topic, its partition count and its settings."""

    name: str
    partitions: int = 4
    compacted: bool = False
    configs: dict[str, str] = field(default_factory=dict)

    def topic_configs(self) -> dict[str, str]:
        cfg = dict(self.configs)
        if self.compacted:
            cfg["cleanup.policy"] = "compact"
        return cfg


USER_EVENTS = Topic("user.events.v1", partitions=4)
SESSION_EVENTS = Topic("session.events.v1", partitions=4)
SESSION_CHANGES = Topic("session.changes.v1", partitions=4, compacted=True)
PRESENCE = Topic("presence.v1", partitions=4)
MESSAGES_IN = Topic("chat.messages.in.v1", partitions=8)
SIGNALS = Topic("chat.signals.v1", partitions=4)
MESSAGES_STORED = Topic("chat.messages.stored.v1", partitions=8)
ROUTE = Topic("chat.route.v1", partitions=4)
GROUP_CHANGES = Topic("group.changes.v1", partitions=4, compacted=True)
CHANNEL_EVENTS = Topic("channel.events.v1", partitions=2)
PUSH_REQUESTS = Topic("push.requests.v1", partitions=4)
DEAD_LETTERS = Topic("dlq.v1", partitions=1)

ALL_TOPICS: tuple[Topic, ...] = (
    USER_EVENTS,
    SESSION_EVENTS,
    SESSION_CHANGES,
    PRESENCE,
    MESSAGES_IN,
    SIGNALS,
    MESSAGES_STORED,
    ROUTE,
    GROUP_CHANGES,
    CHANNEL_EVENTS,
    PUSH_REQUESTS,
    DEAD_LETTERS,
)


def gateway_topic(instance: str) -> Topic:
    """The delivery topic of one gateway instance (one partition: one ordered stream)."""
    return Topic(f"gateway.{instance}.v1", partitions=1)
