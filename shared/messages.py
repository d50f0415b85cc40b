"""The ingest message contract (topic ``videos.ingest``) and the dead-letter record.

A message is UTF-8 JSON keyed by ``video_id`` so that one video's updates stay in
order on one partition, and so that ``kcat`` or any other client can produce it::

    {"op": "upsert", "video_id": "abc", "uri": "file:///data/a.mp4", "metadata": {...}}
    {"op": "delete", "video_id": "abc"}

Anything that cannot be parsed raises :class:`MessageError`; the ingest worker sends
it to the DLQ with :func:`dlq_record` and commits, so one bad message never blocks a
partition.
"""
from __future__ import annotations

import base64
import json
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Union

# Error classes a parse failure can have (the DLQ record's ``error_class``).
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNKNOWN_OP = "unknown_op"

OPS = ("upsert", "delete")
# Long enough for any natural key (paths, URLs hashed or not); short enough for logs,
# Kafka keys and payload indexes.
MAX_VIDEO_ID_CHARS = 256


class MessageError(ValueError):
    """An ingest message that can never be processed (a DLQ case, not a retry)."""

    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(f"{error_class}: {reason}")
        self.error_class = error_class
        self.reason = reason

    def __reduce__(self):
        # Rebuild from both fields so the error survives pickling (Ray, multiprocessing).
        return (type(self), (self.error_class, self.reason))


def check_video_id(video_id: object) -> str:
    """Return ``video_id`` if it is a usable id, else raise MessageError(bad_message)."""
    if not isinstance(video_id, str):
        raise MessageError(BAD_MESSAGE, f"video_id must be a string, got {type(video_id).__name__}")
    if not video_id.strip():
        raise MessageError(BAD_MESSAGE, "video_id is empty")
    if len(video_id) > MAX_VIDEO_ID_CHARS:
        raise MessageError(BAD_MESSAGE, f"video_id is longer than {MAX_VIDEO_ID_CHARS} characters")
    # Control characters (NUL, newlines ...) break log lines and shell tooling for no gain.
    if any(unicodedata.category(ch) == "Cc" for ch in video_id):
        raise MessageError(BAD_MESSAGE, "video_id contains control characters")
    return video_id


@dataclass(frozen=True)
class UpsertOp:
    """Decode, encode and store (or overwrite) one video."""

    video_id: str
    uri: str
    metadata: dict[str, Any] = field(default_factory=dict)
    op: str = field(default="upsert", init=False)

    def __post_init__(self) -> None:
        check_video_id(self.video_id)
        if not isinstance(self.uri, str) or not self.uri.strip():
            raise MessageError(BAD_MESSAGE, "uri must be a non-empty string")
        if not isinstance(self.metadata, dict):
            raise MessageError(BAD_MESSAGE, f"metadata must be an object, got {_json_type(self.metadata)}")


@dataclass(frozen=True)
class DeleteOp:
    """Remove one video from the live collection."""

    video_id: str
    op: str = field(default="delete", init=False)

    def __post_init__(self) -> None:
        check_video_id(self.video_id)


IngestOp = Union[UpsertOp, DeleteOp]


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _reject_constant(name: str) -> float:
    # Python's json accepts NaN/Infinity, which are not JSON and which no other client
    # (or Qdrant's payload) would read back.
    raise ValueError(f"{name} is not valid JSON")


def parse_ingest_message(value: bytes | None, key: bytes | None = None) -> IngestOp:
    """Parse one Kafka record value (and optional key) into an op.

    Raises MessageError with error_class ``bad_json`` (not UTF-8 JSON), ``bad_message``
    (wrong shape, missing or wrong-typed field, bad video_id, key mismatch) or
    ``unknown_op``.
    """
    if value is None:
        raise MessageError(BAD_MESSAGE, "message has no value (tombstone)")
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(BAD_JSON, f"value is not UTF-8 (byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise MessageError(BAD_JSON, f"value is not valid JSON: {exc}") from None
    except RecursionError:
        raise MessageError(BAD_JSON, "value is nested too deeply") from None

    if not isinstance(body, dict):
        raise MessageError(BAD_MESSAGE, f"message must be a JSON object, got {_json_type(body)}")
    if "op" not in body:
        raise MessageError(BAD_MESSAGE, "missing field 'op'")
    op = body["op"]
    if not isinstance(op, str):
        raise MessageError(BAD_MESSAGE, f"op must be a string, got {_json_type(op)}")
    if op not in OPS:
        raise MessageError(UNKNOWN_OP, f"unknown op {op[:64]!r}; expected one of {', '.join(OPS)}")
    if "video_id" not in body:
        raise MessageError(BAD_MESSAGE, "missing field 'video_id'")
    video_id = check_video_id(body["video_id"])
    if key is not None:
        _check_key(key, video_id)

    if op == "delete":
        return DeleteOp(video_id)
    if "uri" not in body:
        raise MessageError(BAD_MESSAGE, "missing field 'uri'")
    if not isinstance(body["uri"], str):
        raise MessageError(BAD_MESSAGE, f"uri must be a string, got {_json_type(body['uri'])}")
    # metadata is optional, but when present it must be an object: a list or string
    # here is a producer bug, and guessing would store the wrong thing.
    return UpsertOp(video_id, body["uri"], body.get("metadata", {}))


def _check_key(key: bytes, video_id: str) -> None:
    # The key decides the partition; a key that disagrees with the body would let two
    # updates of one video race on different partitions.
    try:
        key_text = bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(BAD_MESSAGE, "key is not UTF-8") from None
    if key_text != video_id:
        raise MessageError(BAD_MESSAGE, f"key {key_text[:64]!r} does not match video_id {video_id[:64]!r}")


def encode_ingest_message(op: IngestOp) -> tuple[bytes, bytes]:
    """Return the (key, value) bytes to produce for ``op``."""
    if isinstance(op, UpsertOp):
        body: dict[str, Any] = {"op": op.op, "video_id": op.video_id, "uri": op.uri, "metadata": op.metadata}
    elif isinstance(op, DeleteOp):
        body = {"op": op.op, "video_id": op.video_id}
    else:
        raise TypeError(f"expected UpsertOp or DeleteOp, got {type(op).__name__}")
    try:
        value = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise MessageError(BAD_MESSAGE, f"metadata is not JSON-serialisable: {exc}") from None
    return op.video_id.encode("utf-8"), value.encode("utf-8")


def _bytes_field(raw: bytes | None) -> dict[str, str | None]:
    # Text when it is UTF-8 so an operator can read the DLQ with kcat; base64 otherwise
    # so that nothing is lost and the message can be replayed byte for byte.
    if raw is None:
        return {"encoding": None, "data": None}
    raw = bytes(raw)
    try:
        return {"encoding": "utf-8", "data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(raw).decode("ascii")}


def decode_dlq_bytes(field_value: dict[str, str | None]) -> bytes | None:
    """Inverse of the DLQ ``value``/``key`` encoding: the original bytes (for replay)."""
    if field_value.get("data") is None:
        return None
    if field_value.get("encoding") == "base64":
        return base64.b64decode(field_value["data"])
    return str(field_value["data"]).encode("utf-8")


def dlq_record(original_value: bytes | None, original_key: bytes | None, topic: str,
               partition: int, offset: int, error_class: str, reason: str) -> bytes:
    """JSON bytes for ``videos.ingest.dlq``: the original message, why it failed, where from."""
    record = {
        "error_class": error_class,
        "reason": reason,
        "value": _bytes_field(original_value),
        "key": _bytes_field(original_key),
        "source": {"topic": topic, "partition": int(partition), "offset": int(offset)},
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
