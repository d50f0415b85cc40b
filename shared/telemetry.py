"""Structured logging (one JSON object per line when VIDSEARCH_LOG_FORMAT=json)."""
from __future__ import annotations

import json
import logging
import os
import time


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
        return json.dumps(entry, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        out = f"{base} {extra}" if extra else base
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        return out


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


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields) -> None:
    """Log with structured key/value fields (rendered as JSON or key=value)."""
    logger.log(level, msg, extra={"fields": fields})
