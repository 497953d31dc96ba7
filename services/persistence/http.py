"""HTTP side of persistence: conversation list, history, sync, mutes.

Parse and validate here, identity from the Nginx-verified headers, then the
service's read-side methods. ``/internal/mutes/{user_id}`` is for the push
service only (Nginx answers 404 for /internal/ from outside).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chatlib.errors import invalid
from chatlib.http import identity, int_arg, json_body
from flask import Blueprint, Response, jsonify

if TYPE_CHECKING:
    from .service import Persistence

logger = logging.getLogger(__name__)

MAX_PAGE = 100
DEFAULT_PAGE = 50
DEFAULT_SYNC = 20
#: Seqs are far below this; a larger before_seq is a client error.
MAX_SEQ = 2**53


def blueprint(service: Persistence) -> Blueprint:
    """The persistence routes, bound to one service instance."""
    bp = Blueprint("persistence", __name__)

    @bp.get("/v1/conversations")
    def list_conversations() -> Response:
        """The caller's conversations, newest activity first, with unread counts."""
        user_id, _ = identity()
        return jsonify({"conversations": service.list_conversations(user_id)})

    @bp.get("/v1/conversations/<conversation>/messages")
    def history(conversation: str) -> Response:
        """One page of history, newest first; ``next_before_seq`` fetches the older page."""
        user_id, _ = identity()
        before_seq = int_arg("before_seq", None, 1, MAX_SEQ)
        limit = int_arg("limit", DEFAULT_PAGE, 1, MAX_PAGE)
        assert limit is not None
        return jsonify(service.history(user_id, conversation, before_seq, limit))

    @bp.get("/v1/sync")
    def sync() -> Response:
        """Everything a starting or newly linked device needs in one call."""
        user_id, device_id = identity()
        per_conversation = int_arg("per_conversation", DEFAULT_SYNC, 0, MAX_PAGE)
        assert per_conversation is not None
        return jsonify(service.sync(user_id, device_id, per_conversation))

    @bp.put("/v1/conversations/<conversation>/mute")
    def mute(conversation: str) -> tuple[str, int]:
        """Mute or unmute a conversation for the caller (push notifications only)."""
        user_id, _ = identity()
        body = json_body()
        muted = body.get("muted")
        if not isinstance(muted, bool):
            raise invalid("muted must be true or false", field="muted")
        service.set_mute(user_id, conversation, muted)
        return "", 204

    @bp.get("/internal/mutes/<user_id>")
    def internal_mutes(user_id: str) -> Response:
        """The conversations ``user_id`` muted (read by the push service)."""
        return jsonify({"conversations": service.mutes(user_id)})

    return bp
