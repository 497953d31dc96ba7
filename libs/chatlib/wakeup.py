"""Fetch wake-ups: what a Kafka broker's fetch purgatory does, for a broker that has none.

Apache Kafka holds a consumer's fetch until records arrive (or
``fetch.max.wait.ms`` passes) and answers the moment a produce lands, so a
consumer can wait long and still hear of new records at once. The embedded
broker (Tansu) does not: it sleeps out the whole wait even when records are
there, so a consumer must choose between a short wait (every idle consumer
fetching hundreds of times a second; kafka-python spends about a millisecond
of CPU per fetch) and a long one (every hop waiting half of it).

With a wake-up directory configured (``KAFKA_WAKEUP_DIR``, which ``make run``
and the test stack set for the embedded broker), producers ring a doorbell
when the broker has acknowledged records of a topic, and consumers of that
topic sleep on their doorbell between fetches: they fetch (with the broker's
shortest wait) when rung, or after an idle interval as a safety net. The
records themselves only ever travel through Kafka; a ring is a hint that
carries nothing, and a lost ring only delays a consumer until its idle
interval. Against Apache Kafka the directory stays empty and consumers
long-poll as usual.

Mechanics, all on one machine: each doorbell is a Linux abstract-namespace
datagram socket (nothing on disk to clean up; it vanishes with its process)
named ``\\0chat-wakeup/<id>``, registered by an empty file
``<dir>/<topic>/<id>`` per topic it listens to. A ring sends one byte to
every registered doorbell of the topic, naming the partition and offset of the
record; a doorbell whose process is gone refuses it and its registration is
removed. A consumer that is rung fetches until it has read that offset (it
ignores rings for records it already has and for partitions it does not
own), so a ring is never lost to a fetch that was already under way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import metrics

logger = logging.getLogger(__name__)

_NAME_PREFIX = b"\0chat-wakeup/"
#: Seconds a topic's listing of doorbells is trusted when the directory's mtime is unchanged.
_LISTING_TTL_S = 1.0


_RING_MAX = 512


def _address(bell_id: str) -> bytes:
    return _NAME_PREFIX + bell_id.encode()


@dataclass(frozen=True)
class Ring:
    """What a ring says: the record at ``offset`` of ``topic``/``partition`` is readable now.

    A consumer that has read past that offset ignores the ring (a fetch it
    already made found the record); otherwise it fetches until it has.
    """

    topic: str
    partition: int
    offset: int

    def encode(self) -> bytes:
        return f"{self.topic} {self.partition} {self.offset}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ring | None:
        try:
            topic, partition, offset = raw.decode().split(" ")
            return cls(topic, int(partition), int(offset))
        except ValueError:
            return None  # a bare wake-up (see Doorbell.wake)


class Doorbell:
    """A consumer's doorbell: registered for its topics, woken by :class:`Ringer.ring`."""

    def __init__(self, directory: Path, topics: Iterable[str], key_prefixes: dict[str, bytes] | None = None):
        self.directory = directory
        self.topics = sorted(set(topics))
        #: topic -> the key prefix of the records this consumer reads (others are not rung for)
        self.key_prefixes = dict(key_prefixes or {})
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(_address(self.id))
        self._registered: list[Path] = []
        self.register()

    def register(self) -> None:
        """(Re)create the registration files; idempotent.

        The file is named after the doorbell, plus ``~`` and the hex of the key
        prefix when the consumer reads only records whose key starts with it.
        """
        for topic in self.topics:
            folder = self.directory / topic
            folder.mkdir(parents=True, exist_ok=True)
            prefix = self.key_prefixes.get(topic)
            path = folder / (self.id if prefix is None else f"{self.id}~{prefix.hex()}")
            if not path.exists():
                path.touch()  # a new entry changes the folder's mtime: ringers list it again
            if path not in self._registered:
                self._registered.append(path)

    def wait(self, timeout: float) -> list[Ring]:
        """Sleep until rung or ``timeout`` seconds passed; every ring pending (empty: timed out).

        Cooperative under gevent (the socket module is patched), a plain
        blocking wait otherwise.
        """
        self._sock.settimeout(timeout)
        try:
            first = self._sock.recv(_RING_MAX)
        except OSError:  # the timeout (socket.timeout is an OSError) or a closed doorbell
            return []
        return [r for r in (Ring.decode(first), *self._drain()) if r is not None]

    def wake(self) -> None:
        """Wake this doorbell from its own process (a stopping consumer must not sleep on)."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"", _address(self.id))

    def _drain(self) -> list[Ring | None]:
        # Timeout 0, not MSG_DONTWAIT: gevent's socket waits on EAGAIN unless its timeout is 0.
        self._sock.settimeout(0)
        out = []
        while True:
            try:
                out.append(Ring.decode(self._sock.recv(_RING_MAX)))
            except OSError:
                return out

    def close(self) -> None:
        for path in self._registered:
            with contextlib.suppress(OSError):
                path.unlink()
        self._registered.clear()
        with contextlib.suppress(OSError):
            self._sock.close()


class Ringer:
    """Rings the doorbells of a topic's consumers; one per process, shared by its producers."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        #: topic -> (folder mtime, listed at, [(doorbell address, key prefix or None, file name)])
        self._listing: dict[str, tuple[int, float, list[tuple[bytes, bytes | None, str]]]] = {}
        self._folders: dict[str, str] = {}
        self._lock = threading.Lock()

    def _bells(self, topic: str) -> list[tuple[bytes, bytes | None, str]]:
        # One stat per ring (a new doorbell changes the folder's mtime); the path string is
        # kept, as pathlib's joins and stat wrapper cost more than the syscall.
        folder = self._folders.get(topic)
        if folder is None:
            folder = self._folders[topic] = os.path.join(self.directory, topic)
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            return []
        now = time.monotonic()
        cached = self._listing.get(topic)
        if cached is not None and cached[0] == mtime and now - cached[1] < _LISTING_TTL_S:
            return cached[2]
        bells = []
        try:
            for name in os.listdir(folder):
                bell_id, _, prefix = name.partition("~")
                try:
                    bells.append((_address(bell_id), bytes.fromhex(prefix) if prefix else None, name))
                except ValueError:
                    continue  # not one of ours
        except OSError:
            pass
        self._listing[topic] = (mtime, now, bells)
        return bells

    def ring(self, topic: str, partition: int, offset: int, key: bytes | None = None) -> None:
        """Tell the consumers of ``topic`` (those reading records with this key) that the record
        at ``offset`` of ``partition`` is there. Never blocks, never raises."""
        payload = Ring(topic, partition, offset).encode()
        with self._lock:
            stale = []
            for addr, prefix, name in self._bells(topic):
                if prefix is not None and not (key or b"").startswith(prefix):
                    continue
                try:
                    self._sock.sendto(payload, socket.MSG_DONTWAIT, addr)
                except BlockingIOError:
                    # Its queue is full (net.unix.max_dgram_qlen, 10 by default): it has rings
                    # pending, and its next fetch's high watermarks show it this record.
                    metrics.child(metrics.KAFKA_RINGS_DROPPED, topic).inc()
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                        stale.append(name)
            for name in stale:
                # The doorbell's process is gone: drop its registration.
                with contextlib.suppress(OSError):
                    (self.directory / topic / name).unlink()
                self._listing.pop(topic, None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


_ringers: dict[Path, Ringer] = {}
_ringers_lock = threading.Lock()


def ringer(directory: str | Path | None) -> Ringer | None:
    """The process's ringer for ``directory`` (None when wake-ups are off)."""
    if not directory:
        return None
    path = Path(directory)
    with _ringers_lock:
        found = _ringers.get(path)
        if found is None:
            found = _ringers[path] = Ringer(path)
        return found


class Pending:
    """The records a consumer was told of (by rings, or by a fetch's high watermark) but has
    not read yet: while any is outstanding it keeps fetching; once none is, it may sleep.

    An announcement that is not read within ``grace_s`` (its partition moved to
    another group member) is dropped, so a consumer never fetches in vain for
    long. The grace is long enough for the fetch wait to widen from its floor to
    its cap (:class:`FetchWait`): a broker whose log grew (or whose CPU is
    scarce) may need that many empty fetches before one finds the records, and
    a consumer that gave up sooner would sleep on records it was told of.
    """

    def __init__(self, grace_s: float = 5.0):
        self.grace_s = grace_s
        #: (topic, partition) -> (highest announced offset, deadline)
        self._want: dict[tuple[str, int], tuple[int, float]] = {}
        #: (topic, partition) -> next offset to read
        self._read: dict[tuple[str, int], int] = {}

    def announce(self, topic: str, partition: int, offset: int, now: float) -> None:
        """The record at ``offset`` is readable (a ring, or a high watermark above what was read)."""
        key = (topic, partition)
        if offset < self._read.get(key, 0):
            return  # already read: the fetch that read it was under way when the ring came
        current = self._want.get(key)
        if current is None or offset > current[0]:
            self._want[key] = (offset, now + self.grace_s)

    def read(self, topic: str, partition: int, next_offset: int) -> None:
        """Records before ``next_offset`` of this partition have been read."""
        key = (topic, partition)
        if next_offset > self._read.get(key, 0):
            self._read[key] = next_offset
        want = self._want.get(key)
        if want is not None and want[0] < next_offset:
            del self._want[key]

    def outstanding(self, now: float) -> bool:
        """True while an announced record is unread and its grace has not run out."""
        for key, (_, deadline) in list(self._want.items()):
            if deadline < now:
                del self._want[key]
        return bool(self._want)


class FetchWait:
    """The fetch wait (ms) a woken consumer asks the embedded broker for, widened when needed.

    Tansu's memory storage lists every record batch of a partition on each
    fetch that returns data, and only finds them within the fetch's wait:
    about 1 µs a batch (measured: 1,000 batches need 2 ms, 8,000 need 8 ms,
    32,000 need 30 ms). A fetch with too short a wait comes back empty
    however long the consumer asks again. So the wait starts at the floor
    (each hop then costs about 1 ms at the broker) and doubles whenever a
    fetch for records a ring announced comes back empty; after ``decay_s``
    without such a miss it is narrowed again by a quarter, and a miss widens
    it back. Hop latency grows with the broker's log; a restarted broker
    starts from the floor again.
    """

    def __init__(self, floor_ms: int = 1, cap_ms: int = 500, decay_s: float = 30.0):
        self.floor_ms = floor_ms
        self.cap_ms = cap_ms
        self.decay_s = decay_s
        self.ms = floor_ms
        self._changed_at = 0.0

    def missed(self, now: float) -> None:
        """A fetch for announced records came back empty: wait longer."""
        self.ms = min(self.cap_ms, self.ms * 2)
        self._changed_at = now

    def tick(self, now: float) -> bool:
        """Narrow the wait again after a quiet spell (the log may have been reset); True if changed."""
        if self.ms > self.floor_ms and now - self._changed_at > self.decay_s:
            self.ms = max(self.floor_ms, (self.ms * 3) // 4)
            self._changed_at = now
            return True
        return False
