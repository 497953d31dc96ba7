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
    #: On the message path: consumers fetch with the short wait (each hop's latency).
    #: Other topics use the relaxed wait, so idle consumers cost little CPU.
    hot: bool = False

    def topic_configs(self) -> dict[str, str]:
        cfg = dict(self.configs)
        if self.compacted:
            cfg["cleanup.policy"] = "compact"
        return cfg


USER_EVENTS = Topic("user.events.v1", partitions=4)
SESSION_EVENTS = Topic("session.events.v1", partitions=4)
SESSION_CHANGES = Topic("session.changes.v1", partitions=4, compacted=True)
PRESENCE = Topic("presence.v1", partitions=4)
MESSAGES_IN = Topic("chat.messages.in.v1", partitions=8, hot=True)
SIGNALS = Topic("chat.signals.v1", partitions=4, hot=True)
MESSAGES_STORED = Topic("chat.messages.stored.v1", partitions=8, hot=True)
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
    """The delivery topic of one gateway instance, keyed by the (first) target user.

    Four partitions, not one: the embedded broker's fetch cost grows with the
    record batches of a partition (see chatlib.wakeup.FetchWait), and every
    delivery of a gateway lands on this topic. A device's frames may come
    through two partitions (its own messages routed as another user's); the
    gateway's per-socket sequencer puts them in seq order either way.
    """
    return Topic(f"gateway.{instance}.v1", partitions=4, hot=True)


def is_hot(name: str) -> bool:
    """True for topics on the message path (see Topic.hot)."""
    if name.startswith("gateway.") and name.endswith(".v1"):
        return True
    return any(t.name == name and t.hot for t in ALL_TOPICS)


#: What the key of each topic's records is (ordering holds per key).
TOPIC_KEYS: dict[str, str] = {
    USER_EVENTS.name: "user_id",
    SESSION_EVENTS.name: "user_id (heartbeats: gateway id)",
    SESSION_CHANGES.name: "user_id (compacted: the latest value per user wins)",
    PRESENCE.name: "user_id",
    MESSAGES_IN.name: "conversation",
    SIGNALS.name: "conversation",
    MESSAGES_STORED.name: "conversation",
    ROUTE.name: "user_id",
    GROUP_CHANGES.name: "group_id (compacted: the latest value per group wins)",
    CHANNEL_EVENTS.name: "group_id",
    PUSH_REQUESTS.name: "user_id (group requests: conversation)",
    DEAD_LETTERS.name: "the original topic name",
    gateway_topic("<instance>").name: "user_id of the first target (a socket's sequencer orders its frames by seq)",
}

#: The topic(s) each event type of :mod:`chatlib.schemas` travels on, by its TYPE.
#: docs/asyncapi.yaml is generated from this (helper/gen_asyncapi.py); tests/unit/test_docs.py
#: fails when a registered event type is missing here.
EVENT_TOPICS: dict[str, tuple[str, ...]] = {
    "user.registered": (USER_EVENTS.name,),
    "user.updated": (USER_EVENTS.name,),
    "user.unregistered": (USER_EVENTS.name,),
    "user.disabled": (USER_EVENTS.name,),
    "user.enabled": (USER_EVENTS.name,),
    "device.registered": (USER_EVENTS.name,),
    "device.push_token": (USER_EVENTS.name,),
    "device.logged_out": (USER_EVENTS.name,),
    "device.removed": (USER_EVENTS.name,),
    "session.connected": (SESSION_EVENTS.name,),
    "session.disconnected": (SESSION_EVENTS.name,),
    "session.gateway_heartbeat": (SESSION_EVENTS.name,),
    "session.user_sessions": (SESSION_CHANGES.name,),
    "presence.changed": (PRESENCE.name,),
    "chat.inbound_message": (MESSAGES_IN.name,),
    "chat.inbound_receipt": (MESSAGES_IN.name,),
    "chat.replay_request": (MESSAGES_IN.name,),
    "chat.typing": (SIGNALS.name,),
    "chat.message_stored": (MESSAGES_STORED.name,),
    "chat.receipt_stored": (MESSAGES_STORED.name,),
    "chat.presence_route": (ROUTE.name,),
    "gateway.deliver": (gateway_topic("<instance>").name,),
    "gateway.close_device": (gateway_topic("<instance>").name,),
    "group.changed": (GROUP_CHANGES.name,),
    "channel.created": (CHANNEL_EVENTS.name,),
    "channel.deleted": (CHANNEL_EVENTS.name,),
    "push.request": (PUSH_REQUESTS.name,),
    "push.group_request": (PUSH_REQUESTS.name,),
    "dlq.dead_letter": (DEAD_LETTERS.name,),
}
