"""GET /v1/ws: the WebSocket endpoint.

Checks made before the upgrade, as plain HTTP errors: the identity Nginx
verified (401 without it), the browser Origin (403 if present and not
allowed), a well-formed upgrade request (400) and room for one more socket
(503). The upgrade itself is answered here: the socket is then taken over
from gunicorn (a duplicate of its descriptor), and its reader runs in a
greenlet of its own (see sockets.py for why). Nothing here logs the token,
the query string or a frame's body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from chatlib.errors import ApiError, ErrorCode, forbidden, invalid
from chatlib.http import DEVICE_TYPE_HEADER, PRIMARY_HEADER, identity
from flask import Blueprint, Response, g, request

from .logic import Identity, origin_allowed, upgrade_problem
from .sockets import WsTransport, accept_response

if TYPE_CHECKING:
    from .service import Gateway

logger = logging.getLogger(__name__)


class _HandedOff(Response):
    """The answer once the socket is ours: gunicorn writes nothing and lets its copy go.

    Raising StopIteration from the WSGI call is how a gunicorn worker is told
    the connection was taken over ("closing connection"); it then closes its
    own descriptor, not the duplicate the gateway keeps.
    """

    def __call__(self, environ: Any, start_response: Any) -> Any:
        raise StopIteration()


def blueprint(svc: Gateway) -> Blueprint:
    """The gateway's routes, bound to the running service."""
    bp = Blueprint("gateway", __name__)

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

    # websocket=True: Werkzeug matches an upgrade request only to a WebSocket rule.
    @bp.route("/v1/ws", websocket=True)
    def ws() -> Response:
        """Answer the upgrade and hand the socket to its reader (the disconnect is reported when it ends)."""
        problem = upgrade_problem(request.headers)
        if problem is not None:
            raise invalid(problem)
        if svc.full():
            raise ApiError(ErrorCode.UNAVAILABLE, "this gateway is full, try again")
        raw = request.environ.get("gunicorn.socket")
        if raw is None:  # not served by gunicorn (a test client): nothing to take over
            raise ApiError(ErrorCode.UNAVAILABLE, "WebSocket upgrade not supported by this server")
        sock = raw.dup()
        try:
            sock.sendall(accept_response(request.headers["Sec-WebSocket-Key"]))
        except OSError:
            sock.close()
            return _HandedOff()
        svc.accept(WsTransport(sock), g.who)
        return _HandedOff()

    return bp
