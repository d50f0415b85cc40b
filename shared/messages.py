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

import json
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Union

from .config import MessageSettings
from .redact import redact

# Error classes a parse failure can have (the DLQ record's ``error_class``).
BAD_JSON = "bad_json"
BAD_MESSAGE = "bad_message"
UNKNOWN_OP = "unknown_op"

OPS = ("upsert", "delete")
_DEFAULT_LIMITS = MessageSettings()
# Long enough for any natural key (paths, URLs hashed or not); short enough for logs,
# Kafka keys and payload indexes.
MAX_VIDEO_ID_CHARS = 256


class MessageError(ValueError):
    """An ingest message that can never be processed (a DLQ case, not a retry).
    ``reason`` is redacted here (vidsearch.redact): it goes to the DLQ and the logs."""

    def __init__(self, error_class: str, reason: str) -> None:
        reason = redact(reason)
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


def parse_ingest_message(value: bytes | None, key: bytes | None = None,
                         limits: MessageSettings | None = None) -> IngestOp:
    """Parse one Kafka record value (and optional key) into an op.

    Raises MessageError with error_class ``bad_json`` (not UTF-8 JSON), ``bad_message``
    (wrong shape, missing or wrong-typed field, bad video_id, key mismatch, or outside
    one of ``limits``, which the reason names; default: the default settings) or
    ``unknown_op``.
    """
    limits = limits or _DEFAULT_LIMITS
    if value is None:
        raise MessageError(BAD_MESSAGE, "message has no value (tombstone)")
    if len(value) > limits.max_bytes:
        # Checked before decoding: nothing of a huge value is parsed or kept in memory twice.
        raise MessageError(BAD_MESSAGE, f"message is {len(value)} bytes, over the limit "
                                        f"messages.max_bytes={limits.max_bytes}")
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
    check_uri_text(body["uri"], limits)
    # metadata is optional, but when present it must be an object: a list or string
    # here is a producer bug, and guessing would store the wrong thing.
    op = UpsertOp(video_id, body["uri"], body.get("metadata", {}))
    check_metadata(op.metadata, limits)
    return op


def check_uri_text(uri: str, limits: MessageSettings | None = None) -> None:
    """The uri as text: within ``max_string_chars`` and valid Unicode (MessageError otherwise)."""
    limits = limits or _DEFAULT_LIMITS
    if len(uri) > limits.max_string_chars:
        raise MessageError(BAD_MESSAGE, f"uri is {len(uri)} characters, over the limit "
                                        f"messages.max_string_chars={limits.max_string_chars}")
    if _has_surrogate(uri):
        raise MessageError(BAD_MESSAGE, "uri is not valid Unicode (a lone surrogate escape)")


def _has_surrogate(text: str) -> bool:
    # JSON may spell a lone UTF-16 surrogate ("\ud800"); it can't be encoded as UTF-8,
    # so neither the store, protobuf nor a client could ever read it back.
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_metadata(metadata: dict[str, Any], limits: MessageSettings | None = None) -> None:
    """Raise MessageError(bad_message) naming the limit when ``metadata`` is outside one.

    Walks iteratively (no recursion limit to hit) and stops at the first problem, so a
    hostile message costs at most one pass over its parsed value.
    """
    limits = limits or _DEFAULT_LIMITS
    keys = items = 0
    stack: list[tuple[Any, int, str]] = [(metadata, 1, "metadata")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list)) and depth > limits.max_metadata_depth:
            raise _limit(f"{_short(where)} is nested {depth} levels deep", "max_metadata_depth",
                         limits.max_metadata_depth)
        if isinstance(value, dict):
            keys += len(value)
            if keys > limits.max_metadata_keys:
                raise _limit(f"metadata has more than {limits.max_metadata_keys} keys", "max_metadata_keys",
                             limits.max_metadata_keys)
            for name, child in value.items():
                _check_string(name, f"key in {_short(where)}", limits)
                stack.append((child, depth + 1, f"{where}.{name}"))
        elif isinstance(value, list):
            items += len(value)
            if items > limits.max_metadata_items:
                raise _limit(f"metadata has more than {limits.max_metadata_items} array elements",
                             "max_metadata_items", limits.max_metadata_items)
            stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, _short(where), limits)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if abs(value) > limits.max_integer:
                raise _limit(f"{_short(where)} is an integer of {len(str(abs(value)))} digits "
                             "(send it as a string)", "max_integer", limits.max_integer)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise MessageError(BAD_MESSAGE, f"{_short(where)} is a number out of the double range")
        else:  # only reachable for metadata built in code, not parsed from JSON
            raise MessageError(BAD_MESSAGE, f"{_short(where)} is a {type(value).__name__}, not a JSON value")
    size = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise _limit(f"metadata is {size} bytes", "max_metadata_bytes", limits.max_metadata_bytes)


def _check_string(text: object, where: str, limits: MessageSettings) -> None:
    if not isinstance(text, str):
        raise MessageError(BAD_MESSAGE, f"{where}: object keys must be strings")
    if len(text) > limits.max_string_chars:
        raise _limit(f"string {where} is {len(text)} characters", "max_string_chars", limits.max_string_chars)
    if _has_surrogate(text):
        raise MessageError(BAD_MESSAGE, f"string {where} is not valid Unicode (a lone surrogate escape)")


def _limit(what: str, setting: str, value: int) -> MessageError:
    return MessageError(BAD_MESSAGE, f"{what}, over the limit messages.{setting}={value}")


def _short(where: str, limit: int = 120) -> str:
    return where if len(where) <= limit else where[: limit - 3] + "..."


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


# The DLQ record lives in dlq.py; these names stay importable from here.
from .dlq import decode_dlq_bytes, dlq_record  # noqa: E402,F401
