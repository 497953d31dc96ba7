"""Service declaration and lifecycle.

A service is a class: its dependencies are class attributes, its Kafka entry
points are methods decorated with :func:`consume`, its HTTP routes are added
in :meth:`Service.routes`. The runner builds it, calls ``setup`` (connect,
apply indexes; raises if something is unreachable), ``start`` (consumers and
views running), and ``stop`` on SIGTERM (finish the batch in hand, commit
offsets, close clients).

Handlers stay plain methods: a unit test builds the service with
``Service(config, store=FakeStore(), publisher=FakePublisher())`` and calls them.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from flask import Flask
from pymongo import MongoClient
from pymongo.database import Database

from . import kafka as k
from .config import SharedConfig
from .http import create_app
from .mongo import apply_indexes, connect
from .schemas import Event
from .topics import ALL_TOPICS, Topic

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Dependency(Generic[T]):
    """Something a service needs: set up before start, stopped after.

    ``setup`` returns the object the service sees under the attribute's name.
    """

    attr: str = ""

    def setup(self, service: Service) -> T:
        raise NotImplementedError

    def start(self, service: Service) -> None:
        """Called once every dependency is set up."""

    def stop(self) -> None:
        """Release what setup acquired."""

    def healthy(self) -> bool:
        return True

    def broker_lost(self) -> None:
        """The broker came back as a new, empty cluster (see Service.broker_lost)."""


class _MongoHolder:
    """One MongoClient per process, shared by every Storage dependency."""

    client: MongoClient[dict[str, Any]] | None = None

    @classmethod
    def db(cls, service: Service) -> Database[dict[str, Any]]:
        if cls.client is None:
            cls.client = connect(service.config, service.name)
        return cls.client[service.config.mongo_db]

    @classmethod
    def close(cls) -> None:
        if cls.client is not None:
            cls.client.close()
            cls.client = None


class Storage(Dependency[T]):
    """The service's storage class, built on the database, its ``INDEXES`` applied."""

    def __init__(self, store_class: Callable[..., T]):
        self.store_class = store_class

    def setup(self, service: Service) -> T:
        db = _MongoHolder.db(service)
        apply_indexes(db, list(getattr(self.store_class, "INDEXES", [])))
        return self.store_class(db)

    def stop(self) -> None:
        _MongoHolder.close()

    def healthy(self) -> bool:
        try:
            if _MongoHolder.client is None:
                return False
            _MongoHolder.client.admin.command("ping")
            return True
        except Exception:  # noqa: BLE001
            return False


class Producer(Dependency[k.Publisher]):
    """A Kafka publisher of enveloped events."""

    def setup(self, service: Service) -> k.Publisher:
        self.publisher = k.Publisher(service.config, service.name)
        self.publisher.start()
        return self.publisher

    def stop(self) -> None:
        self.publisher.close()


class View(Dependency[k.CompactedView]):
    """A live in-memory view of a compacted topic (key -> latest event)."""

    def __init__(self, topic: Topic, key: Callable[[Event], str], wait_ready: bool = True):
        self.topic = topic
        self.key = key
        self.wait_ready = wait_ready

    def setup(self, service: Service) -> k.CompactedView:
        on_update = getattr(service, f"on_{self.attr}_update", None)
        self.view = k.CompactedView(service.config, f"{service.name}-{self.attr}", self.topic, self.key, on_update)
        return self.view

    def start(self, service: Service) -> None:
        self.view.start()
        if self.wait_ready and not self.view.ready.wait(service.config.startup_timeout_s * 3):
            raise k.InfrastructureUnavailable(f"view {self.attr} did not catch up with {self.topic.name}")

    def stop(self) -> None:
        self.view.stop()

    def broker_lost(self) -> None:
        self.view.restart_from_beginning()

    def healthy(self) -> bool:
        return self.view.ready.is_set()


@dataclass
class ConsumerPlan:
    """One Kafka consumer a service will run: its topics, and the handler and key prefix per topic."""

    name: str
    topics: list[str]
    group: str | None
    spec: ConsumeSpec
    handlers: dict[str, Callable[..., None]]
    key_prefixes: dict[str, str]
    #: every spec sharing this consumer (``spec`` is the first)
    specs: list[ConsumeSpec] = field(default_factory=list)


@dataclass
class ConsumeSpec:
    topics: list[Topic | str]
    group: str | None
    batch: bool
    from_beginning: bool
    private: bool
    key_prefix: str | None = None
    #: Name of a service method called when the consumer's partitions change.
    on_assignment: str | None = None
    #: A busy consumer fetches at most this often (ms); None: KAFKA_WAKEUP_LINGER_MS.
    linger_ms: float | None = None
    #: Records one poll hands over at most; None: the consumer's default (10,000).
    max_records: int | None = None


def consume(
    *topics: Topic | str,
    group: str | None = None,
    batch: bool = False,
    from_beginning: bool = True,
    private: bool = False,
    key_prefix: str | None = None,
    on_assignment: str | None = None,
    linger_ms: float | None = None,
    max_records: int | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a method as the handler of these topics.

    The consumer group defaults to the service name; batch handlers declared
    with the same group share one consumer (see ``Service._consumers``) and
    see each poll topic by topic in the order they are declared: declare the
    handler of a view before the handlers that read it.
    ``batch=True`` hands the method a list (the records of its topics from
    one poll, in order per partition). ``private=True``
    reads without a group (every instance sees every record, from the end
    unless ``from_beginning``). ``key_prefix`` skips, without decoding them,
    the records whose key does not start with it (a router reads only its
    own kind of conversation from a shared topic). ``on_assignment`` names
    a method called (before the next record) whenever the partitions the
    consumer owns change: state kept for owned partitions starts over.
    ``linger_ms`` lets a consumer that need not be quick (push notifications)
    read a burst in fewer fetches: after a fetch that found records, the next
    one waits until that long after it. ``max_records`` bounds one poll's batch, for
    a handler whose records are expensive: a poll's work must end well within
    ``KAFKA_MAX_POLL_INTERVAL_MS`` or the consumer loses its partitions.
    """

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn._consume = ConsumeSpec(  # type: ignore[attr-defined]
            list(topics), group, batch, from_beginning, private, key_prefix, on_assignment, linger_ms, max_records
        )
        return fn

    return mark


def _max_records(specs: list[ConsumeSpec]) -> dict[str, int]:
    """The smallest ``max_records`` the handlers sharing a consumer asked for, if any."""
    asked = [sp.max_records for sp in specs if sp.max_records is not None]
    return {"max_records": min(asked)} if asked else {}


def _declared(cls: type) -> list[str]:
    """Attribute names in declaration order, base classes first (``dir`` sorts them)."""
    return list(dict.fromkeys(name for klass in reversed(cls.__mro__) for name in vars(klass)))


def _call_all(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        hook()


class ServiceConfig(SharedConfig):
    """Base of every service's config; subclasses add fields and an ``env_prefix``."""

    host: str = "127.0.0.1"
    port: int = 8100


class Service:
    """Base class of every service."""

    name: ClassVar[str] = "service"
    config_class: ClassVar[type[ServiceConfig]] = ServiceConfig
    #: HTTP body limit for this service's app.
    max_body_bytes: ClassVar[int] = 1024 * 1024

    def __init__(self, config: ServiceConfig, **overrides: Any):
        self.config = config
        self._deps: dict[str, Dependency[Any]] = {}
        self._workers: list[k.ConsumerWorker] = []
        self._overrides = overrides
        self._dead_letters: k.Publisher | None = None
        self._watch: k.BrokerWatch | None = None
        for attr in dir(type(self)):
            dep = getattr(type(self), attr, None)
            if isinstance(dep, Dependency):
                if attr in overrides:
                    setattr(self, attr, overrides[attr])
                else:
                    mine = copy.copy(dep)
                    mine.attr = attr
                    self._deps[attr] = mine
        for attr, value in overrides.items():
            setattr(self, attr, value)

    # -- lifecycle --------------------------------------------------------

    def setup(self) -> None:
        """Connect every dependency; raises InfrastructureUnavailable when one is unreachable."""
        for attr, dep in self._deps.items():
            setattr(self, attr, dep.setup(self))
        self.on_setup()

    def on_setup(self) -> None:
        """Hook for work after dependencies exist (seed data, caches)."""

    def start(self) -> None:
        """Start views, then consumers."""
        for dep in self._deps.values():
            dep.start(self)
        self._dead_letters = k.Publisher(self.config, f"{self.name}-dlq")
        for plan in self._consumers():
            worker = k.ConsumerWorker(
                self.config,
                name=plan.name,
                topics=plan.topics,
                group_id=plan.group,
                handler=None if plan.spec.batch else plan.handlers[plan.topics[0]],
                batch_handler=plan.handlers if plan.spec.batch else None,
                dead_letters=self._dead_letters,
                from_beginning=plan.spec.from_beginning,
                key_prefixes=plan.key_prefixes,
                linger_ms=max((sp.linger_ms for sp in plan.specs if sp.linger_ms is not None), default=None),
                **_max_records(plan.specs),
            )
            hooks: list[Callable[[], None]] = [getattr(self, n) for n in {s.on_assignment for s in plan.specs} if n]
            if hooks:
                worker.on_assignment = functools.partial(_call_all, hooks)
            worker.start()
            self._workers.append(worker)
        self.on_start()
        if self.config.kafka_broker_watch_ms > 0:
            self._watch = k.BrokerWatch(
                self.config, self.name, self.broker_lost, self.config.kafka_broker_watch_ms / 1000
            )
            self._watch.start()
        logger.info("%s started", self.name)

    def broker_lost(self) -> None:
        """The broker came back as a new, empty cluster (kafka.BrokerWatch): its topics are created
        again, every consumer and view reads it from the beginning (everything on it was written
        after the loss), and :meth:`on_broker_lost` publishes again what this service owns."""
        k.ensure_topics(self.config.kafka_bootstrap_servers, self.topics_owned_on_broker())
        for worker in self._workers:
            worker.restart_from_beginning()
        for dep in self._deps.values():
            dep.broker_lost()
        self.on_broker_lost()

    def topics_owned_on_broker(self) -> list[Topic]:
        """The topics this service creates again on a new cluster (every shared one; a gateway
        adds its own delivery topic)."""
        return list(ALL_TOPICS)

    def on_broker_lost(self) -> None:
        """Hook: publish again what this service owns and others read from the broker."""

    def _consumers(self) -> list[ConsumerPlan]:
        """One consumer per private handler, and one per consumer group.

        Handlers declared with the same group share one Kafka consumer (one
        fetch loop: each idle consumer costs CPU at every fetch wait); each
        record goes to the handler of its topic.
        """
        out: list[ConsumerPlan] = []
        shared: dict[str, tuple[list[str], ConsumerPlan]] = {}
        for attr in _declared(type(self)):
            spec: ConsumeSpec | None = getattr(getattr(type(self), attr, None), "_consume", None)
            if spec is None:
                continue
            bound = getattr(self, attr)
            names = [t.name if isinstance(t, Topic) else t for t in spec.topics]
            handlers = dict.fromkeys(names, bound)
            prefixes = dict.fromkeys(names, spec.key_prefix) if spec.key_prefix is not None else {}
            if spec.private:
                out.append(ConsumerPlan(f"{self.name}.{attr}", names, None, spec, handlers, prefixes, [spec]))
                continue
            group = spec.group or self.name
            attrs, plan = shared.setdefault(group, ([], ConsumerPlan("", [], group, spec, {}, {})))
            first = plan.spec
            if (spec.batch, spec.from_beginning) != (first.batch, first.from_beginning) or (
                not spec.batch and plan.handlers
            ):
                raise TypeError(f"handlers of group {group} must all be batch handlers with the same from_beginning")
            if set(names) & set(plan.handlers):
                raise TypeError(f"two handlers of group {group} for the same topic")
            attrs.append(attr)
            plan.specs.append(spec)
            plan.topics += names
            plan.handlers.update(handlers)
            plan.key_prefixes.update(prefixes)
        for group, (attrs, plan) in shared.items():
            label = (
                attrs[0] if len(attrs) == 1 else "main" if group == self.name else group.removeprefix(f"{self.name}-")
            )
            plan.name = f"{self.name}.{label}"
            out.append(plan)
        return out

    def on_start(self) -> None:
        """Hook run after consumers started (background loops)."""

    def consumer_of(self, handler: Callable[..., None]) -> k.ConsumerWorker | None:
        """The running consumer that calls ``handler`` (a bound ``@consume`` method), if any."""
        target = getattr(handler, "__func__", handler)
        for worker in self._workers:
            fns = [worker.handler] if worker.handler is not None else list(worker.batch_handlers.values())
            if any(getattr(fn, "__func__", fn) is target for fn in fns):
                return worker
        return None

    def stop(self) -> None:
        """Graceful stop: consumers finish and commit, then clients close."""
        logger.info("%s stopping", self.name)
        if self._watch is not None:
            self._watch.stop()
        self.on_stop()
        for worker in self._workers:
            worker.stop()
        for dep in reversed(list(self._deps.values())):
            try:
                dep.stop()
            except Exception:
                logger.warning("stopping %s failed", dep.attr, exc_info=True)
        if self._dead_letters is not None:
            self._dead_letters.close()

    def on_stop(self) -> None:
        """Hook run first on stop."""

    # -- HTTP -------------------------------------------------------------

    def health(self) -> dict[str, bool]:
        checks = {attr: dep.healthy() for attr, dep in self._deps.items()}
        checks["consumers"] = all(w.healthy for w in self._workers)
        return checks

    def create_app(self) -> Flask:
        app = create_app(self.name, self.health, self.max_body_bytes)
        self.routes(app)
        return app

    def routes(self, app: Flask) -> None:
        """Register this service's HTTP routes (blueprints) on ``app``."""
