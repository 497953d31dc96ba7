"""GET /v1/ws: the WebSocket endpoint (flask-sock).

Checks made before the upgrade, as plain HTTP errors: the identity Nginx
verified (401 without it) and the browser Origin (403 if present and not
allowed). Nothing here logs the token, the query string or a frame's body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from chatlib.errors import forbidden
from chatlib.http import DEVICE_TYPE_HEADER, PRIMARY_HEADER, identity
from flask import Blueprint, g, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from .logic import Identity, origin_allowed
from .sockets import WsTransport

if TYPE_CHECKING:
    from .service import Gateway

logger = logging.getLogger(__name__)


def blueprint(svc: Gateway) -> Blueprint:
    """The gateway's routes, bound to the running service."""
    bp = Blueprint("gateway", __name__)
    sock = Sock()

    @bp.before_request
    def check_upgrade() -> None:
        """Refuse before the upgrade: no verified identity -> 401, a foreign browser Origin -> 403."""
        user_id, device_id = identity()
        host = request.headers.get("X-Forwarded-Host") or request.headers.get("Host")
        if not origin_allowed(request.headers.get("Origin"), svc.origins, host):
            raise forbidden("origin not allowed")
        g.who = Identity(
            user_id=user_id,
            device_id=device_id,
            device_type=request.headers.get(DEVICE_TYPE_HEADER) or "mobile",
            primary=request.headers.get(PRIMARY_HEADER, "") == "1",
        )

    @sock.route("/v1/ws", bp=bp)
    def ws(ws: Any) -> None:
        """One device's socket: frames in until it closes, then the disconnect is reported."""
        conn = svc.open_socket(WsTransport(ws), g.who)
        if conn is None:
            return
        try:
            while not conn.closing:
                data = ws.receive()
                if data is None:
                    continue
                svc.on_frame(conn, data)
        except ConnectionClosed:
            pass
        finally:
            svc.forget_socket(conn)
            conn.stop()
            # Let a queued error frame and close frame go out before flask-sock closes the socket.
            conn.wait_written(2)

    return bp
