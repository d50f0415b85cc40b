"""The dead-letter record (topic ``videos.ingest.dlq``): bounded, redacted, replayable.

A record says what failed (``error_class``, ``reason``), where it came from
(``source``: topic, partition, offset) and what the message was::

    "value": {"encoding": "utf-8" | "base64" | null, "data": "...", "size": 1234,
              "sha256": "<hex of the whole original value>", "truncated": false, "redacted": false}

``key`` has the same shape. Two rules keep one bad message from stalling ingest:

* **Bounded.** Only the first ``keep_bytes`` of the value are kept, and the whole
  record is built to fit ``max_record_bytes`` (the producer's request limit), so
  the broker never refuses it as too large. JSON escaping can blow text up sixfold
  (a control character becomes ``\\u0001``); such text is kept as base64 instead,
  which grows by a third at most.
* **Redacted.** Credentials never reach the DLQ: in every URL of the kept value,
  user-info is removed and the query and fragment (where presigned urls and tokens
  live) become ``?<redacted>``.

A record whose value is complete and unredacted can be replayed byte for byte
(``vidsearch dlq --replay``); :func:`replayable_value` says which.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any

# What is kept of a key (Kafka keys are ids here; a huge one is a bad message anyway).
MAX_KEY_BYTES = 1024
# Reasons are one line for humans; a reason is never the place for the message itself.
MAX_REASON_CHARS = 2000
# Room in a produce request for the record's key, headers and batch framing.
_REQUEST_OVERHEAD = 1024
REDACTED = "<redacted>"

# A URL inside arbitrary text: scheme://[user-info@]host/path[?query][#fragment]. JSON
# may escape the slashes ("https:\/\/"), hence the optional backslashes.
_URL_RE = re.compile(
    r"(?i)\b(?P<scheme>[a-z][a-z0-9+.-]*:(?:\\?/){2})(?P<userinfo>[^\s\"'\\/@?#]*@)?"
    r"(?P<rest>[^\s\"'?#]*)(?P<query>\?[^\s\"'#]*)?(?P<fragment>#[^\s\"']*)?")


def redact_text(text: str) -> tuple[str, bool]:
    """``text`` with the credentials of every URL in it removed; and whether any were."""
    changed = False

    def scrub(match: re.Match) -> str:
        nonlocal changed
        if not (match["userinfo"] or match["query"] or match["fragment"]):
            return match[0]
        changed = True
        return match["scheme"] + match["rest"] + ("?" + REDACTED if match["query"] or match["fragment"] else "")

    return _URL_RE.sub(scrub, text), changed


def _prefix_text(raw: bytes, keep: int) -> tuple[str | None, int]:
    """(UTF-8 text of at most ``keep`` bytes of ``raw``, bytes used), or (None, 0) when
    the bytes are not UTF-8. A cut through a multi-byte character backs off to its start."""
    prefix = raw[:keep]
    try:
        return prefix.decode("utf-8"), len(prefix)
    except UnicodeDecodeError as exc:
        if len(prefix) < len(raw) and exc.start >= len(prefix) - 3 and exc.reason == "unexpected end of data":
            return prefix[:exc.start].decode("utf-8"), exc.start
        return None, 0


def bytes_field(raw: bytes | None, keep: int) -> dict[str, Any]:
    """The ``value``/``key`` field for ``raw``: at most ``keep`` bytes, redacted, with the
    size and sha256 of the whole."""
    if raw is None:
        return {"encoding": None, "data": None, "size": 0, "sha256": None, "truncated": False, "redacted": False}
    raw = bytes(raw)
    field: dict[str, Any] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if keep <= 0 and raw:
        return {"encoding": None, "data": None, **field, "truncated": True, "redacted": False}
    text, used = _prefix_text(raw, keep)
    if text is not None:
        text, redacted = redact_text(text)
        # Text that JSON escaping would blow up (control characters) goes as base64.
        if len(json.dumps(text, ensure_ascii=False).encode("utf-8")) <= used * 4 // 3 + 16:
            return {"encoding": "utf-8", "data": text, **field, "truncated": used < len(raw), "redacted": redacted}
        kept = text.encode("utf-8")
    else:
        # Not UTF-8: URLs in it are still ASCII, and latin-1 maps every byte to one char.
        scrubbed, redacted = redact_text(raw[:keep].decode("latin-1"))
        kept = scrubbed.encode("latin-1")
        used = min(keep, len(raw))
    return {"encoding": "base64", "data": base64.b64encode(kept).decode("ascii"), **field,
            "truncated": used < len(raw), "redacted": redacted}


def decode_dlq_bytes(field_value: dict[str, Any]) -> bytes | None:
    """The bytes a ``value``/``key`` field holds (the original's prefix when truncated)."""
    if field_value.get("data") is None:
        return None
    if field_value.get("encoding") == "base64":
        return base64.b64decode(field_value["data"])
    return str(field_value["data"]).encode("utf-8")


def replayable_value(record: dict[str, Any]) -> tuple[bytes | None, str]:
    """(the original value, "") when the record holds all of it unchanged, else (None, why)."""
    value = record.get("value") or {}
    if value.get("data") is None:
        return None, "the record has no value"
    if value.get("truncated"):
        return None, "truncated: only the first bytes of the message were kept"
    if value.get("redacted"):
        return None, "redacted: credentials were removed from its uri"
    return decode_dlq_bytes(value), ""


def dlq_key(original_key: bytes | None) -> bytes | None:
    """The Kafka key a DLQ record is produced with: the original's first bytes."""
    return None if original_key is None else bytes(original_key)[:MAX_KEY_BYTES]


def dlq_record(original_value: bytes | None, original_key: bytes | None, topic: str,
               partition: int, offset: int, error_class: str, reason: str, *,
               keep_bytes: int = 65_536, max_record_bytes: int = 1_048_576) -> bytes:
    """JSON bytes for the DLQ: the original message (bounded), why it failed, where from.

    The result always fits ``max_record_bytes`` less the room a produce request needs
    for the key and framing: the kept prefix shrinks until it does (down to nothing,
    when size, sha256 and the source coordinates are all that fit).
    """
    reason_text, _ = redact_text(str(reason)[:MAX_REASON_CHARS])
    budget = max(max_record_bytes - _REQUEST_OVERHEAD - len(dlq_key(original_key) or b""), 512)
    keep = max(0, keep_bytes)
    while True:
        record = {
            "error_class": error_class,
            "reason": reason_text,
            "value": bytes_field(original_value, keep),
            "key": bytes_field(original_key, min(keep, MAX_KEY_BYTES)),
            "source": {"topic": topic, "partition": int(partition), "offset": int(offset)},
            "failed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        encoded = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(encoded) <= budget or keep == 0:
            return encoded
        keep //= 2


def minimal_dlq_record(original_value: bytes | None, original_key: bytes | None, topic: str,
                       partition: int, offset: int, error_class: str, reason: str) -> bytes:
    """The smallest record: no bytes of the message, only its size, sha256 and where it was.
    What the worker falls back to when the broker refuses a full record for good."""
    return dlq_record(original_value, original_key, topic, partition, offset, error_class,
                      str(reason)[:300], keep_bytes=0, max_record_bytes=16_384)


def parse_dlq_record(raw: bytes) -> dict[str, Any]:
    """A DLQ record read back (ValueError when it is not one)."""
    body = json.loads(bytes(raw).decode("utf-8"))
    if not isinstance(body, dict) or not {"error_class", "reason", "value", "source"} <= set(body):
        raise ValueError("not a DLQ record")
    return body
