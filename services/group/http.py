"""REST adapters of the group service: parse, identify the caller, validate, call the service."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from chatlib.errors import invalid
from chatlib.http import identity, is_admin, json_body
from flask import Blueprint, Response, jsonify

from . import logic

if TYPE_CHECKING:
    from .service import GroupService

logger = logging.getLogger(__name__)


def blueprint(service: GroupService) -> Blueprint:
    """The contract's /v1/groups endpoints, bound to ``service``."""
    bp = Blueprint("groups", __name__)

    def group_json(group: Any, status: int = 200) -> tuple[Response, int]:
        return jsonify(group.public_dict()), status

    @bp.post("/v1/groups")
    def create_group() -> tuple[Response, int]:
        """Create a group; the caller is its owner."""
        user, _ = identity()
        body = json_body()
        name = logic.validate_name(body.get("name"))
        if not isinstance(body.get("members"), list):
            # Required (the contract's body), even when empty: the creator alone.
            raise invalid("members must be a list of user ids (may be empty)", field="members")
        members = logic.validate_user_ids(body["members"], limit=service.config.max_members)
        public = body.get("public", False)
        if not isinstance(public, bool):
            raise invalid("public must be true or false", field="public")
        return group_json(service.create_group(user, name, members, public), 201)

    @bp.get("/v1/groups")
    def my_groups() -> Response:
        """The caller's groups."""
        user, _ = identity()
        return jsonify({"groups": [g.public_dict() for g in service.get_groups_of(user)]})

    @bp.get("/v1/groups/public")
    def public_groups() -> Response:
        """Public groups (channels) anyone may join."""
        identity()
        return jsonify({"groups": [g.public_dict() for g in service.get_public_groups()]})

    @bp.get("/v1/groups/<group_id>")
    def get_group(group_id: str) -> tuple[Response, int]:
        """One group: members, or anyone for a public group."""
        user, _ = identity()
        return group_json(service.get_group(group_id, user))

    @bp.patch("/v1/groups/<group_id>")
    def update_group(group_id: str) -> tuple[Response, int]:
        """Rename (owner or admin)."""
        user, _ = identity()
        body = json_body()
        if "name" not in body:
            return group_json(service.get_group(group_id, user))
        return group_json(service.rename_group(group_id, user, logic.validate_name(body["name"])))

    @bp.post("/v1/groups/<group_id>/members")
    def add_members(group_id: str) -> tuple[Response, int]:
        """Add members (owner or admin)."""
        user, _ = identity()
        members = logic.validate_user_ids(json_body().get("members"), limit=service.config.max_members)
        if not members:
            raise invalid("members must list at least one user id", field="members")
        return group_json(service.add_members(group_id, user, members))

    @bp.delete("/v1/groups/<group_id>/members/<user_id>")
    def remove_member(group_id: str, user_id: str) -> tuple[str, int]:
        """Remove a member (owner or admin), or leave (any member removing self)."""
        user, _ = identity()
        service.remove_member(group_id, user, user_id)
        return "", 204

    @bp.put("/v1/groups/<group_id>/members/<user_id>/role")
    def set_role(group_id: str, user_id: str) -> tuple[Response, int]:
        """Promote to admin or demote to member (owner only)."""
        user, _ = identity()
        return group_json(service.set_role(group_id, user, user_id, json_body().get("role")))

    @bp.post("/v1/groups/<group_id>/join")
    def join_group(group_id: str) -> tuple[Response, int]:
        """Join a public group."""
        user, _ = identity()
        return group_json(service.join_group(group_id, user))

    @bp.delete("/v1/groups/<group_id>")
    def delete_group(group_id: str) -> tuple[str, int]:
        """Delete a group (its owner, or a server administrator)."""
        user, _ = identity()
        service.delete_group(group_id, user, is_admin())
        return "", 204

    return bp
