"""JSON-line logging, configured once per process.

Each line carries the service name and, inside a request, its request id.
Secrets never reach a log line: the redacting filter masks bearer tokens,
``token=`` query values and JWT-shaped strings wherever they appear.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)((?:access_|refresh_)?token[\"']?\s*[=:]\s*[\"']?)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(password[\"']?\s*[=:]\s*[\"']?)[^\s\"',}]+"),
    re.compile(r"()eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"),
]


def redact(text: str) -> str:
    """Mask anything that looks like a token or password in ``text``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + "[redacted]", text)
    return text


class _ContextFilter(logging.Filter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.request_id = request_id_var.get()
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_configured = False


def setup_logging(service: str, level: str = "INFO") -> None:
    """Send JSON lines to stderr for the whole process (idempotent)."""
    global _configured
    root = logging.getLogger()
    if _configured:
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(request_id)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
        )
    )
    handler.addFilter(_ContextFilter(service))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kafka", "pymongo", "urllib3", "geventwebsocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _configured = True
