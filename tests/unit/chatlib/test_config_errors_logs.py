"""Config validation, the error shape and log redaction."""

from __future__ import annotations

import json
import logging

import pytest
from chatlib.config import ConfigError, load_config, read_secret
from chatlib.errors import ApiError, ErrorCode
from chatlib.http import create_app
from chatlib.logs import redact, setup_logging
from chatlib.service import ServiceConfig
from pydantic_settings import SettingsConfigDict


class DemoConfig(ServiceConfig):
    model_config = SettingsConfigDict(env_prefix="DEMO_", extra="ignore", populate_by_name=True)
    port: int = 8000
    limit: int = 5


def test_prefixed_and_shared_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "9001")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:1")
    monkeypatch.setenv("MONGO_URL", "mongodb://m:2/?retryWrites=false")
    cfg = load_config(DemoConfig)
    assert cfg.port == 9001
    assert cfg.kafka_bootstrap_servers == "k:1"
    assert cfg.mongo_url.startswith("mongodb://m:2")


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_LIMIT", "lots")
    with pytest.raises(ConfigError, match="DEMO_LIMIT"):
        load_config(DemoConfig)
    monkeypatch.delenv("DEMO_LIMIT")
    monkeypatch.setenv("KAFKA_SESSION_TIMEOUT_MS", "soon")
    with pytest.raises(ConfigError, match="KAFKA_SESSION_TIMEOUT_MS"):
        load_config(DemoConfig)


def test_read_secret(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert read_secret("direct", None, "X") == "direct"
    f = tmp_path / "key"
    f.write_text("from-file\n")
    assert read_secret("", str(f), "X") == "from-file"
    with pytest.raises(ConfigError, match="X_FILE"):
        read_secret("", str(tmp_path / "missing"), "X")
    with pytest.raises(ConfigError, match="X"):
        read_secret("", "", "X")


def test_error_shapes() -> None:
    err = ApiError(ErrorCode.CONFLICT, "username taken", {"field": "username"})
    assert err.status == 409
    assert err.to_body() == {
        "error": {"code": "conflict", "message": "username taken", "details": {"field": "username"}}
    }
    assert err.to_frame("c1") == {
        "type": "error",
        "code": "conflict",
        "message": "username taken",
        "ref": "c1",
        "details": {"field": "username"},
    }


def test_app_factory_errors_request_id_health_metrics() -> None:
    app = create_app("demo", health=lambda: {"db": True})

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internals")

    @app.get("/nope")
    def nope() -> str:
        raise ApiError(ErrorCode.FORBIDDEN, "not yours")

    client = app.test_client()
    r = client.get("/boom", headers={"X-Request-Id": "abc123"})
    assert r.status_code == 500
    assert r.headers["X-Request-Id"] == "abc123"
    assert r.json["error"]["code"] == "internal_error"
    assert "secret internals" not in r.get_data(as_text=True)
    r = client.get("/nope")
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    assert len(r.headers["X-Request-Id"]) == 32
    r = client.get("/missing")
    assert r.status_code == 404 and r.json["error"]["code"] == "not_found"
    r = client.post("/healthz")
    assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"
    assert {m.strip() for m in r.headers["Allow"].split(",")} >= {"GET", "HEAD"}
    assert client.get("/healthz").json == {"status": "ok", "service": "demo", "checks": {"db": True}}
    assert b"http_requests_total" in client.get("/metrics").data


def test_health_reports_failure_as_503() -> None:
    app = create_app("demo", health=lambda: {"db": False})
    r = app.test_client().get("/healthz")
    assert r.status_code == 503 and r.json["status"] == "unavailable"


def test_redaction_masks_tokens_and_passwords() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLXZhbHVl"
    line = redact(f"GET /v1/ws?token={jwt} Authorization: Bearer abc.def password=hunter22")
    assert jwt not in line
    assert "abc.def" not in line
    assert "hunter22" not in line
    assert line.count("[redacted]") >= 3


def test_json_log_lines_carry_service_and_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("demo")
    logging.getLogger("demo.test").warning("login with token=%s", "eyJaaaaaaa.bbbbbbbb.cccc")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(err)
    assert record["service"] == "demo"
    assert record["level"] == "WARNING"
    assert "eyJaaaaaaa" not in err


def test_an_empty_integer_parameter_is_a_400_not_the_default() -> None:
    from chatlib.http import create_app, int_arg
    from flask import jsonify

    app = create_app("t")

    @app.get("/n")
    def n() -> object:
        return jsonify({"n": int_arg("n", 20, 0, 100)})

    client = app.test_client()
    assert client.get("/n").json == {"n": 20}
    assert client.get("/n?n=7").json == {"n": 7}
    assert client.get("/n?n=007").json == {"n": 7}
    # Python's int() takes all of these; a query parameter is an integer only in ASCII digits.
    for bad in ("", "x", "101", "-1", "%205", "+5", "1_0", "%D9%A5", "5.0", "1e1", "9" * 40):
        r = client.get(f"/n?n={bad}")
        assert r.status_code == 400 and r.json["error"]["details"] == {"field": "n"}, bad
