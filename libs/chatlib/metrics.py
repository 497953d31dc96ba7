"""Prometheus metrics shared by every service (exposed at ``/metrics``)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

_children: dict[tuple[Any, ...], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client checks and locks on every
    ``labels()`` call, a few µs that hot paths (every event produced and consumed, every
    WebSocket frame) paid per record. Label values here come from small fixed sets."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


HTTP_REQUESTS = Counter("http_requests_total", "HTTP requests served", ["method", "endpoint", "status"])
HTTP_SECONDS = Histogram("http_request_seconds", "HTTP request latency", ["endpoint"])
EVENTS_PRODUCED = Counter("kafka_events_produced_total", "Events produced", ["topic", "type"])
EVENTS_HANDLED = Counter("kafka_events_handled_total", "Events handled by consumers", ["consumer", "outcome"])
HANDLER_SECONDS = Histogram(
    "kafka_handler_seconds",
    "Consumer handler latency",
    ["consumer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
EVENT_AGE_SECONDS = Histogram(
    "kafka_event_age_seconds",
    "Time from an event's production to its consumer reading it (queueing and fetch wait; ms resolution)",
    ["consumer"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
)
KAFKA_POLLS = Counter("kafka_polls_total", "Consumer polls (each at least one fetch round trip)", ["consumer"])
KAFKA_WAKEUPS = Counter(
    "kafka_wakeups_total",
    "Doorbell wake-ups of a consumer (ring: a producer rang; idle: the idle interval passed)",
    ["consumer", "kind"],
)
KAFKA_RINGS_DROPPED = Counter(
    "kafka_rings_dropped_total",
    "Rings a producer could not deliver because the doorbell's queue was full (the consumer"
    " finds those records through the high watermarks of its next fetch)",
    ["topic"],
)
KAFKA_FETCH_WAIT_MS = Gauge(
    "kafka_fetch_wait_ms", "Fetch wait of a woken consumer, widened as the embedded broker's log grows", ["consumer"]
)
WS_CONNECTIONS = Gauge("ws_connections", "Open WebSocket connections")
WS_FRAMES = Counter("ws_frames_total", "WebSocket frames", ["direction", "type"])
BROKER_LOSSES = Counter(
    "kafka_broker_losses_total", "Times the broker was found to be a new, empty cluster (chatlib.kafka.BrokerWatch)"
)
