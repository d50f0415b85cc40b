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
* **Redacted.** Credentials never reach the DLQ: the reason, the kept value and the
  key pass through :mod:`vidsearch.redact` (url user-info, credential query parameters
  on urls and bare paths, secret-named fields, Authorization values). A value that is
  whole JSON is redacted decoded (:func:`~vidsearch.redact.redact_json`), so no escape
  hides a secret; a kept prefix is redacted before it is cut.

A record whose value is complete and unredacted can be replayed byte for byte
(``vidsearch dlq --replay``); :func:`replayable_value` says which.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from .redact import REDACTED, redact, redact_cut, redact_json, redact_prefix, redact_text

# What is kept of a key (Kafka keys are ids here; a huge one is a bad message anyway).
MAX_KEY_BYTES = 1024
# Reasons are one line for humans; a reason is never the place for the message itself.
MAX_REASON_CHARS = 2000
# Room in a produce request for the record's key, headers and batch framing.
_REQUEST_OVERHEAD = 1024
# How far past the kept prefix redaction looks, so a credential cut in two is still seen.
_LOOKAHEAD = 4096


def redact_value_text(text: str) -> tuple[str, bool]:
    """A whole message as text, redacted; and whether anything was. JSON is redacted
    decoded and re-encoded (only when something changed), anything else as text."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return redact_text(text)
    if not isinstance(body, (dict, list)):
        return redact_text(text)
    try:
        clean = json.dumps(redact_json(body), ensure_ascii=False)
        if clean == json.dumps(body, ensure_ascii=False):
            return redact_text(text)
    except (RecursionError, ValueError):
        return redact_text(text)
    return redact(clean), True


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


def _window_text(raw: bytes, keep: int) -> str | None:
    """UTF-8 text of ``raw``'s first ``keep`` bytes and up to _LOOKAHEAD more (stopping
    early at bytes that are not UTF-8 past the cut); None when the first ``keep`` are not."""
    text, _ = _prefix_text(raw, keep + _LOOKAHEAD)
    if text is not None:
        return text
    try:
        raw[:keep + _LOOKAHEAD].decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start >= keep:
            return raw[:exc.start].decode("utf-8")
    return None


def bytes_field(raw: bytes | None, keep: int) -> dict[str, Any]:
    """The ``value``/``key`` field for ``raw``: at most ``keep`` bytes, redacted, with the
    size and sha256 of the whole."""
    if raw is None:
        return {"encoding": None, "data": None, "size": 0, "sha256": None, "truncated": False, "redacted": False}
    raw = bytes(raw)
    field: dict[str, Any] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    if keep <= 0 and raw:
        return {"encoding": None, "data": None, **field, "truncated": True, "redacted": False}
    truncated = len(raw) > keep
    # Redaction sees a little past the cut (a credential straddling it), then the cut is made.
    text = _window_text(raw, keep) if truncated else _prefix_text(raw, keep)[0]
    if text is not None:
        if truncated:
            text, redacted = redact_prefix(text, keep, complete=False)
        else:
            text, redacted = redact_value_text(text)
            whole = text
            text, _ = redact_prefix(whole, keep, complete=True)  # a re-encoded value may be longer
            truncated = text != whole
        kept = text.encode("utf-8")
        # Text that JSON escaping would blow up (control characters) goes as base64.
        if len(json.dumps(text, ensure_ascii=False).encode("utf-8")) <= len(kept) * 4 // 3 + 16:
            return {"encoding": "utf-8", "data": text, **field, "truncated": truncated, "redacted": redacted}
    else:
        # Not UTF-8: URLs in it are still ASCII, and latin-1 maps every byte to one char.
        window = raw[:keep + _LOOKAHEAD].decode("latin-1")
        scrubbed, redacted = redact_prefix(window, keep, "latin-1", complete=not truncated)
        kept = scrubbed.encode("latin-1")
    return {"encoding": "base64", "data": base64.b64encode(kept).decode("ascii"), **field,
            "truncated": truncated, "redacted": redacted}


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
    reason_text = redact_cut(reason, MAX_REASON_CHARS)
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
                      redact_cut(reason, 300), keep_bytes=0, max_record_bytes=16_384)


def redact_record(record: dict[str, Any]) -> dict[str, Any]:
    """A DLQ record as read back, redacted again before it is shown (records written by
    an older worker, or by another producer, may still hold credentials)."""
    out = copy.deepcopy(record)
    out["reason"] = redact(out.get("reason", ""))
    out["error_class"] = redact(out.get("error_class", ""))
    for name in ("value", "key"):
        field_value = out.get(name)
        if not isinstance(field_value, dict) or field_value.get("data") is None:
            continue
        try:
            raw = decode_dlq_bytes(field_value)
        except (ValueError, TypeError):
            field_value["data"], field_value["redacted"] = REDACTED, True
            continue
        encoding = "latin-1" if field_value.get("encoding") == "base64" else "utf-8"
        text = (raw or b"").decode(encoding, "replace")
        if field_value.get("truncated"):
            clean, changed = redact_prefix(text, len(text.encode(encoding, "replace")), encoding, complete=False)
            changed = changed or clean != text
        else:
            clean, changed = redact_value_text(text)
        if changed:
            data = clean.encode(encoding, "replace")
            field_value["data"] = base64.b64encode(data).decode("ascii") if encoding == "latin-1" else clean
            field_value["redacted"] = True
    return out


def parse_dlq_record(raw: bytes) -> dict[str, Any]:
    """A DLQ record read back (ValueError when it is not one)."""
    body = json.loads(bytes(raw).decode("utf-8"))
    if not isinstance(body, dict) or not {"error_class", "reason", "value", "source"} <= set(body):
        raise ValueError("not a DLQ record")
    return body
