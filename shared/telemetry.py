"""Structured logging (one JSON object per line when VIDSEARCH_LOG_FORMAT=json).

Every line is redacted (vidsearch.redact): :func:`log_event` redacts the message and
its fields where they are logged, and both formatters redact what they write, so
tracebacks and plain ``logger.info`` calls can't carry a credential out either.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from .redact import REDACTED, is_sensitive_name, redact, redact_json


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(redact_json(json.loads(json.dumps(entry, default=str))))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        out = f"{base} {extra}" if extra else base
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return redact(out)


NOISY_LOGGERS = ("kafka", "urllib3", "httpx")


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    fmt = os.environ.get("VIDSEARCH_LOG_FORMAT", "text")
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Client libraries narrate every connection at INFO ("<BrokerConnection ...>
    # connecting"); they speak up at WARNING unless the user asked for DEBUG.
    debug = level.upper() == "DEBUG"
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    # Its "task ran for 0.1s" warning is about this machine's load, not the broker.
    logging.getLogger("kafka.net.selector").setLevel(logging.DEBUG if debug else logging.ERROR)


def _clean_field(name: str, value: Any) -> Any:
    if is_sensitive_name(name) and not (value is None or (isinstance(value, str) and not value)):
        return REDACTED
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, str):
        return redact(value)
    shown = str(value)
    clean = redact(shown)
    return value if clean == shown else clean


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log with structured key/value fields (rendered as JSON or key=value), redacted."""
    if not logger.isEnabledFor(level):
        return
    clean = {name: _clean_field(name, value) for name, value in fields.items()}
    logger.log(level, redact(msg), extra={"fields": clean})
