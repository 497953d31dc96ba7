"""Kafka access on kafka-python: enveloped produce, at-least-once consumers, live views.

- :class:`Publisher` sends typed events, keyed, inside the envelope.
- :class:`ConsumerWorker` runs one consumer group: it hands each event to a
  handler and commits a partition's offset only after the handler returned.
  Transient failures (broker or database away) are retried with backoff
  forever; any other handler failure is retried a few times, then the record
  is parked on the dead-letter topic so the partition keeps moving.
- :class:`CompactedView` reads a compacted topic from the beginning into a
  dict (key -> latest event), the "live view" routers keep in memory.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError, UnknownProducerIdError
from kafka.structs import OffsetAndMetadata
from pymongo.errors import ConnectionFailure

from . import metrics, wakeup
from .config import SharedConfig
from .schemas import DeadLetter, Envelope, Event, now_ms, to_bytes
from .topics import ALL_TOPICS, DEAD_LETTERS, Topic

logger = logging.getLogger(__name__)

#: With wake-ups, how long one poll may keep fetching for records a ring announced (ms). A poll
#: returns as soon as records come, so this only bounds the fetching in vain that tells the
#: consumer its fetch wait is too short for the broker (see chatlib.wakeup.FetchWait).
POLL_MS = 50


def _no_spin_while_paused() -> None:
    """Stop kafka-python 3's producer from spinning while a connection is at its in-flight limit.

    Its sender asks ``connection_delay(node)`` how long a node that is not
    ready will stay so, and polls with that timeout; for a connected node
    that is only paused (max in-flight requests reached) the answer is 0, so
    the sender polls in a tight loop until the response comes (measured: the
    gateways' busiest code at 200 msgs/s, with one request in flight). A
    paused connection is waited on instead: the response is an I/O event
    that wakes the sender's poll, and a new record wakes it through the
    producer's wake-up. Only applied where the attributes it relies on exist.
    """
    try:
        from kafka.net.compat import KafkaNetClient
    except ImportError:  # another kafka-python line: nothing to mend
        return
    original = getattr(KafkaNetClient, "connection_delay", None)
    if original is None or getattr(original, "_chatlib_patched", False):
        return

    def connection_delay(self: Any, node_id: Any) -> Any:
        conns = getattr(getattr(self, "_manager", None), "_conns", {})
        conn = conns.get(node_id)
        if conn is not None and getattr(conn, "connected", False) and getattr(conn, "paused", None):
            return PAUSED_WAIT_MS
        return original(self, node_id)

    connection_delay._chatlib_patched = True  # type: ignore[attr-defined]
    KafkaNetClient.connection_delay = connection_delay


#: How long the producer's sender waits on a paused connection when nothing wakes it first (ms).
PAUSED_WAIT_MS = 100
_no_spin_while_paused()


def _positions(consumer: KafkaConsumer) -> list[tuple[TopicPartition, int, int | None]]:
    """(partition, position, last fetched high watermark or None) of every assigned partition
    with a known position.

    Reads kafka-python's subscription state directly: ``KafkaConsumer.position``
    may block on a committed-offset refresh, and this runs after every poll.
    """
    assignment = getattr(getattr(consumer, "_subscription", None), "assignment", None)
    if not assignment:
        return []
    out = []
    for tp, state in list(assignment.items()):
        if not getattr(state, "has_valid_position", False):
            continue
        position = state.position
        offset = getattr(position, "offset", position)
        if isinstance(offset, int):
            out.append((tp, offset, getattr(state, "highwater", None)))
    return out


class RetryBatch(Exception):
    """Raised by a handler that must see the same records again (its view of the world was
    stale and it has forgotten it); retried like a broker or database outage, never parked."""


#: Handled offsets are committed at most this often (see ConsumerWorker._commit).
COMMIT_INTERVAL_S = 0.25

#: Errors after which the same record is retried (with backoff) instead of dead-lettered.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (KafkaError, ConnectionFailure, OSError, RetryBatch)
MAX_HANDLER_ATTEMPTS = 3


class InfrastructureUnavailable(Exception):
    """Kafka or MongoDB could not be reached within the start-up timeout."""


def _backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    return min(cap, base * float(2 ** min(attempt, 10)))


# ---------------------------------------------------------------------------
# Admin
# ---------------------------------------------------------------------------


def _tcp_reachable(bootstrap: str) -> bool:
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
                return True
        except (OSError, ValueError):
            continue
    return False


def wait_for_broker(bootstrap: str, timeout_s: float) -> None:
    """Return once the broker answers; raise InfrastructureUnavailable after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not _tcp_reachable(bootstrap):
        if time.monotonic() > deadline:
            raise InfrastructureUnavailable(f"Kafka broker at {bootstrap} is unreachable (connection refused)")
        time.sleep(0.2)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), client_id="probe"
        )
        admin.list_topics()
        admin.close()
    except Exception as exc:  # noqa: BLE001 - any failure here means "not usable"
        raise InfrastructureUnavailable(f"Kafka broker at {bootstrap} does not answer: {exc}") from None


def topic_replication_factor() -> int:
    """``KAFKA_REPLICATION_FACTOR``: 1 for the embedded broker (default), 3 on a production cluster."""
    raw = os.environ.get("KAFKA_REPLICATION_FACTOR", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"KAFKA_REPLICATION_FACTOR: must be a positive integer, got {raw!r}")
    return int(raw)


def ensure_topics(
    bootstrap: str, topics: Iterable[Topic] = ALL_TOPICS, replication_factor: int | None = None
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Replicas per partition: ``replication_factor``, else :func:`topic_replication_factor`.
    """
    rf = replication_factor if replication_factor is not None else topic_replication_factor()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000, client_id="topics")
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(t.name, num_partitions=t.partitions, replication_factor=rf, topic_configs=t.topic_configs())
            for t in topics
            if t.name not in existing
        ]
        created: list[str] = []
        for nt in new:
            try:
                admin.create_topics([nt])
                created.append(nt.name)
            except TopicAlreadyExistsError:
                pass
        return created
    finally:
        admin.close()


def cluster_id(admin: KafkaAdminClient) -> str | None:
    """The cluster id the broker reports (a Metadata request)."""
    found = admin.describe_cluster().get("cluster_id")
    return str(found) if found else None


#: Bootstrap servers -> the cluster this process last saw there (set by BrokerWatch and group_name).
_clusters: dict[str, str] = {}


def group_name(config: SharedConfig, group: str) -> str:
    """The consumer group ``group`` is on the broker.

    With ``KAFKA_GROUP_PER_CLUSTER`` (the embedded broker), ``<group>.<cluster id>``:
    after the broker came back empty, a member of the old cluster that re-joined its
    group on the new one before it knew (kafka-python re-joins by itself) and left it
    again mid-join was seen to leave the embedded broker's group stuck in a rebalance
    for good; a group of the new cluster's own name never met that member. Every
    instance of a service sees the same cluster, so they share the group.
    """
    if not config.kafka_group_per_cluster:
        return group
    bootstrap = config.kafka_bootstrap_servers
    if bootstrap not in _clusters:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="cluster-id", request_timeout_ms=10000)
        try:
            found = cluster_id(admin)
        finally:
            admin.close()
        if found:
            _clusters[bootstrap] = found
    found = _clusters.get(bootstrap)
    return f"{group}.{found}" if found else group


class BrokerWatch:
    """Tells a running service when the broker it talks to has become a new cluster.

    The embedded broker keeps everything in memory and gets a cluster id of its
    own at every start (helper.infra.kafka_proc): after a crash and restart it
    is empty, its topics, consumer groups and committed offsets gone, while
    clients only see connections drop and come back. Every ``interval_s`` this
    asks for the cluster id; when it differs from the one seen before,
    ``on_new_cluster`` runs (in this thread), again at every interval until it
    succeeds. An unreachable broker is only waited for: that is not a loss.
    With Apache Kafka the id never changes and this costs one small request
    per interval.
    """

    def __init__(self, config: SharedConfig, name: str, on_new_cluster: Callable[[], None], interval_s: float):
        self.config = config
        self.name = name
        self.on_new_cluster = on_new_cluster
        self.interval_s = interval_s
        self.known: str | None = None
        self._admin: KafkaAdminClient | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # The cluster this service's consumer groups were named after, else the one there is now.
        bootstrap = self.config.kafka_bootstrap_servers
        self.known = _clusters.get(bootstrap) or self._ask()
        if self.known is not None:
            _clusters.setdefault(bootstrap, self.known)
        self._thread = threading.Thread(target=self._run, name=f"broker-watch-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._close()

    def _ask(self) -> str | None:
        try:
            if self._admin is None:
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self.config.kafka_bootstrap_servers,
                    client_id=f"{self.name}-watch",
                    request_timeout_ms=5000,
                )
            return cluster_id(self._admin)
        except Exception as exc:  # noqa: BLE001 - unreachable for now: ask again later
            logger.debug("broker watch: %s", exc.__class__.__name__)
            self._close()
            return None

    def _close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                admin.close()
            except Exception:
                logger.debug("closing the watch's admin client failed", exc_info=True)

    def _run(self) -> None:
        owed = False
        while not self._stop.wait(self.interval_s):
            now = self._ask()
            if now is None:
                continue
            if self.known is None:
                self.known = now
            elif now != self.known:
                logger.warning("the Kafka broker is a new cluster (it lost its topics and offsets): recovering")
                metrics.BROKER_LOSSES.inc()
                self.known, owed = now, True
                _clusters[self.config.kafka_bootstrap_servers] = now
            if owed:
                try:
                    self.on_new_cluster()
                    owed = False
                    logger.warning("recovered from the broker loss")
                except Exception as exc:  # noqa: BLE001 - tried again at the next interval
                    logger.warning("recovering from the broker loss failed (%s); retrying", exc.__class__.__name__)


# ---------------------------------------------------------------------------
# Producer
# ---------------------------------------------------------------------------


class Publisher:
    """Produces typed events inside the envelope, keyed, JSON-encoded."""

    def __init__(self, config: SharedConfig, producer_name: str):
        self._config = config
        self._name = producer_name
        self._lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        #: Rings the consumers of a topic once the broker has its records (see chatlib.wakeup).
        self._ringer = wakeup.ringer(config.kafka_wakeup_dir)

    def _make(self) -> KafkaProducer:
        return KafkaProducer(
            bootstrap_servers=self._config.kafka_bootstrap_servers,
            client_id=self._name,
            acks="all",
            linger_ms=0,
            enable_idempotence=self._config.kafka_enable_idempotence,
            # One request in flight: records sent meanwhile leave together in the next one
            # (each request costs ~1 ms of kafka-python CPU whatever it carries), and a retried
            # batch can never overtake a later one. See _no_spin_while_paused.
            max_in_flight_requests_per_connection=1,
            retries=5,
            request_timeout_ms=10000,
            # kafka-python's own sensors cost CPU on every request; /metrics has ours.
            metrics_enabled=False,
        )

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            with self._lock:
                if self._producer is None:
                    self._producer = self._make()
        return self._producer

    def start(self) -> None:
        """Connect now, so an unreachable broker is reported at start."""
        _ = self.producer

    def send(self, topic: Topic | str, ev: Event, key: str | None = None) -> Any:
        """Queue an event; returns kafka-python's future."""
        name = topic.name if isinstance(topic, Topic) else topic
        value = to_bytes(ev, self._name)
        metrics.child(metrics.EVENTS_PRODUCED, name, ev.TYPE).inc()
        raw_key = key.encode() if key else None
        try:
            future = self.producer.send(name, value=value, key=raw_key)
        except UnknownProducerIdError:
            self._reset()
            future = self.producer.send(name, value=value, key=raw_key)
        if self._ringer is not None:
            future.add_callback(self._ring, name, raw_key)
        return future

    def _ring(self, topic: str, key: bytes | None, metadata: Any) -> None:
        assert self._ringer is not None
        self._ringer.ring(topic, metadata.partition, metadata.offset, key)

    def publish(self, topic: Topic | str, ev: Event, key: str | None = None, timeout: float = 10.0) -> None:
        """Send and wait until the broker has it (use before acknowledging anything)."""
        self.send(topic, ev, key).get(timeout=timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait for every queued event; recreate the producer if the broker forgot it."""
        try:
            self.producer.flush(timeout=timeout)
        except UnknownProducerIdError:
            self._reset()
            raise

    def _reset(self) -> None:
        with self._lock:
            old, self._producer = self._producer, None
        if old is not None:
            try:
                old.close(timeout=1)
            except Exception:
                logger.debug("closing a broken producer failed", exc_info=True)

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer.flush(timeout=5)
                self._producer.close(timeout=5)
                self._producer = None


# ---------------------------------------------------------------------------
# Consumers
# ---------------------------------------------------------------------------

Handler = Callable[[Event], None]
BatchHandler = Callable[[list[Event]], None]


class ConsumerWorker:
    """One consumer (group member or, with ``group_id=None``, a private reader) in a thread.

    ``handler`` gets one event at a time; ``batch_handler`` gets every decoded
    event of one poll, across partitions (each partition's in offset order, so
    order per key holds), which lets a service turn a poll into one database
    round trip. Offsets are committed after the handler returned; a transient
    failure (broker or database away) retries the same records with backoff.
    """

    def __init__(
        self,
        config: SharedConfig,
        name: str,
        topics: list[str],
        group_id: str | None,
        handler: Handler | None = None,
        batch_handler: BatchHandler | dict[str, BatchHandler] | None = None,
        dead_letters: Publisher | None = None,
        from_beginning: bool = True,
        max_records: int = 10_000,
        key_prefixes: dict[str, str] | None = None,
        linger_ms: float | None = None,
    ):
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler or batch_handler")
        self.config = config
        self.name = name
        self.topics = topics
        self.group_id = group_id
        self.handler = handler
        #: topic -> batch handler (one callable given serves every topic); empty with ``handler``
        self.batch_handlers: dict[str, BatchHandler] = {}
        if isinstance(batch_handler, dict):
            self.batch_handlers = dict(batch_handler)
        elif batch_handler is not None:
            self.batch_handlers = dict.fromkeys(topics, batch_handler)
        self.dead_letters = dead_letters
        self.from_beginning = from_beginning
        self.max_records = max_records
        #: after a fetch that found records, the next waits until this long after it (s)
        self.linger_s = (config.kafka_wakeup_linger_ms if linger_ms is None else linger_ms) / 1000
        #: topic -> key prefix: other records of that topic are skipped undecoded (and committed)
        self.key_prefixes = {t: p.encode() for t, p in (key_prefixes or {}).items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: KafkaConsumer | None = None
        #: Woken by producers of these topics (chatlib.wakeup); None: plain long polling.
        self._doorbell = (
            wakeup.Doorbell(Path(config.kafka_wakeup_dir), topics, self.key_prefixes)
            if config.kafka_wakeup_dir
            else None
        )
        self.assigned = threading.Event()
        self.healthy = True
        #: True while this consumer owns partitions and has read each up to the high watermark
        #: its last fetch reported, with nothing announced unread: a record produced before
        #: the last poll has been handled. False while a group (re)joins, before the first
        #: fetch of an assignment, and after an error. Read by handlers of *other* consumers
        #: deciding whether a projection this one keeps is merely late (see persistence).
        self.current = False
        #: Called in the consumer thread after every poll (used by CompactedView).
        self.after_poll: Callable[[KafkaConsumer], None] | None = None
        #: Called in the consumer thread, before any record of the new assignment is handled,
        #: whenever the partitions this consumer owns change (caches of owned state start over).
        self.on_assignment: Callable[[], None] | None = None
        self._assignment: set[TopicPartition] = set()
        #: handled offsets not committed yet (see _commit)
        self._uncommitted: dict[TopicPartition, int] = {}
        self._committed_at = 0.0
        #: set by :meth:`restart_from_beginning`; read by the consumer thread
        self._restart = threading.Event()
        #: after a broker loss: partitions without a committed offset start at the beginning
        self._earliest = from_beginning

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"consumer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, commit, close."""
        self._stop.set()
        if self._doorbell is not None:
            self._doorbell.wake()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._doorbell is not None:
            self._doorbell.close()

    def restart_from_beginning(self) -> None:
        """The broker is a new, empty cluster (see :class:`BrokerWatch`): every record it holds
        was written after the loss, so read each partition from its beginning from now on.

        The consumer thread closes its consumer (its positions and group belong to the
        old cluster) and makes a new one; handlers see the new records at least once.
        """
        self._earliest = True
        self._restart.set()
        if self._doorbell is not None:
            self._doorbell.wake()

    # -- internals --------------------------------------------------------

    def _make_consumer(self) -> KafkaConsumer:
        cfg = self.config
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.kafka_bootstrap_servers,
            group_id=None if self.group_id is None else group_name(cfg, self.group_id),
            client_id=f"{self.name}",
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self._earliest else "latest",
            fetch_max_wait_ms=cfg.fetch_max_wait_ms(),
            session_timeout_ms=cfg.kafka_session_timeout_ms,
            heartbeat_interval_ms=cfg.kafka_heartbeat_interval_ms,
            max_poll_interval_ms=cfg.kafka_max_poll_interval_ms,
            # Whole fetched batches per poll, so offsets are committed at batch boundaries:
            # the embedded broker cannot resume a fetch inside a batch (it skips to the next
            # batch, and kafka-python waits forever for the records it skipped).
            max_poll_records=self.max_records,
            metrics_enabled=False,
            # Full fetches: the embedded broker keeps no fetch sessions (KIP-227), so the
            # session bookkeeping only costs CPU (measured: ~8 % of a fetch cycle).
            enable_incremental_fetch_sessions=False,
        )
        if self.group_id is None:
            parts = []
            for topic in self.topics:
                deadline = time.monotonic() + 10
                pids = consumer.partitions_for_topic(topic)
                while not pids and time.monotonic() < deadline:
                    time.sleep(0.2)
                    pids = consumer.partitions_for_topic(topic)
                parts += [TopicPartition(topic, p) for p in sorted(pids or [])]
            consumer.assign(parts)
            if self._earliest:
                consumer.seek_to_beginning(*parts)
            else:
                consumer.seek_to_end(*parts)
            # A private reader keeps no offsets: only the first reader on a new cluster starts
            # at its beginning; one made again after an error starts where it is told.
            self._earliest = self.from_beginning
            self.assigned.set()
        else:
            consumer.subscribe(self.topics)
        return consumer

    def _run(self) -> None:
        attempt = 0
        settled = False
        pending = wakeup.Pending()
        doorbell = self._doorbell
        fetch_wait = wakeup.FetchWait(floor_ms=self.config.fetch_max_wait_ms())
        linger = self.linger_s
        last_poll, busy = 0.0, False
        while not self._stop.is_set():
            try:
                if self._restart.is_set():
                    self._restart.clear()
                    logger.warning("consumer %s: the broker is a new cluster; reading it from the beginning", self.name)
                    self._close_consumer(commit=False)
                    self._assignment = set()
                    self.current = False
                    pending = wakeup.Pending()  # the new log's offsets start again at 0
                if self._consumer is None:
                    self._consumer = self._make_consumer()
                    attempt = 0
                    settled = False
                consumer = self._consumer
                if doorbell is not None and settled and not pending.outstanding(time.monotonic()):
                    # Everything announced is read: sleep until a producer rings (or the idle
                    # interval passes, a safety net) instead of fetching in vain.
                    idle_s = self.config.kafka_wakeup_idle_ms / 1000
                    if self._uncommitted:
                        idle_s = min(idle_s, max(0.0, self._committed_at + COMMIT_INTERVAL_S - time.monotonic()))
                    rings = doorbell.wait(idle_s)
                    if self._stop.is_set():
                        break
                    if self._restart.is_set():
                        continue
                    if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
                        self._flush_commits()
                    metrics.child(metrics.KAFKA_WAKEUPS, self.name, "ring" if rings else "idle").inc()
                    now = time.monotonic()
                    owned = {(tp.topic, tp.partition) for tp in self._assignment}
                    for ring in rings:
                        if (ring.topic, ring.partition) in owned:
                            pending.announce(ring.topic, ring.partition, ring.offset, now)
                    if fetch_wait.tick(now):
                        _set_fetch_wait(consumer, fetch_wait.ms)
                if doorbell is not None and busy and linger > 0:
                    # A burst: let the next fetch carry more of it.
                    gap = last_poll + linger - time.monotonic()
                    if gap > 0:
                        time.sleep(gap)
                if doorbell is None:
                    timeout = 200
                else:
                    # A group still joining keeps polling (poll drives the join); a poll lasts
                    # long enough for a fetch or two at the current wait.
                    if not settled:
                        timeout = 100
                    elif pending.outstanding(time.monotonic()):
                        timeout = POLL_MS + 2 * fetch_wait.ms
                    else:  # the idle interval's safety-net look: one fetch
                        timeout = 5 + 2 * fetch_wait.ms
                last_poll = time.monotonic()
                records = consumer.poll(timeout_ms=timeout)
                busy = bool(records)
                metrics.child(metrics.KAFKA_POLLS, self.name).inc()
                assignment = set(consumer.assignment())
                if assignment != self._assignment:
                    self.current = False
                    self._assignment = assignment
                    if self.on_assignment is not None:
                        self.on_assignment()
                settled = self.group_id is None or bool(assignment)
                if self.group_id is not None and settled:
                    self.assigned.set()
                if self.handler is not None:
                    for tp, msgs in records.items():
                        self._process_partition(tp, msgs)
                elif records:
                    self._process_batch(records)
                if doorbell is not None and not records and settled and pending.outstanding(time.monotonic()):
                    # Told of records, given none: the broker needs a longer wait to find them.
                    fetch_wait.missed(time.monotonic())
                    _set_fetch_wait(consumer, fetch_wait.ms)
                    metrics.child(metrics.KAFKA_FETCH_WAIT_MS, self.name).set(fetch_wait.ms)
                if doorbell is not None and settled:
                    now = time.monotonic()
                    # What lies before a partition's position is read (or was skipped: a consumer
                    # that starts at the end); what lies between it and the high watermark the
                    # fetch reported is not (more than one poll returns, or a ring was lost to a
                    # full doorbell queue): read on before sleeping. On a topic read by key
                    # prefix, only where this poll found records: most of its records are
                    # others', and chasing them would fetch for all of them.
                    for tp, position, high in _positions(consumer):
                        pending.read(tp.topic, tp.partition, position)
                        if (
                            high is not None
                            and high > position
                            and (tp.topic not in self.key_prefixes or tp in records)
                        ):
                            pending.announce(tp.topic, tp.partition, high - 1, now)
                self.current = self._is_current(consumer, assignment, pending)
                if self.after_poll is not None:
                    self.after_poll(consumer)
                if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
                    self._flush_commits()
                self.healthy = True
            except Exception as exc:  # noqa: BLE001 - keep the loop alive, with backoff
                self.healthy = False
                self.current = False
                delay = _backoff(attempt)
                attempt += 1
                logger.warning("consumer %s: %s; retrying in %.1fs", self.name, exc.__class__.__name__, delay)
                self._close_consumer(commit=False)
                self._stop.wait(delay)
        self._close_consumer(commit=True)

    @staticmethod
    def _is_current(consumer: KafkaConsumer, assignment: set[TopicPartition], pending: wakeup.Pending) -> bool:
        if not assignment or pending.outstanding(time.monotonic()):
            return False
        positions = _positions(consumer)
        if len(positions) < len(assignment):
            return False
        return all(high is not None and position >= high for _, position, high in positions)

    def _close_consumer(self, commit: bool) -> None:
        if commit:
            try:
                self._flush_commits()
            except Exception:
                logger.warning("consumer %s: final commit failed", self.name, exc_info=True)
        self._uncommitted.clear()
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            consumer.close(autocommit=False)
        except Exception:
            logger.debug("consumer close failed", exc_info=True)

    def _decode(self, msg: Any) -> Event | None:
        prefix = self.key_prefixes.get(msg.topic)
        if prefix is not None and not (msg.key or b"").startswith(prefix):
            return None
        try:
            env = Envelope.from_bytes(msg.value)
            metrics.child(metrics.EVENT_AGE_SECONDS, self.name).observe(max(0, now_ms() - env.occurred_at) / 1000)
            return env.parse()
        except Exception as exc:  # noqa: BLE001 - a record nobody can read is parked, not retried
            self._park(msg, f"undecodable: {exc.__class__.__name__}: {exc}")
            return None

    def _process_batch(self, records: dict[TopicPartition, list[Any]]) -> None:
        """Every partition of one poll in one handler call per topic (each partition's
        records in offset order, so order per key holds), then one commit for all of
        them: one database round trip and one offset commit per poll, not per partition.
        Topics go in the order the consumer was given them (the order their handlers are
        declared), so a view a handler reads is brought up to date before it runs."""
        by_topic: dict[str, list[Any]] = {t: [] for t in self.topics}
        for part in records.values():
            for m in part:
                by_topic.setdefault(m.topic, []).append(m)
        for topic, msgs in by_topic.items():
            if not msgs:
                continue
            handler = self.batch_handlers[topic]
            events = [e for m in msgs if (e := self._decode(m)) is not None]
            if events:
                self._call(functools.partial(handler, events), msgs)
        self._commit({tp: part[-1].offset + 1 for tp, part in records.items()})

    def _process_partition(self, tp: TopicPartition, msgs: list[Any]) -> None:
        assert self._consumer is not None
        handler = self.handler
        assert handler is not None
        for msg in msgs:
            ev = self._decode(msg)
            if ev is not None:
                self._call(functools.partial(handler, ev), [msg])
            if self._stop.is_set() and msg is not msgs[-1]:
                # Stop between records: commit what is done, the rest is re-read later.
                self._commit({tp: msg.offset + 1})
                self._consumer.seek(tp, msg.offset + 1)
                return
        self._commit({tp: msgs[-1].offset + 1})

    def _call(self, fn: Callable[[], None], msgs: list[Any]) -> None:
        attempt = 0
        while True:
            start = time.perf_counter()
            try:
                fn()
                metrics.child(metrics.EVENTS_HANDLED, self.name, "ok").inc(len(msgs))
                metrics.child(metrics.HANDLER_SECONDS, self.name).observe(time.perf_counter() - start)
                return
            except TRANSIENT_ERRORS as exc:
                # Broker or database away: keep the record, wait, try again.
                delay = _backoff(attempt)
                attempt += 1
                logger.warning("handler %s: transient %s; retry in %.1fs", self.name, exc.__class__.__name__, delay)
                if self._stop.wait(delay):
                    raise
            except Exception as exc:
                attempt += 1
                if attempt >= MAX_HANDLER_ATTEMPTS:
                    logger.exception("handler %s failed %d times; dead-lettering", self.name, attempt)
                    metrics.child(metrics.EVENTS_HANDLED, self.name, "dead_letter").inc(len(msgs))
                    for m in msgs:
                        self._park(m, f"{exc.__class__.__name__}: {exc}")
                    return
                time.sleep(_backoff(attempt, base=0.05))

    def _park(self, msg: Any, error: str) -> None:
        logger.error("parking record %s[%s]@%s: %s", msg.topic, msg.partition, msg.offset, error)
        if self.dead_letters is None:
            return
        value = msg.value.decode("utf-8", "replace") if isinstance(msg.value, bytes) else str(msg.value)
        key = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else None
        self.dead_letters.publish(
            DEAD_LETTERS,
            DeadLetter(
                topic=msg.topic,
                partition=msg.partition,
                offset=msg.offset,
                key=key,
                value=value,
                error=error[:2000],
                consumer_group=self.group_id or self.name,
            ),
            key=msg.topic,
        )

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Record that these offsets are handled; commit at most every COMMIT_INTERVAL_S.

        A commit is a broker round trip (~1 ms of kafka-python CPU): committing
        after every poll doubled a light consumer's requests. Offsets are
        still only committed once handled, so a crash redelivers at most an
        interval's worth of records, which every handler takes idempotently.
        """
        if self.group_id is None or self._consumer is None:
            return
        self._uncommitted.update(offsets)
        if time.monotonic() - self._committed_at >= COMMIT_INTERVAL_S:
            self._flush_commits()

    def _flush_commits(self) -> None:
        if not self._uncommitted or self._consumer is None:
            return
        offsets, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        self._consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})


def _set_fetch_wait(consumer: KafkaConsumer, ms: int) -> None:
    """Change a live consumer's fetch wait (kafka-python reads it from its fetcher's config
    at every fetch request; the public config is copied there at construction)."""
    fetcher = getattr(consumer, "_fetcher", None)
    config = getattr(fetcher, "config", None)
    if isinstance(config, dict) and "fetch_max_wait_ms" in config:
        config["fetch_max_wait_ms"] = ms
    else:  # a kafka-python that moved it: keep the wait it has, say so once
        logger.warning("cannot change the fetch wait of this kafka-python consumer")


class CompactedView:
    """An in-memory map key -> latest event, fed by a compacted topic read from the start.

    ``ready`` is set once everything present at start-up has been read, so a
    service can wait for a complete view before it routes. ``on_update`` is
    called (in the consumer thread) after each change, with the event the key
    held before it (None for a new key).
    """

    def __init__(
        self,
        config: SharedConfig,
        name: str,
        topic: Topic,
        key_of: Callable[[Event], str],
        on_update: Callable[[Event, Event | None], None] | None = None,
    ):
        self.name = name
        self.topic = topic
        self.key_of = key_of
        self.on_update = on_update
        self.data: dict[str, Event] = {}
        self.ready = threading.Event()
        self._end_offsets: dict[TopicPartition, int] | None = None
        self._worker = ConsumerWorker(config, name, [topic.name], None, handler=self._apply, from_beginning=True)
        self._worker.after_poll = self._check_ready

    def _apply(self, ev: Event) -> None:
        key = self.key_of(ev)
        previous = self.data.get(key)
        self.data[key] = ev
        if self.on_update is not None:
            self.on_update(ev, previous)

    def get(self, key: str) -> Event | None:
        return self.data.get(key)

    def start(self) -> None:
        self._worker.start()

    def _check_ready(self, consumer: KafkaConsumer) -> None:
        # Ready once the reader's positions reach the end offsets seen at its first poll.
        if self.ready.is_set():
            return
        parts = list(consumer.assignment())
        if not parts:
            return
        if self._end_offsets is None:
            self._end_offsets = consumer.end_offsets(parts)
        if all(consumer.position(tp) >= end for tp, end in self._end_offsets.items()):
            self.ready.set()

    def restart_from_beginning(self) -> None:
        """The broker is a new cluster: read the topic again from its beginning (what is known stays)."""
        self._worker.restart_from_beginning()

    def stop(self) -> None:
        self._worker.stop()
