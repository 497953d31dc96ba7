"""helper.infra's port choice: ports the stacks listen on are never ephemeral ones."""

from __future__ import annotations

import socket
from pathlib import Path

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
