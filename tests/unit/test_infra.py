"""helper.infra's port choice (never an ephemeral port, never one handed out twice) and the
stack's readiness check (the right service answered)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from chatlib.http import create_app
from werkzeug.serving import make_server

from helper.infra import LISTEN_PORTS_FROM, free_port, listen_ports_below
from helper.stack import Stack


def test_free_ports_lie_below_the_kernels_ephemeral_range_and_are_bindable() -> None:
    # An ephemeral port chosen for a server may be taken as the local port of any outgoing
    # connection before the server binds it (a CI run failed so: gateway-2 "address in use").
    limit = listen_ports_below()
    ports = {free_port() for _ in range(20)}
    assert all(LISTEN_PORTS_FROM <= p < limit for p in ports), ports
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_services_get_doorbells_with_the_embedded_broker_unless_they_are_turned_off(tmp_path: Path) -> None:
    stack = Stack.for_tests(tmp_path)
    assert stack.service_env("message-router")["KAFKA_WAKEUP_DIR"] == str(stack.wakeup_dir)
    stack.env["KAFKA_WAKEUP_DIR"] = "off"  # fetch loops, as the fetch-wait curve is measured
    assert stack.service_env("message-router")["KAFKA_WAKEUP_DIR"] == ""
    stack.env["KAFKA_WAKEUP_DIR"] = str(tmp_path / "bells")
    assert stack.service_env("message-router")["KAFKA_WAKEUP_DIR"] == str(tmp_path / "bells")


def test_free_port_never_hands_out_a_port_twice() -> None:
    """A stack picks a dozen ports before any server binds one: a bind test alone once gave
    profile and push-notification the same port (profile failed; push-notification answered
    profile's health check and Nginx's requests for it)."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_health_check_answered_by_another_service_is_not_ready(tmp_path: Path) -> None:
    app = create_app("push-notification")
    server = make_server("127.0.0.1", 0, app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack = Stack.for_tests(tmp_path)
        port = server.server_port
        assert stack.healthy(port, "push-notification") and stack.healthy(port)
        assert not stack.healthy(port, "profile")
    finally:
        server.shutdown()
