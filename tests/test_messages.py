"""The ingest message contract: every bad input maps to its DLQ error class."""
from __future__ import annotations

import base64
import hashlib
import json
import pickle

import pytest

from vidsearch.messages import (
    BAD_JSON,
    BAD_MESSAGE,
    MAX_VIDEO_ID_CHARS,
    UNKNOWN_OP,
    DeleteOp,
    MessageError,
    UpsertOp,
    decode_dlq_bytes,
    dlq_record,
    encode_ingest_message,
    parse_ingest_message,
)


def _msg(**body) -> bytes:
    return json.dumps(body).encode()


def test_parse_upsert_and_delete():
    op = parse_ingest_message(_msg(op="upsert", video_id="v1", uri="file:///data/a.mp4",
                                   metadata={"title": "A", "tags": ["x", "y"], "nested": {"k": 1}}), b"v1")
    assert op == UpsertOp("v1", "file:///data/a.mp4", {"title": "A", "tags": ["x", "y"], "nested": {"k": 1}})
    assert parse_ingest_message(_msg(op="delete", video_id="v1")) == DeleteOp("v1")


def test_metadata_is_optional_and_unknown_fields_are_ignored():
    op = parse_ingest_message(_msg(op="upsert", video_id="v", uri="s3://b/k.mp4", extra=1))
    assert op == UpsertOp("v", "s3://b/k.mp4", {})


@pytest.mark.parametrize("op", [
    UpsertOp("v1", "file:///a.mp4", {"title": "Ünïcode ✓", "tags": ["a"], "n": 1.5}),
    UpsertOp("ü/id with spaces", "https://x/y.mp4"),
    DeleteOp("v2"),
])
def test_round_trip(op):
    key, value = encode_ingest_message(op)
    assert key == op.video_id.encode()
    assert parse_ingest_message(value, key) == op


def test_encoded_value_is_plain_utf8_json():
    _, value = encode_ingest_message(UpsertOp("v", "file:///a.mp4", {"title": "é"}))
    assert json.loads(value.decode("utf-8")) == {"op": "upsert", "video_id": "v", "uri": "file:///a.mp4",
                                                 "metadata": {"title": "é"}}


@pytest.mark.parametrize("value,error_class,needle", [
    (b"{not json", BAD_JSON, "not valid JSON"),
    (b"", BAD_JSON, "not valid JSON"),
    (b'{"op": "delete", "video_id": NaN}', BAD_JSON, "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, BAD_JSON, "nested too deeply"),
    (b'{"op": "delete", "video_id": "\xff\xfe"}', BAD_JSON, "not UTF-8"),
    (None, BAD_MESSAGE, "tombstone"),
    (b"[1, 2]", BAD_MESSAGE, "got array"),
    (b'"upsert"', BAD_MESSAGE, "got string"),
    (b"null", BAD_MESSAGE, "got null"),
    (b'{"video_id": "v"}', BAD_MESSAGE, "missing field 'op'"),
    (b'{"op": 1, "video_id": "v"}', BAD_MESSAGE, "op must be a string"),
    (b'{"op": "insert", "video_id": "v"}', UNKNOWN_OP, "unknown op 'insert'"),
    (b'{"op": "UPSERT", "video_id": "v", "uri": "file:///a"}', UNKNOWN_OP, "unknown op"),
    (b'{"op": "delete"}', BAD_MESSAGE, "missing field 'video_id'"),
    (b'{"op": "delete", "video_id": 7}', BAD_MESSAGE, "video_id must be a string"),
    (b'{"op": "delete", "video_id": null}', BAD_MESSAGE, "video_id must be a string"),
    (b'{"op": "delete", "video_id": ""}', BAD_MESSAGE, "video_id is empty"),
    (b'{"op": "delete", "video_id": "   "}', BAD_MESSAGE, "video_id is empty"),
    (b'{"op": "delete", "video_id": "a\\nb"}', BAD_MESSAGE, "control characters"),
    (_msg(op="delete", video_id="x" * (MAX_VIDEO_ID_CHARS + 1)), BAD_MESSAGE, "longer than"),
    (b'{"op": "upsert", "video_id": "v"}', BAD_MESSAGE, "missing field 'uri'"),
    (b'{"op": "upsert", "video_id": "v", "uri": 3}', BAD_MESSAGE, "uri must be a string"),
    (b'{"op": "upsert", "video_id": "v", "uri": ""}', BAD_MESSAGE, "uri must be a non-empty"),
    (b'{"op": "upsert", "video_id": "v", "uri": "f", "metadata": ["a"]}', BAD_MESSAGE, "metadata must be an object"),
    (b'{"op": "upsert", "video_id": "v", "uri": "f", "metadata": "a"}', BAD_MESSAGE, "metadata must be an object"),
    (b'{"op": "upsert", "video_id": "v", "uri": "f", "metadata": null}', BAD_MESSAGE, "metadata must be an object"),
])
def test_bad_messages(value, error_class, needle):
    with pytest.raises(MessageError) as info:
        parse_ingest_message(value)
    assert info.value.error_class == error_class
    assert needle in info.value.reason


def test_longest_allowed_video_id_is_accepted():
    video_id = "x" * MAX_VIDEO_ID_CHARS
    assert parse_ingest_message(_msg(op="delete", video_id=video_id)).video_id == video_id


@pytest.mark.parametrize("key,needle", [(b"other", "does not match"), (b"\xff", "key is not UTF-8")])
def test_key_must_match_video_id(key, needle):
    with pytest.raises(MessageError) as info:
        parse_ingest_message(_msg(op="delete", video_id="v"), key)
    assert info.value.error_class == BAD_MESSAGE
    assert needle in info.value.reason


def test_ops_validate_on_construction_and_encode():
    with pytest.raises(MessageError, match="video_id is empty"):
        DeleteOp("")
    with pytest.raises(MessageError, match="metadata must be an object"):
        UpsertOp("v", "file:///a", ["x"])  # type: ignore[arg-type]
    with pytest.raises(MessageError, match="not JSON-serialisable"):
        encode_ingest_message(UpsertOp("v", "file:///a", {"bad": object()}))
    with pytest.raises(MessageError, match="not JSON-serialisable"):
        encode_ingest_message(UpsertOp("v", "file:///a", {"bad": float("nan")}))
    with pytest.raises(TypeError):
        encode_ingest_message("v")  # type: ignore[arg-type]


def test_message_error_survives_pickling():
    # It crosses Ray task boundaries in the ingest worker.
    err = pickle.loads(pickle.dumps(MessageError(BAD_JSON, "why")))
    assert (err.error_class, err.reason, str(err)) == (BAD_JSON, "why", "bad_json: why")


def test_dlq_record_keeps_utf8_original_as_text():
    raw = b'{"op": "nope", "video_id": "v"}'
    record = json.loads(dlq_record(raw, b"v", "videos.ingest", 2, 41, UNKNOWN_OP, "unknown op 'nope'"))
    assert record["value"] == {"encoding": "utf-8", "data": raw.decode(), "size": len(raw),
                               "sha256": hashlib.sha256(raw).hexdigest(), "truncated": False, "redacted": False}
    assert (record["key"]["encoding"], record["key"]["data"], record["key"]["size"]) == ("utf-8", "v", 1)
    assert record["error_class"] == UNKNOWN_OP
    assert record["reason"] == "unknown op 'nope'"
    assert record["source"] == {"topic": "videos.ingest", "partition": 2, "offset": 41}
    assert record["failed_at"].endswith("Z")
    assert decode_dlq_bytes(record["value"]) == raw


def test_dlq_record_keeps_binary_original_as_base64():
    raw = b"\x00\xff\xfe binary"
    record = json.loads(dlq_record(raw, None, "videos.ingest", 0, 7, BAD_JSON, "value is not UTF-8"))
    assert (record["value"]["encoding"], record["value"]["data"]) == ("base64", base64.b64encode(raw).decode())
    assert (record["key"]["encoding"], record["key"]["data"]) == (None, None)
    assert decode_dlq_bytes(record["value"]) == raw
    assert decode_dlq_bytes(record["key"]) is None


def test_dlq_record_of_tombstone():
    record = json.loads(dlq_record(None, b"v", "videos.ingest", 1, 3, BAD_MESSAGE, "tombstone"))
    assert record["value"]["data"] is None
