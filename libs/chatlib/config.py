"""Typed configuration read from environment variables.

Shared settings (Kafka, MongoDB, logging) use the names the operator docs give
(``KAFKA_BOOTSTRAP_SERVERS``, ``MONGO_URL``...). Settings that belong to one
service carry that service's prefix (``PROFILE_JWT_SECRET``, ``GATEWAY_PORT``...).
A bad or missing value raises :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""


def shared(default: Any, name: str) -> Any:
    """A shared setting: read from ``name`` whatever the service's prefix is."""
    return Field(default, validation_alias=AliasChoices(name, name.lower()))


class SharedConfig(BaseSettings):
    """Settings every service reads, without a prefix."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    kafka_bootstrap_servers: str = shared("127.0.0.1:19092", "KAFKA_BOOTSTRAP_SERVERS")
    mongo_url: str = shared("mongodb://127.0.0.1:27117/?retryWrites=false", "MONGO_URL")
    mongo_db: str = shared("chat", "MONGO_DB")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = shared(
        "INFO", "LOG_LEVEL"
    )
    # Kafka consumer tuning (docs/operations.md says why these values).
    # How long a fetch may wait at the broker; 0 = automatic (see fetch_max_wait_ms()).
    kafka_fetch_max_wait_ms: int = shared(0, "KAFKA_FETCH_MAX_WAIT_MS")
    # Fetch wake-ups for a broker that holds every fetch its full wait (chatlib.wakeup);
    # empty = off (Apache Kafka answers a waiting fetch as soon as records arrive).
    kafka_wakeup_dir: str = shared("", "KAFKA_WAKEUP_DIR")
    # With wake-ups: how long an idle consumer sleeps between fetches when nobody rings.
    kafka_wakeup_idle_ms: int = shared(5000, "KAFKA_WAKEUP_IDLE_MS")
    # With wake-ups: a busy consumer fetches at most this often (ms), so a burst is read in
    # fewer, fuller fetches (each costs ~1 ms of kafka-python CPU whatever it carries).
    kafka_wakeup_linger_ms: float = shared(0, "KAFKA_WAKEUP_LINGER_MS")
    kafka_session_timeout_ms: int = shared(6000, "KAFKA_SESSION_TIMEOUT_MS")
    kafka_heartbeat_interval_ms: int = shared(2000, "KAFKA_HEARTBEAT_INTERVAL_MS")
    kafka_max_poll_interval_ms: int = shared(10000, "KAFKA_MAX_POLL_INTERVAL_MS")
    # Against Apache Kafka keep idempotence on; the embedded broker needs it off.
    kafka_enable_idempotence: bool = shared(False, "KAFKA_ENABLE_IDEMPOTENCE")
    # How often a service asks the broker for its cluster id (ms; 0 = never): a new id means
    # the broker came back empty (the embedded one keeps everything in memory), and the
    # service re-reads it from the beginning and publishes again what it owns (BrokerWatch).
    kafka_broker_watch_ms: int = shared(1000, "KAFKA_BROKER_WATCH_MS")
    # Consumer groups named after the cluster (`<group>.<cluster id>`): set by `make run` for the
    # embedded broker, whose every start is a new cluster (chatlib.kafka.group_name).
    kafka_group_per_cluster: bool = shared(False, "KAFKA_GROUP_PER_CLUSTER")
    # How long a service waits for Kafka/MongoDB at start before giving up.
    startup_timeout_s: float = shared(10.0, "STARTUP_TIMEOUT_S")
    # Device policy of the contract: secondary devices need the primary online.
    require_primary_online: bool = shared(False, "REQUIRE_PRIMARY_ONLINE")

    @field_validator("kafka_fetch_max_wait_ms", "kafka_wakeup_idle_ms", "kafka_wakeup_linger_ms", mode="before")
    @classmethod
    def _empty_is_zero(cls, v: Any) -> Any:
        return 0 if isinstance(v, str) and not v.strip() else v

    def fetch_max_wait_ms(self) -> int:
        """The consumers' fetch wait: the setting, else 1 ms with wake-ups (the broker's
        shortest hold; a ring says records are there), else 500 ms (a long poll that
        Apache Kafka ends as soon as records arrive)."""
        if self.kafka_fetch_max_wait_ms > 0:
            return self.kafka_fetch_max_wait_ms
        return 1 if self.kafka_wakeup_dir else 500

    @field_validator("kafka_bootstrap_servers", "mongo_url")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


C = TypeVar("C", bound=BaseSettings)


def _env_name(cls: type[BaseSettings], field: str) -> str:
    info = cls.model_fields.get(field)
    alias = getattr(info, "validation_alias", None) if info else None
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    if field.isupper():
        return field
    prefix = cls.model_config.get("env_prefix", "") or ""
    return f"{prefix}{field}".upper()


def load_config(cls: type[C], **overrides: Any) -> C:
    """Build ``cls`` from the environment, turning validation errors into ConfigError."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{_env_name(cls, field)}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def read_secret(value: str | None, file: str | None, name: str) -> str:
    """Return a secret given directly or through a file path (``*_FILE`` variables)."""
    if value:
        return value
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"{name}_FILE: no such file: {file}")
        secret = path.read_text().strip()
        if secret:
            return secret
    raise ConfigError(f"{name}: required (set {name} or {name}_FILE)")


def env_flag(name: str, default: bool = False) -> bool:
    """A boolean environment flag for tooling outside the typed configs."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}
