"""The Flask app factory every HTTP-serving service uses.

It gives each app: request ids (``X-Request-Id``, taken from Nginx or made
here), the contract's JSON error shape for every error, ``/healthz`` that
checks the service's dependencies, ``/metrics`` in Prometheus text format,
and helpers to read the caller's identity (set by Nginx after auth_request)
and a JSON body.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, g, jsonify, request
from kafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo.errors import ConnectionFailure
from werkzeug.exceptions import HTTPException

from . import metrics
from .errors import ApiError, ErrorCode, invalid, unauthorized
from .logs import request_id_var

logger = logging.getLogger(__name__)

#: Headers Nginx sets from the auth_request answer (any client copy is removed there).
USER_HEADER = "X-User-Id"
DEVICE_HEADER = "X-Device-Id"
ADMIN_HEADER = "X-User-Admin"
DEVICE_TYPE_HEADER = "X-Device-Type"
PRIMARY_HEADER = "X-Device-Primary"

_HTTP_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

HealthCheck = Callable[[], dict[str, bool]]


def create_app(name: str, health: HealthCheck | None = None, max_body_bytes: int = 1024 * 1024) -> Flask:
    """Build a Flask app with the shared behaviour; services register blueprints on it."""
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]

    @app.before_request
    def _start() -> None:
        rid = request.headers.get("X-Request-Id", "")
        g.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        g.request_token = request_id_var.set(g.request_id)
        g.started = time.perf_counter()

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers["X-Request-Id"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.child(metrics.HTTP_REQUESTS, request.method, endpoint, str(resp.status_code)).inc()
        if "started" in g:
            metrics.child(metrics.HTTP_SECONDS, endpoint).observe(time.perf_counter() - g.started)
        return resp

    @app.teardown_request
    def _reset(_exc: BaseException | None) -> None:
        token = g.pop("request_token", None)
        if token is not None:
            request_id_var.reset(token)

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> tuple[Response, int]:
        logger.info("request failed: %s %s -> %s", request.method, request.path, err.code.value)
        return jsonify(err.to_body()), err.status

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> tuple[Response, int]:
        status = err.code or 500
        code = _HTTP_CODES.get(status, ErrorCode.INVALID_REQUEST if status < 500 else ErrorCode.INTERNAL)
        message = {404: "no such endpoint", 405: "method not allowed", 413: "request body too large"}.get(
            status, err.description or code.value
        )
        resp = jsonify(ApiError(code, message).to_body())
        # A 405 lists what the route has (RFC 9110); werkzeug puts it in the exception's headers.
        for name, value in err.get_headers():
            if name.lower() == "allow":
                resp.headers["Allow"] = value
        return resp, status

    @app.errorhandler(ConnectionFailure)
    @app.errorhandler(KafkaError)
    def _dependency_down(err: Exception) -> tuple[Response, int]:
        # The database or broker is away: the client may retry; the service reconnects by itself.
        logger.warning("dependency unavailable on %s %s: %s", request.method, request.path, err.__class__.__name__)
        body = ApiError(ErrorCode.UNAVAILABLE, "a backing service is unavailable, retry shortly").to_body()
        return jsonify(body), 503

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> tuple[Response, int]:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        body = ApiError(ErrorCode.INTERNAL, "internal error", {"request_id": g.get("request_id")}).to_body()
        return jsonify(body), 500

    @app.get("/healthz")
    def _healthz() -> tuple[Response, int]:
        checks = health() if health is not None else {}
        ok = all(checks.values())
        # The service's name, so whoever waits for it knows it reached the right process.
        body = {"status": "ok" if ok else "unavailable", "service": name, "checks": checks}
        return jsonify(body), 200 if ok else 503

    @app.get("/metrics")
    def _metrics() -> Response:
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)

    return app


def identity() -> tuple[str, str]:
    """The caller's (user_id, device_id) as verified by Nginx's auth_request."""
    user = request.headers.get(USER_HEADER, "")
    device = request.headers.get(DEVICE_HEADER, "")
    if not user or not device:
        raise unauthorized()
    return user, device


def is_admin() -> bool:
    """True when the verified caller is a server administrator."""
    return request.headers.get(ADMIN_HEADER, "") == "1"


def json_body(optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body, or a 400 in the contract's shape."""
    if not request.get_data(cache=True):
        if optional:
            return {}
        raise invalid("a JSON body is required")
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise invalid("the body must be a JSON object")
    return data


_INTEGER = re.compile(r"-?[0-9]{1,30}")


def int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    """An integer query parameter within [lo, hi], or a 400.

    Only ASCII digits with an optional minus sign: Python's ``int`` would also take
    " 5", "+5", "1_0" and other scripts' digits, which no client means as a number.
    """
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise invalid(f"{name} must be an integer", field=name)
    value = int(raw)
    if not lo <= value <= hi:
        raise invalid(f"{name} must be between {lo} and {hi}", field=name)
    return value
