"""HTTP adapters of the profile service: parse, identify, validate, call the service.

The caller's identity comes only from :func:`chatlib.http.identity` (headers
Nginx sets from the auth_request answer), never from a body.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from chatlib.errors import forbidden, invalid, unauthorized
from chatlib.http import identity, is_admin, json_body
from flask import Blueprint, Response, jsonify, request

from . import logic

if TYPE_CHECKING:
    from .service import ProfileService

logger = logging.getLogger(__name__)

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _no_content() -> Response:
    return Response(status=204)


def blueprint(svc: ProfileService) -> Blueprint:
    """The profile routes, bound to one service instance."""
    bp = Blueprint("profile", __name__)

    # -- accounts and tokens ----------------------------------------------

    @bp.post("/v1/auth/signup")
    def signup() -> tuple[Response, int]:
        """Create an account: 201 profile; 409 if the username is taken."""
        req = logic.parse_signup(json_body())
        return jsonify(svc.signup(req)), 201

    @bp.post("/v1/auth/login")
    def login() -> Response | tuple[Response, int]:
        """Log a device in: tokens for a new device, or for the caller's own ``device_id``.

        429 with Retry-After when the username or the caller's address is locked out after
        failed logins (the address is the one Nginx puts in X-Forwarded-For).
        """
        req = logic.parse_login(json_body())
        address = logic.client_address(request.headers.get("X-Forwarded-For"), request.remote_addr)
        try:
            return jsonify(svc.login(req, address))
        except logic.LoginThrottled as exc:
            resp = jsonify(exc.to_body())
            resp.headers["Retry-After"] = str(exc.retry_after_s)
            return resp, exc.status

    @bp.post("/v1/auth/refresh")
    def refresh() -> Response:
        """Rotate a refresh token into a new token pair."""
        token = json_body().get("refresh_token")
        if not isinstance(token, str) or not token:
            raise invalid("refresh_token is required", field="refresh_token")
        return jsonify(svc.refresh(token))

    @bp.post("/v1/auth/logout")
    def logout() -> Response:
        """Log the calling device out (204)."""
        user_id, device_id = identity()
        svc.logout(user_id, device_id)
        return _no_content()

    @bp.route("/internal/auth", methods=_ALL_METHODS)
    def auth() -> Response:
        """Nginx auth_request: 200 with X-Auth-* identity headers, or 401.

        The subrequest carries the original method, hence every method here.
        """
        try:
            ident = svc.authenticate(request.headers.get("Authorization", ""))
        except logic.InvalidToken:
            raise unauthorized("a valid access token is required") from None
        return Response(status=200, headers=ident.headers())

    # -- profiles ----------------------------------------------------------

    @bp.get("/v1/me")
    def get_me() -> Response:
        """The caller's profile."""
        user_id, _ = identity()
        return jsonify(svc.me(user_id))

    @bp.patch("/v1/me")
    def patch_me() -> Response:
        """Change the caller's name and/or username."""
        user_id, _ = identity()
        return jsonify(svc.update_me(user_id, json_body()))

    @bp.delete("/v1/me")
    def delete_me() -> Response:
        """Unregister the caller's account (password required): 204."""
        user_id, _ = identity()
        password = json_body().get("password")
        if not isinstance(password, str) or not password:
            raise invalid("password is required", field="password")
        svc.delete_account(user_id, password)
        return _no_content()

    @bp.get("/v1/users/<username>")
    def get_user(username: str) -> Response:
        """Another user's public profile with online and last_seen."""
        identity()
        return jsonify(svc.user_by_name(username))

    @bp.post("/v1/contacts/sync")
    def sync_contacts() -> Response:
        """Which of up to 1000 usernames exist."""
        identity()
        return jsonify(svc.sync_contacts(logic.parse_usernames(json_body())))

    # -- devices -----------------------------------------------------------

    @bp.get("/v1/me/devices")
    def list_devices() -> Response:
        """The caller's devices with primary, online and last_seen."""
        user_id, _ = identity()
        return jsonify(svc.devices(user_id))

    @bp.put("/v1/me/devices/<device_id>/push-token")
    def put_push_token(device_id: str) -> Response:
        """Set one of the caller's devices' push token (404 for any other device)."""
        user_id, _ = identity()
        token = logic.validate_push_token(json_body().get("push_token"), required=True)
        assert token is not None
        svc.set_push_token(user_id, device_id, token)
        return _no_content()

    @bp.delete("/v1/me/devices/<device_id>")
    def delete_device(device_id: str) -> Response:
        """Remove one of the caller's devices (a secondary device may not remove the primary)."""
        user_id, caller_device = identity()
        svc.remove_device(user_id, caller_device, device_id)
        return _no_content()

    # -- server administration --------------------------------------------

    def _admin() -> str:
        user_id, _ = identity()
        if not is_admin():
            raise forbidden("server administrators only")
        return user_id

    @bp.post("/v1/admin/users/<user_id>/disable")
    def disable_user(user_id: str) -> Response:
        """Disable an account: every device logged out, logins refused (204)."""
        svc.disable_user(_admin(), user_id)
        return _no_content()

    @bp.post("/v1/admin/users/<user_id>/enable")
    def enable_user(user_id: str) -> Response:
        """Enable a disabled account again (204)."""
        svc.enable_user(_admin(), user_id)
        return _no_content()

    return bp
