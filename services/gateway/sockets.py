"""The open sockets of this gateway instance.

The gateway has no storage; this module takes the place of ``storage.py``: it
holds the sockets. Each :class:`Connection` owns one writer (a greenlet under
the gevent runner) fed by a queue, so a slow client never blocks the Kafka
reader or other sockets. :class:`Hub` finds sockets by connection, device and
user.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from typing import Any, Protocol

from chatlib import metrics
from chatlib.schemas import now_ms
from simple_websocket import ConnectionClosed
from wsproto.events import TextMessage

from .logic import Identity, Sequencer, TokenBucket

logger = logging.getLogger(__name__)

#: WebSocket close codes the gateway uses.
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TRY_AGAIN = 1013
#: Seconds a client has to answer our close frame before the TCP connection is dropped.
CLOSE_GRACE_S = 5.0


class Transport(Protocol):
    """What a Connection needs from a WebSocket."""

    def send(self, text: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


class DaemonThread(threading.Thread):
    """The thread class simple_websocket runs each socket's reader in: daemon, so exit never waits for it."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["daemon"] = True
        super().__init__(*args, **kwargs)


class WsTransport:
    """A flask-sock (simple_websocket) server socket seen as a Transport."""

    def __init__(self, ws: Any):
        self.ws = ws

    def send(self, text: str) -> None:
        ws = self.ws
        if not ws.connected:
            raise ConnectionClosed(ws.close_reason, ws.close_message)
        # simple_websocket's own send uses sock.send, which may write part of a large
        # frame under gevent; encode with wsproto and sendall instead.
        ws.sock.sendall(ws.ws.send(TextMessage(data=text)))

    def close(self, code: int, reason: str) -> None:
        try:
            self.ws.close(reason=code, message=reason)
        except (ConnectionClosed, OSError):
            pass
        finally:
            self._wake()
        # A client that never answers the close frame must not hold the socket forever.
        timer = threading.Timer(CLOSE_GRACE_S, self._drop_if_still_open)
        timer.daemon = True
        timer.start()

    def _drop_if_still_open(self) -> None:
        reader = getattr(self.ws, "thread", None)
        if reader is not None and reader.is_alive():
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now (a client that stopped reading)."""
        try:
            self.ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.ws.connected = False
        self._wake()

    def _wake(self) -> None:
        # The socket's handler may be waiting in ws.receive(): let it see the close.
        self.ws.event.set()


def encode(frame: dict[str, Any]) -> str:
    """A server frame as WebSocket text."""
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)


_CLOSE = object()
_STOP = object()


class Connection:
    """One open socket: identity, its sequencer and rate limit, and its writer."""

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
        self._queue: queue.Queue[tuple[object, Any]] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name=f"ws-writer-{conn_id[:8]}", daemon=True)
        self._writer.start()

    # -- writing ----------------------------------------------------------

    def send_frame(self, frame: dict[str, Any]) -> bool:
        return self.send_text(encode(frame), str(frame.get("type", "?")))

    def send_text(self, text: str, kind: str = "?") -> bool:
        """Queue a text frame; False if the socket is closing or its client stopped reading."""
        if self.closing:
            return False
        if self._queue.qsize() >= self.queue_max:
            logger.warning(
                "socket %s: %d frames unsent, closing a client that stopped reading", self.conn_id, self.queue_max
            )
            self.abort()
            return False
        self._queue.put((text, kind))
        return True

    def close(self, code: int = 1000, reason: str = "", error: dict[str, Any] | None = None) -> None:
        """Write ``error`` (if any) after what is queued, then close with ``code``."""
        if self.closing:
            return
        if error is not None:
            self.send_frame(error)
        self.closing = True
        self._queue.put((_CLOSE, (code, reason)))

    def abort(self) -> None:
        """Close at once, dropping what is queued."""
        self.closing = True
        self.transport.abort()
        self._queue.put((_STOP, None))

    def stop(self) -> None:
        """The socket is gone: let the writer end."""
        self.closing = True
        self._queue.put((_STOP, None))

    def wait_written(self, timeout: float) -> bool:
        """Wait for the writer to finish (after close/stop); True if it did."""
        self._writer.join(timeout)
        return not self._writer.is_alive()

    def _write_loop(self) -> None:
        try:
            while True:
                item, arg = self._queue.get()
                if item is _STOP:
                    return
                if item is _CLOSE:
                    self.transport.close(*arg)
                    return
                self.transport.send(item)  # type: ignore[arg-type]
                metrics.WS_FRAMES.labels("out", arg).inc()
        except (ConnectionClosed, OSError):
            pass
        except Exception:
            logger.exception("socket %s: writer failed", self.conn_id)
            self.transport.abort()
        finally:
            self.closing = True


class Hub:
    """The registry of open sockets: by connection id, by device, by user."""

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
