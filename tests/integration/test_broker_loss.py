"""A broker that comes back empty (the embedded one keeps everything in memory) while
consumers run: the BrokerWatch sees the new cluster id, and every consumer — a group
member and a private reader that started at the end — reads the new log from its
beginning, so nothing written after the loss is skipped.

Each test runs a broker of its own: the suite's shared one must not lose its topics.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chatlib.config import SharedConfig
from chatlib.kafka import BrokerWatch, ConsumerWorker, Publisher, ensure_topics, wait_for_broker
from chatlib.schemas import Event, UserRegistered
from chatlib.topics import Topic

from helper.infra import Proc, free_port, kafka_proc, port_open, wait_until
from tests.support import eventually

TOPIC = Topic("loss.test.v1", partitions=2)


class Broker:
    def __init__(self, var: Path):
        self.var = var
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = kafka_proc(self.port, self.var)
        self.proc.start()
        wait_until(lambda: port_open(self.port), 20, "the broker's port")
        wait_for_broker(self.bootstrap, 20)
        ensure_topics(self.bootstrap, [TOPIC])

    def crash(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        wait_until(lambda: not port_open(self.port), 20, "the broker to go")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "log").mkdir()
    b = Broker(tmp_path)
    b.start()
    try:
        yield b
    finally:
        if b.proc is not None:
            b.proc.kill()


def event(i: int) -> UserRegistered:
    return UserRegistered(user_id=f"u{i}", username=f"name{i}", name=f"N{i}")


def test_consumers_read_a_broker_that_came_back_empty_from_its_beginning(broker: Broker) -> None:
    # As `make run` has it for the embedded broker: consumer groups named after the cluster.
    config = SharedConfig(kafka_bootstrap_servers=broker.bootstrap, kafka_group_per_cluster=True)
    seen: dict[str, list[str]] = {"group": [], "private": []}
    lock = threading.Lock()

    def record(kind: str) -> Callable[[Event], None]:
        def handle(ev: Event) -> None:
            assert isinstance(ev, UserRegistered)
            with lock:
                seen[kind].append(ev.user_id)

        return handle

    group = ConsumerWorker(config, "loss-group", [TOPIC.name], "loss-group", handler=record("group"))
    private = ConsumerWorker(
        config, "loss-private", [TOPIC.name], None, handler=record("private"), from_beginning=False
    )
    losses: list[int] = []

    def lost() -> None:
        ensure_topics(broker.bootstrap, [TOPIC])
        group.restart_from_beginning()
        private.restart_from_beginning()
        losses.append(1)

    watch = BrokerWatch(config, "loss-test", lost, interval_s=0.2)
    publisher = Publisher(config, "loss-test")
    group.start()
    private.start()
    try:
        eventually(lambda: group.assigned.is_set() and private.current, 40, "both consumers reading")
        watch.start()
        for i in range(20):
            publisher.send(TOPIC, event(i), key=f"u{i}")
        publisher.flush()
        eventually(
            lambda: len(seen["group"]) == 20 and len(seen["private"]) == 20, 40, lambda: f"all 20 records read: {seen}"
        )

        broker.crash()
        broker.start()  # empty, with a cluster id of its own
        eventually(lambda: bool(losses), 40, "the loss noticed")
        # Written after the loss: offsets start at 0 again, far below where the consumers were.
        for i in range(100, 110):
            publisher.send(TOPIC, event(i), key=f"u{i}")
        publisher.flush()
        after = {f"u{i}" for i in range(100, 110)}
        eventually(
            lambda: after <= set(seen["group"]) and after <= set(seen["private"]),
            40,
            lambda: f"the records written after the loss read: {seen}",
        )
    finally:
        watch.stop()
        group.stop()
        private.stop()
        publisher.close()
    assert len(losses) == 1  # one loss, recovered once


def test_a_broker_that_is_only_away_for_a_while_is_not_a_loss(broker: Broker) -> None:
    config = SharedConfig(kafka_bootstrap_servers=broker.bootstrap)
    losses: list[int] = []
    watch = BrokerWatch(config, "away-test", lambda: losses.append(1), interval_s=0.2)
    watch.start()
    try:
        assert watch.known is not None and watch.known.startswith("chat-embedded-")
        assert broker.proc is not None
        broker.proc.signal(signal.SIGSTOP)  # unreachable, then back with everything it had
        time.sleep(1.5)
        broker.proc.signal(signal.SIGCONT)
        time.sleep(1.5)
    finally:
        watch.stop()
    assert losses == []
