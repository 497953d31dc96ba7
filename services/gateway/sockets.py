"""The open sockets of this gateway instance.

The gateway has no storage; this module takes the place of ``storage.py``: it
holds the sockets. What one socket costs is what bounds how many one process
holds (docs/benchmarks.md, "Connections"), so each keeps only:

- :class:`WsTransport`: the socket the gateway took over from gunicorn after
  answering the upgrade itself (:func:`accept`), and wsproto's frame protocol;
- one greenlet, the socket's reader (:meth:`WsTransport.run`): frames in, a
  ping to a client that has been silent for a ping interval, the close
  handshake. It starts fresh, so it does not keep gunicorn's request, Flask's
  contexts and a deep stack alive for the socket's whole life;
- :class:`Connection`: the identity, its sequencer and rate limit, and the
  frames not written yet. A frame is written at once when nothing waits and
  the kernel takes it without blocking (the usual case: no greenlet, no
  hand-over); otherwise a writer runs while frames wait (so a slow client
  never blocks the Kafka reader or other sockets, and an idle socket has no
  writer at all).

permessage-deflate is never negotiated: zlib keeps its compressor and
decompressor state per socket (measured: 160 KB per idle socket with it,
57 KB without, before this module), and chat frames are small JSON.
:class:`Hub` finds sockets by connection, device and user.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from chatlib import metrics
from chatlib.schemas import now_ms
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

from .logic import Identity, Sequencer, TokenBucket

logger = logging.getLogger(__name__)

#: WebSocket close codes the gateway uses.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
#: Seconds a client has to answer our close frame before the TCP connection is dropped.
CLOSE_GRACE_S = 5.0
#: Bytes read from a socket at a time.
RECV_BYTES = 4096
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Transport(Protocol):
    """What a Connection needs from a WebSocket (``try_write`` is optional)."""

    def send(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


# -- greenlets or threads -------------------------------------------------------

_patched: bool | None = None


def _gevent_patched() -> bool:
    global _patched
    if _patched is None:
        try:
            from gevent import monkey

            _patched = bool(monkey.is_module_patched("threading"))
        except ImportError:  # pragma: no cover - gevent is a runtime dependency
            _patched = False
    return _patched


def spawn(fn: Callable[[], None], name: str) -> Any:
    """Run ``fn`` concurrently: a bare greenlet under the services' runner (a few hundred
    bytes, no Thread object), a daemon thread otherwise (unit tests). The result has
    ``join(timeout)``."""
    if _gevent_patched():
        import gevent

        return gevent.spawn(fn)
    t = threading.Thread(target=fn, name=name, daemon=True)
    t.start()
    return t


def _alive(runner: Any) -> bool:
    dead = getattr(runner, "dead", None)
    return not dead if dead is not None else bool(runner.is_alive())


# -- the upgrade ------------------------------------------------------------------


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _WS_GUID).digest()).decode()  # noqa: S324 - the RFC's hash


def accept_response(key: str) -> bytes:
    """The 101 answer to a valid upgrade request: no extension, no subprotocol."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n"
    ).encode()


class WsTransport:
    """A server WebSocket on a socket taken over after the upgrade (see :func:`accept`)."""

    __slots__ = ("_closed_fd", "done", "proto", "sock")

    def __init__(self, sock: Any):
        self.sock = sock
        self.proto = FrameConnection(ConnectionType.SERVER)
        #: The reader has ended (the socket is finished).
        self.done = False
        self._closed_fd = False

    # -- Transport (called by the Connection's writer) --

    def send(self, text: str) -> None:
        self.write(self.proto.send(TextMessage(data=text)))

    def write(self, data: bytes) -> None:
        """Raw frame bytes (pongs, pings, close replies), in the writer's order."""
        self.sock.sendall(data)

    def try_write(self, item: str | bytes) -> bytes | None:
        """Write a text frame (str) or frame bytes now, without waiting: None once all of it is
        written, else the bytes the kernel did not take (all of them if it took none).

        Only gevent's socket exposes its OS socket (``_sock``, non-blocking: gevent waits
        for it itself); on any other socket nothing is written here and the writer does it.
        """
        data = self.proto.send(TextMessage(data=item)) if isinstance(item, str) else item
        raw = getattr(self.sock, "_sock", None)
        if raw is None:
            return data
        try:
            sent = raw.send(data)
        except BlockingIOError:
            return data
        return None if sent == len(data) else data[sent:]

    def close(self, code: int, reason: str) -> None:
        """Send our close frame; a client that does not answer it is dropped after CLOSE_GRACE_S."""
        try:
            if self.proto.state is ConnectionState.OPEN:
                self.sock.sendall(self.proto.send(CloseConnection(code=code, reason=reason)))
        except (OSError, LocalProtocolError):
            self.abort()
            return
        timer = threading.Timer(CLOSE_GRACE_S, self._drop_if_still_open)
        timer.daemon = True
        timer.start()

    def _drop_if_still_open(self) -> None:
        if not self.done:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now (the reader sees it end)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def finish(self) -> None:
        """Close the descriptor (once)."""
        self.done = True
        if not self._closed_fd:
            self._closed_fd = True
            try:
                self.sock.close()
            except OSError:
                pass

    # -- the reader --

    def run(
        self, conn: Connection, on_message: Callable[[str | bytes], None], ping_interval_s: float, max_bytes: int
    ) -> None:
        """Read frames until the socket ends: messages to ``on_message``, pings answered.

        The socket's only greenlet. A client silent for ``ping_interval_s`` is
        pinged; silent for another interval (no pong, no frame), it is
        dropped. A message over ``max_bytes`` (fragments included) closes the
        socket with 1009 before more of it is buffered.
        """
        sock, proto = self.sock, self.proto
        sock.settimeout(ping_interval_s if ping_interval_s > 0 else None)
        pinged = False
        parts: list[Any] = []
        size = 0
        try:
            while True:
                try:
                    data = sock.recv(RECV_BYTES)
                except TimeoutError:
                    if pinged or conn.closing:
                        logger.debug("socket %s: no answer to a ping, dropped", conn.conn_id)
                        return
                    pinged = True
                    conn.send_raw(proto.send(Ping()), "ping")
                    continue
                if not data:
                    return
                pinged = False
                proto.receive_data(data)
                for event in proto.events():
                    if isinstance(event, Message):
                        size += len(event.data)
                        if size > max_bytes:
                            conn.close_raw(proto.send(CloseConnection(CLOSE_TOO_BIG, "Message is too big")))
                            return
                        parts.append(event.data)
                        if not event.message_finished:
                            continue
                        message = _joined(parts, isinstance(event, TextMessage))
                        parts, size = [], 0
                        if not conn.closing:  # what comes after our close is not read
                            on_message(message)
                    elif isinstance(event, Ping):
                        conn.send_raw(proto.send(event.response()), "pong")
                    elif isinstance(event, CloseConnection):
                        if proto.state is ConnectionState.REMOTE_CLOSING:
                            conn.close_raw(proto.send(event.response()))
                        elif proto.state is ConnectionState.OPEN:  # a protocol error wsproto found
                            conn.close_raw(proto.send(CloseConnection(event.code, event.reason)))
                        return
        except (OSError, LocalProtocolError):
            return
        finally:
            self.done = True


def _joined(parts: list[Any], text: bool) -> str | bytes:
    if len(parts) == 1:
        return parts[0]  # type: ignore[no-any-return]
    return "".join(parts) if text else b"".join(bytes(p) for p in parts)


def encode(frame: dict[str, Any]) -> str:
    """A server frame as WebSocket text."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


_CLOSE = object()
_STOP = object()
#: Hands the writer role over between the writer and whoever queues (real threads in unit
#: tests; under gevent nothing switches inside it). One lock for every socket: no per-socket cost.
_HANDOVER = threading.Lock()


class Connection:
    """One open socket: identity, its sequencer and rate limit, and the frames not written yet."""

    __slots__ = (
        "_out",
        "_writer",
        "bucket",
        "closing",
        "conn_id",
        "connected_at",
        "key",
        "queue_max",
        "sequencer",
        "transport",
        "who",
    )

    def __init__(
        self, transport: Transport, who: Identity, conn_id: str, rate: float, queue_max: int, gap_grace_s: float = 0.0
    ):
        self.transport = transport
        self.who = who
        self.conn_id = conn_id
        self.key = (who.user_id, who.device_id)
        self.connected_at = now_ms()
        now = time.monotonic()
        self.sequencer = Sequencer(now=now, gap_grace_s=gap_grace_s)
        self.bucket = TokenBucket(rate, now=now)
        self.queue_max = queue_max
        self.closing = False
        #: (text frame, its type) | (raw bytes, their kind) | (_CLOSE, (code, reason)) | (_STOP, None)
        self._out: deque[tuple[object, Any]] = deque()
        #: the running writer (greenlet or thread), None while nothing waits
        self._writer: Any = None

    # -- writing ----------------------------------------------------------

    def send_frame(self, frame: dict[str, Any]) -> bool:
        return self.send_text(encode(frame), str(frame.get("type", "?")))

    def send_text(self, text: str, kind: str = "?") -> bool:
        """Queue a text frame; False if the socket is closing or its client stopped reading."""
        if self.closing:
            return False
        if len(self._out) >= self.queue_max:
            logger.warning(
                "socket %s: %d frames unsent, closing a client that stopped reading", self.conn_id, self.queue_max
            )
            self.abort()
            return False
        self._queue((text, kind))
        return True

    def send_raw(self, data: bytes, kind: str) -> None:
        """Queue frame bytes already encoded (control frames), in order with the text frames."""
        if not self.closing:
            self._queue((data, kind))

    def close_raw(self, data: bytes) -> None:
        """Queue the last frame bytes this socket sends (a close reply), then nothing more."""
        if self.closing:
            return
        self.closing = True
        self._queue((data, "close"))
        self._queue((_STOP, None))

    def close(self, code: int = CLOSE_NORMAL, reason: str = "", error: dict[str, Any] | None = None) -> None:
        """Write ``error`` (if any) after what is queued, then close with ``code``."""
        if self.closing:
            return
        if error is not None:
            self.send_frame(error)
        self.closing = True
        self._queue((_CLOSE, (code, reason)))

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
        self.closing = True
        self._out.clear()
        self.transport.abort()

    def stop(self) -> None:
        """The socket is gone: let the writer end once what is queued is out."""
        self.closing = True
        if self._writer is not None:
            self._queue((_STOP, None))

    def wait_written(self, timeout: float) -> bool:
        """Wait for the writer to finish (after close/stop); True if it did."""
        writer = self._writer
        if writer is None:
            return True
        writer.join(timeout)
        return not _alive(writer)

    def _queue(self, item: tuple[object, Any]) -> None:
        with _HANDOVER:
            if self._writer is None and not self._out:
                item = self._write_now(item)
                if item is None:
                    return
            self._out.append(item)
            if self._writer is None:
                self._writer = spawn(self._write_loop, f"ws-writer-{self.conn_id[:8]}")

    def _write_now(self, item: tuple[object, Any]) -> tuple[object, Any] | None:
        """With nothing queued: write a frame at once if the kernel takes it; what it does not
        take (as frame bytes) is returned for the writer. None: nothing is left to do."""
        data, kind = item
        try_write = getattr(self.transport, "try_write", None)
        if try_write is None or not isinstance(data, (str, bytes)):
            return item
        try:
            rest = try_write(data)
        except OSError:  # a broken socket: its reader sees it end
            self.closing = True
            return None
        except LocalProtocolError:
            logger.warning("socket %s: frame after the close handshake, dropped", self.conn_id)
            self.closing = True
            self.transport.abort()
            return None
        if isinstance(data, str):
            metrics.child(metrics.WS_FRAMES, "out", kind).inc()
        return None if rest is None else (rest, kind)

    def _write_loop(self) -> None:
        transport = self.transport
        try:
            while True:
                with _HANDOVER:
                    if not self._out:
                        self._writer = None
                        return
                    item, arg = self._out.popleft()
                if item is _STOP:
                    break
                if item is _CLOSE:
                    transport.close(*arg)
                    break
                if isinstance(item, bytes):
                    transport.write(item)  # type: ignore[attr-defined]
                    continue
                transport.send(item)  # type: ignore[arg-type]
                metrics.child(metrics.WS_FRAMES, "out", arg).inc()
        except OSError:
            self.closing = True
        except Exception:
            logger.exception("socket %s: writer failed", self.conn_id)
            self.closing = True
            transport.abort()
        with _HANDOVER:
            # Ended by a close, a stop or a broken socket: nothing queued will be written.
            self._out.clear()
            self._writer = None
        self.closing = True


class Hub:
    """The registry of open sockets: by connection id, by device and by user."""

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._devices: dict[tuple[str, str], dict[str, Connection]] = {}
        self._users: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def add(self, conn: Connection) -> None:
        self._conns[conn.conn_id] = conn
        self._devices.setdefault(conn.key, {})[conn.conn_id] = conn
        self._users.setdefault(conn.who.user_id, set()).add(conn.who.device_id)

    def remove(self, conn: Connection) -> bool:
        """Forget the socket; True only for the first call (whoever gets True reports the disconnect)."""
        if self._conns.pop(conn.conn_id, None) is None:
            return False
        conns = self._devices.get(conn.key)
        if conns is not None:
            conns.pop(conn.conn_id, None)
            if not conns:
                del self._devices[conn.key]
                devices = self._users.get(conn.who.user_id)
                if devices is not None:
                    devices.discard(conn.who.device_id)
                    if not devices:
                        del self._users[conn.who.user_id]
        return True

    def get(self, conn_id: str) -> Connection | None:
        return self._conns.get(conn_id)

    def device(self, user_id: str, device_id: str) -> list[Connection]:
        return list(self._devices.get((user_id, device_id), {}).values())

    def user(self, user_id: str) -> list[Connection]:
        return [c for d in sorted(self._users.get(user_id, ())) for c in self.device(user_id, d)]

    def all(self) -> list[Connection]:
        return list(self._conns.values())

    def heartbeat_entries(self) -> list[tuple[str, str, str]]:
        """(user_id, device_id, conn_id) of every open socket."""
        return [(c.who.user_id, c.who.device_id, c.conn_id) for c in self._conns.values()]
