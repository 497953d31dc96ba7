"""Internal HTTP of the session service (Nginx never routes /internal/ from outside)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, jsonify

if TYPE_CHECKING:
    from .service import Session


def blueprint(svc: Session) -> Blueprint:
    bp = Blueprint("session", __name__)

    @bp.get("/internal/sessions/<user_id>")
    def user_sessions(user_id: str) -> Response:
        """A user's devices as the session store has them: online, gateway, last_seen."""
        return jsonify(svc.user_sessions(user_id))

    return bp
