"""How a service's @consume declarations become Kafka consumers."""

from __future__ import annotations

import pytest
from chatlib.schemas import Event
from chatlib.service import Service, ServiceConfig, consume
from chatlib.topics import MESSAGES_IN, PRESENCE, SESSION_EVENTS, USER_EVENTS


class Sample(Service):
    name = "sample"

    @consume(MESSAGES_IN, group="sample", batch=True)
    def on_inbound(self, events: list[Event]) -> None: ...

    @consume(SESSION_EVENTS, group="sample-control", batch=True)
    def on_sessions(self, events: list[Event]) -> None: ...

    @consume(USER_EVENTS, PRESENCE, group="sample-control", batch=True)
    def on_users(self, events: list[Event]) -> None: ...

    @consume(USER_EVENTS, private=True, from_beginning=False)
    def on_user_event(self, ev: Event) -> None: ...


def test_handlers_of_one_group_share_one_consumer_and_records_go_by_topic() -> None:
    svc = Sample(ServiceConfig())
    consumers = {plan.name: (plan.topics, plan.group, plan.handlers) for plan in svc._consumers()}
    assert set(consumers) == {"sample.on_inbound", "sample.control", "sample.on_user_event"}
    topics, group, handlers = consumers["sample.control"]
    assert group == "sample-control"
    assert sorted(topics) == sorted([SESSION_EVENTS.name, USER_EVENTS.name, PRESENCE.name])
    assert handlers[SESSION_EVENTS.name] == svc.on_sessions
    assert handlers[USER_EVENTS.name] == handlers[PRESENCE.name] == svc.on_users
    # a private reader never shares: every instance must see every record
    topics, group, handlers = consumers["sample.on_user_event"]
    assert (topics, group, handlers[USER_EVENTS.name]) == ([USER_EVENTS.name], None, svc.on_user_event)


def test_a_group_mixing_start_positions_is_a_programming_error() -> None:
    class Mixed(Service):
        name = "mixed"

        @consume(MESSAGES_IN, group="g", batch=True)
        def a(self, events: list[Event]) -> None: ...

        @consume(USER_EVENTS, group="g", batch=True, from_beginning=False)
        def b(self, events: list[Event]) -> None: ...

    with pytest.raises(TypeError, match="group g"):
        Mixed(ServiceConfig())._consumers()


def test_two_handlers_of_one_group_for_one_topic_is_a_programming_error() -> None:
    class Twice(Service):
        name = "twice"

        @consume(MESSAGES_IN, group="g", batch=True)
        def a(self, events: list[Event]) -> None: ...

        @consume(MESSAGES_IN, group="g", batch=True)
        def b(self, events: list[Event]) -> None: ...

    with pytest.raises(TypeError, match="same topic"):
        Twice(ServiceConfig())._consumers()


def test_a_key_prefix_skips_other_records_undecoded() -> None:
    from types import SimpleNamespace

    from chatlib.kafka import ConsumerWorker
    from chatlib.schemas import TypingSignal, to_bytes
    from chatlib.topics import SIGNALS

    class Router(Service):
        name = "router"

        @consume(SIGNALS, batch=True, key_prefix="dm:")
        def on_signals(self, events: list[Event]) -> None: ...

    svc = Router(ServiceConfig())
    [plan] = svc._consumers()
    assert (plan.group, plan.key_prefixes) == ("router", {SIGNALS.name: "dm:"})
    worker = ConsumerWorker(
        ServiceConfig(), "t", [SIGNALS.name], "router", batch_handler=svc.on_signals, key_prefixes={SIGNALS.name: "dm:"}
    )
    typing = TypingSignal(conversation="dm:a:b", user_id="a", device_id="d", state="start")
    value = to_bytes(typing)
    mine = SimpleNamespace(topic=SIGNALS.name, key=b"dm:a:b", value=value, partition=0, offset=1)
    other = SimpleNamespace(topic=SIGNALS.name, key=b"group:g", value=b"not even json", partition=0, offset=2)
    assert worker._decode(mine) == typing
    assert worker._decode(other) is None  # skipped before decoding: not parked as undecodable


def test_the_smallest_max_records_of_a_shared_consumer_bounds_its_polls() -> None:
    from chatlib.service import _max_records

    class Bounded(Service):
        name = "bounded"

        @consume(SESSION_EVENTS, group="bounded-control", batch=True, max_records=500)
        def on_sessions(self, events: list[Event]) -> None: ...

        @consume(USER_EVENTS, group="bounded-control", batch=True)
        def on_users(self, events: list[Event]) -> None: ...

        @consume(MESSAGES_IN, group="bounded", batch=True)
        def on_inbound(self, events: list[Event]) -> None: ...

    plans = {plan.name: plan for plan in Bounded(ServiceConfig())._consumers()}
    assert _max_records(plans["bounded.control"].specs) == {"max_records": 500}
    assert _max_records(plans["bounded.on_inbound"].specs) == {}  # the consumer's default
