"""BrokerWatch: a new cluster id is a loss (recovered once, retried until it succeeds); an
unreachable broker is not; and what a service does about a loss."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from chatlib import kafka as k
from chatlib.config import SharedConfig
from chatlib.service import Service, ServiceConfig
from chatlib.topics import ALL_TOPICS


class ScriptedWatch(k.BrokerWatch):
    """Answers the cluster ids of a script instead of asking a broker (None: unreachable)."""

    def __init__(self, answers: list[str | None], on_new_cluster: Callable[[], None]):
        # A bootstrap of its own: the clusters this process saw are remembered per bootstrap.
        # (Not id(self): a watch of an earlier test may have had the same id, and its clusters.)
        config = SharedConfig(kafka_bootstrap_servers=f"scripted-{uuid.uuid4().hex}:9092")
        super().__init__(config, "test", on_new_cluster, interval_s=0.01)
        self.answers = answers

    def _ask(self) -> str | None:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def run(watch: k.BrokerWatch, seconds: float = 0.3) -> None:
    watch.start()
    time.sleep(seconds)
    watch.stop()


def test_a_new_cluster_id_is_recovered_once() -> None:
    calls: list[int] = []
    run(ScriptedWatch(["c1", "c1", None, None, "c1", "c2", "c2", "c2"], lambda: calls.append(1)))
    assert calls == [1]


def test_an_unreachable_broker_that_comes_back_is_not_a_loss() -> None:
    calls: list[int] = []
    run(ScriptedWatch(["c1", None, None, None, "c1"], lambda: calls.append(1)))
    assert calls == []


def test_a_recovery_that_fails_is_tried_again_until_it_succeeds() -> None:
    attempts: list[int] = []

    def recover() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise k.InfrastructureUnavailable("topics not there yet")

    run(ScriptedWatch(["c1", "c2"], recover))
    assert len(attempts) == 3


def test_a_service_that_started_before_the_broker_answered_takes_the_first_id_it_sees() -> None:
    calls: list[int] = []
    run(ScriptedWatch([None, None, "c1", "c1"], lambda: calls.append(1)))
    assert calls == []


class Owner(Service):
    name = "owner"

    def __init__(self) -> None:
        super().__init__(ServiceConfig())
        self.republished = 0

    def on_broker_lost(self) -> None:
        self.republished += 1


class FakeWorker:
    def __init__(self) -> None:
        self.restarted = 0

    def restart_from_beginning(self) -> None:
        self.restarted += 1


def test_a_service_recreates_topics_rereads_everything_and_republishes(monkeypatch: Any) -> None:
    created: list[list[str]] = []
    monkeypatch.setattr(k, "ensure_topics", lambda _bootstrap, topics: created.append([t.name for t in topics]))
    service = Owner()
    workers = [FakeWorker(), FakeWorker()]
    service._workers = workers  # type: ignore[assignment]
    service.broker_lost()
    assert created == [[t.name for t in ALL_TOPICS]]
    assert [w.restarted for w in workers] == [1, 1]
    assert service.republished == 1
