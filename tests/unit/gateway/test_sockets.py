"""The gateway's own WebSocket server side, on a real socket pair with a wsproto client at the other end."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from wsproto.connection import Connection as FrameConnection
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection, Event, Ping, Pong, TextMessage

from services.gateway.logic import Identity, upgrade_problem
from services.gateway.sockets import Connection, WsTransport, accept_key, accept_response

UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "keep-alive, Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


def test_accept_key_is_the_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    answer = accept_response("dGhlIHNhbXBsZSBub25jZQ==").decode()
    assert answer.startswith("HTTP/1.1 101 ")
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    # No extension is ever accepted (permessage-deflate costs memory per socket).
    assert "Extensions" not in answer and answer.endswith("\r\n\r\n")


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({}, None),
        ({"Upgrade": "WebSocket"}, None),
        ({"Upgrade": "h2c"}, "a WebSocket upgrade is required"),
        ({"Connection": "keep-alive"}, "a WebSocket upgrade is required (Connection: Upgrade)"),
        ({"Sec-WebSocket-Version": "8"}, "Sec-WebSocket-Version must be 13"),
        ({"Sec-WebSocket-Key": "short"}, "Sec-WebSocket-Key is missing or malformed"),
    ],
)
def test_upgrade_problem(change: dict[str, str], problem: str | None) -> None:
    assert upgrade_problem({**UPGRADE, **change}) == problem


class Client:
    """The other end of the pair: a wsproto client connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.proto = FrameConnection(ConnectionType.CLIENT)
        self.sock.settimeout(5)
        self.pending: list[Event] = []

    def send(self, event: Event) -> None:
        self.sock.sendall(self.proto.send(event))

    def next(self) -> Event | None:
        """The next event from the server; None once the socket ended."""
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.proto.receive_data(data)
            self.pending += list(self.proto.events())
        return self.pending.pop(0)


class Served:
    """A WsTransport and its Connection, read by ``run`` in a thread."""

    def __init__(self, ping_s: float = 0.0, max_bytes: int = 1000):
        server, client = socket.socketpair()
        self.transport = WsTransport(server)
        self.conn = Connection(self.transport, Identity("u1", "d1"), "c1", rate=0, queue_max=100)
        self.received: list[Any] = []
        self.client = Client(client)
        self.thread = threading.Thread(
            target=self.transport.run, args=(self.conn, self.received.append, ping_s, max_bytes), daemon=True
        )
        self.thread.start()

    def ended(self, timeout: float = 5.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    yield s
    s.transport.finish()
    s.client.sock.close()


def wait_for(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_text_messages_in_whole_and_in_fragments(served: Served) -> None:
    served.client.send(TextMessage(data='{"type":"ping"}'))
    served.client.send(TextMessage(data="hel", message_finished=False))
    served.client.send(TextMessage(data="lo", message_finished=True))
    wait_for(lambda: len(served.received) == 2)
    assert served.received == ['{"type":"ping"}', "hello"]


def test_frames_out_in_order_and_pings_answered(served: Served) -> None:
    for i in range(3):
        assert served.conn.send_text(f"frame {i}", "message")
    served.client.send(Ping(payload=b"p1"))
    got = [served.client.next() for _ in range(4)]
    texts = [e.data for e in got if isinstance(e, TextMessage)]
    assert texts == ["frame 0", "frame 1", "frame 2"]
    assert [e.payload for e in got if isinstance(e, Pong)] == [b"p1"]
    # The writer ends once nothing waits: an idle socket has none.
    wait_for(lambda: served.conn.wait_written(0))


def test_client_close_is_answered_and_ends_the_reader(served: Served) -> None:
    served.client.send(CloseConnection(code=1000, reason="bye"))
    answer = served.client.next()
    assert isinstance(answer, CloseConnection) and answer.code == 1000
    assert served.ended()


def test_server_close_sends_the_error_then_the_close_frame(served: Served) -> None:
    served.conn.close(1008, "logged out", {"type": "error", "code": "unauthorized", "message": "logged out"})
    first, second = served.client.next(), served.client.next()
    assert isinstance(first, TextMessage) and '"unauthorized"' in first.data
    assert isinstance(second, CloseConnection) and (second.code, second.reason) == (1008, "logged out")
    assert not served.conn.send_text("late")  # nothing is queued after the close
    served.client.send(second.response())
    assert served.ended()


def test_over_size_message_closes_with_1009(served: Served) -> None:
    served.client.send(TextMessage(data="x" * 600, message_finished=False))
    served.client.send(TextMessage(data="y" * 600, message_finished=True))
    answer = served.client.next()
    assert isinstance(answer, CloseConnection) and answer.code == 1009
    assert served.ended()
    assert served.received == []


def test_silent_client_is_pinged_then_dropped() -> None:
    s = Served(ping_s=0.2)
    try:
        ping = s.client.next()
        assert isinstance(ping, Ping)
        s.client.send(ping.response())  # answered: the socket stays
        assert isinstance(s.client.next(), Ping)  # silent again: pinged again
        assert s.ended(2.0)  # and this one goes unanswered: dropped
        assert s.transport.done
    finally:
        s.transport.finish()
        s.client.sock.close()


def test_abort_ends_the_reader(served: Served) -> None:
    served.conn.abort()
    assert served.ended()
    assert served.client.next() is None


class GeventLikeSocket:
    """What try_write looks for: gevent's socket exposes its OS socket, non-blocking, as ``_sock``."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self._sock = sock


def test_try_write_writes_what_the_kernel_takes_and_returns_the_rest() -> None:
    server, client = socket.socketpair()
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport = WsTransport(GeventLikeSocket(server))
        assert transport.try_write("hello") is None
        reader = Client(client)
        got = reader.next()
        assert isinstance(got, TextMessage) and got.data == "hello"
        # Nobody reads any more: the buffers fill, and what the kernel did not take comes back.
        rests = [transport.try_write(b"x" * 65536) for _ in range(40)]
        assert rests[0] is not None and all(r == b"x" * 65536 for r in rests[-3:])
        assert len(rests[0]) < 65536  # part of the first one was taken
    finally:
        server.close()
        client.close()
    # a socket that does not expose a non-blocking OS socket is left to the writer
    plain, other = socket.socketpair()
    try:
        data = WsTransport(plain).try_write(b"abc")
        assert data == b"abc"
    finally:
        plain.close()
        other.close()


class PartialTransport:
    """Takes ``take`` bytes of the first frame at once, nothing after; the writer writes the rest."""

    def __init__(self, take: int):
        self.take = take
        self.tried: list[str | bytes] = []
        #: what the writer wrote, in order: frame bytes and text frames
        self.out: list[str | bytes] = []

    def try_write(self, item: str | bytes) -> bytes | None:
        data = item.encode() if isinstance(item, str) else item
        self.tried.append(item)
        taken, self.take = self.take, 0
        return None if taken >= len(data) else data[taken:]

    def send(self, text: str) -> None:
        self.out.append(text)

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self, code: int, reason: str) -> None:
        pass

    def abort(self) -> None:
        pass


def test_a_frame_the_kernel_took_whole_needs_no_writer() -> None:
    transport = PartialTransport(take=100)
    conn = Connection(transport, Identity("u1", "d1"), "c1", rate=0, queue_max=10)
    assert conn.send_text("first", "message")
    assert transport.tried == ["first"] and conn.wait_written(0)  # no writer was started


def test_what_the_kernel_did_not_take_goes_first_then_the_frames_after_it_in_order() -> None:
    transport = PartialTransport(take=2)
    conn = Connection(transport, Identity("u1", "d1"), "c1", rate=0, queue_max=10)
    assert conn.send_text("first", "message")
    assert conn.send_text("second", "message")
    conn.send_raw(b"pong", "pong")
    wait_for(lambda: conn.wait_written(0) and len(transport.out) == 3)
    # (the writer may be done with the rest before "second" comes: then it is tried at once too)
    assert transport.tried[0] == "first"
    assert [x if isinstance(x, bytes) else x.encode() for x in transport.out] == [b"rst", b"second", b"pong"]
