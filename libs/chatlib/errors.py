"""The one error type of the public API, and its JSON shape.

Every HTTP error body and every WebSocket ``error`` frame comes from
:class:`ApiError`, so the contract's shape is produced in one place.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Error codes of the public contract, with their HTTP status."""

    INVALID_REQUEST = "invalid_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal_error"
    UNAVAILABLE = "unavailable"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}


class ApiError(Exception):
    """An expected error that a client is told about in the contract's shape."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def status(self) -> int:
        return self.code.status

    def to_body(self) -> dict[str, Any]:
        """The HTTP error body: ``{"error": {"code", "message", "details"}}``."""
        return {"error": {"code": self.code.value, "message": self.message, "details": self.details}}

    def to_frame(self, ref: str | None = None) -> dict[str, Any]:
        """The WebSocket error frame: ``{"type": "error", "code", "message", "ref"?}``."""
        frame: dict[str, Any] = {"type": "error", "code": self.code.value, "message": self.message}
        if ref is not None:
            frame["ref"] = ref
        if self.details:
            frame["details"] = self.details
        return frame


def invalid(message: str, **details: Any) -> ApiError:
    """Shorthand for a 400 ``invalid_request``."""
    return ApiError(ErrorCode.INVALID_REQUEST, message, details)


def reject_nulls(body: dict[str, Any], *fields: str) -> None:
    """A 400 for an optional field sent as ``null``.

    Absent means "the default"; no field of the reference is nullable, so a
    ``null`` is a client error rather than a quiet default.
    """
    for name in fields:
        if name in body and body[name] is None:
            raise invalid(f"{name} must not be null", field=name)


def forbidden(message: str = "not allowed") -> ApiError:
    return ApiError(ErrorCode.FORBIDDEN, message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(ErrorCode.NOT_FOUND, message)


def unauthorized(message: str = "authentication required") -> ApiError:
    return ApiError(ErrorCode.UNAUTHORIZED, message)


def conflict(message: str, **details: Any) -> ApiError:
    return ApiError(ErrorCode.CONFLICT, message, details)
