"""Message limits, the bounded and redacted DLQ record, and the public uri of a point
(pure functions; the poison-message tests run them through the real worker)."""
from __future__ import annotations

import base64
import hashlib
import json

import pytest

from vidsearch.config import MessageSettings, Settings, load_settings
from vidsearch.dlq import (decode_dlq_bytes, dlq_key, dlq_record, minimal_dlq_record, parse_dlq_record,
                           redact_text, replayable_value)
from vidsearch.messages import BAD_JSON, BAD_MESSAGE, MessageError, UpsertOp, parse_ingest_message
from vidsearch.store_schema import SOURCE_URI_FIELD, build_payload, source_uri

from ingest_support import nested_metadata

LIMITS = MessageSettings()


def _upsert(metadata: object = None, uri: str = "file:///data/a.mp4") -> bytes:
    return json.dumps({"op": "upsert", "video_id": "v", "uri": uri, "metadata": metadata or {}}).encode()


# (name, value bytes, error class, the fragment the reason must contain: the limit it names)
BAD = [
    ("5 MB message", _upsert({"x": "y" * (5 * 1024 * 1024)}), BAD_MESSAGE, "messages.max_bytes=1048576"),
    ("nested 50 deep", _upsert(nested_metadata(50)), BAD_MESSAGE, "messages.max_metadata_depth=8"),
    ("nested 9 deep", _upsert(nested_metadata(9)), BAD_MESSAGE, "messages.max_metadata_depth=8"),
    ("arrays nested deep", _upsert({"a": [[[[[[[[["x"]]]]]]]]]}), BAD_MESSAGE, "max_metadata_depth"),
    ("metadata over 16 KiB", _upsert({f"k{i}": "x" * 1000 for i in range(20)}), BAD_MESSAGE,
     "messages.max_metadata_bytes=16384"),
    ("too many keys", _upsert({f"k{i}": 1 for i in range(300)}), BAD_MESSAGE, "messages.max_metadata_keys=256"),
    ("too many array items", _upsert({"a": [1] * 2000}), BAD_MESSAGE, "messages.max_metadata_items=1024"),
    ("long string", _upsert({"t": "x" * 5000}), BAD_MESSAGE, "messages.max_string_chars=4096"),
    ("long key", _upsert({"k" * 5000: 1}), BAD_MESSAGE, "messages.max_string_chars=4096"),
    ("long uri", _upsert(uri="file:///" + "a" * 5000), BAD_MESSAGE, "uri is 5008 characters"),
    ("int past 2^53", _upsert({"n": 2**53}), BAD_MESSAGE, "messages.max_integer=9007199254740991"),
    ("negative int past 2^53", _upsert({"n": -(2**60)}), BAD_MESSAGE, "send it as a string"),
    ("float overflow", b'{"op":"upsert","video_id":"v","uri":"file:///a","metadata":{"f":1e400}}', BAD_MESSAGE,
     "out of the double range"),
    ("lone surrogate", b'{"op":"upsert","video_id":"v","uri":"file:///a","metadata":{"s":"\\ud800"}}',
     BAD_MESSAGE, "lone surrogate"),
    ("lone surrogate uri", b'{"op":"upsert","video_id":"v","uri":"file:///a\\udfff","metadata":{}}',
     BAD_MESSAGE, "uri is not valid Unicode"),
    ("raw control characters", b'{"op":"upsert","video_id":"v","uri":"file:///a","metadata":{"s":"'
     + b"\x01" * 200_000 + b'"}}', BAD_JSON, "not valid JSON"),
]


@pytest.mark.parametrize("name,value,error_class,fragment", BAD, ids=[b[0] for b in BAD])
def test_each_limit_is_a_bad_message_naming_it(name, value, error_class, fragment):
    with pytest.raises(MessageError) as caught:
        parse_ingest_message(value, b"v")
    assert caught.value.error_class == error_class, caught.value
    assert fragment in caught.value.reason, caught.value.reason
    assert len(caught.value.reason) < 400  # a reason names the problem, it never echoes the message


def test_values_at_the_limits_are_accepted():
    ok = {"title": "t" * 4096, "n": 2**53 - 1, "m": -(2**53 - 1), "f": 1.5e300, "deep": nested_metadata(7),
          "tags": ["a"] * 10}
    op = parse_ingest_message(_upsert(ok), b"v")
    assert isinstance(op, UpsertOp) and op.metadata["n"] == 2**53 - 1


def test_limits_come_from_settings():
    settings = load_settings(env={"VIDSEARCH_MESSAGES__MAX_METADATA_DEPTH": "3",
                                  "VIDSEARCH_MESSAGES__MAX_INTEGER": "1000"})
    with pytest.raises(MessageError, match="max_metadata_depth=3"):
        parse_ingest_message(_upsert(nested_metadata(4)), None, settings.messages)
    with pytest.raises(MessageError, match="max_integer=1000"):
        parse_ingest_message(_upsert({"n": 1001}), None, settings.messages)
    parse_ingest_message(_upsert(nested_metadata(4)), None, Settings().messages)  # the defaults allow it


def test_dlq_record_of_a_poison_message_fits_the_request_limit():
    # The case: 200 KB of U+0001 would be 1.2 MB once JSON-escaped.
    raw = b"\x01" * 200_000
    record = dlq_record(raw, b"k", "videos.ingest", 3, 99, BAD_JSON, "value is not valid JSON")
    assert len(record) < 128 * 1024
    body = parse_dlq_record(record)
    value = body["value"]
    assert value["encoding"] == "base64" and value["size"] == 200_000 and value["truncated"]
    assert value["sha256"] == hashlib.sha256(raw).hexdigest()
    assert decode_dlq_bytes(value) == raw[:65_536]  # the first N bytes, exactly
    assert body["source"] == {"topic": "videos.ingest", "partition": 3, "offset": 99}
    assert replayable_value(body)[0] is None


@pytest.mark.parametrize("keep,limit", [(10 * 1024 * 1024, 1_048_576), (65_536, 16_384), (0, 1_048_576)])
def test_dlq_record_always_fits_whatever_is_kept(keep, limit):
    raw = ("é\x01" * 3_000_000).encode()
    record = dlq_record(raw, b"k" * 5000, "t", 0, 1, BAD_MESSAGE, "x" * 10_000, keep_bytes=keep,
                        max_record_bytes=limit)
    assert len(record) + len(dlq_key(b"k" * 5000)) <= limit - 512
    body = parse_dlq_record(record)
    assert body["value"]["size"] == len(raw) and body["key"]["size"] == 5000
    assert len(body["reason"]) <= 2000


def test_minimal_record_has_no_message_bytes():
    raw = b'{"op": "upsert"}' * 1000
    body = parse_dlq_record(minimal_dlq_record(raw, b"k", "t", 1, 2, BAD_MESSAGE, "why"))
    assert body["value"]["data"] is None and body["value"]["truncated"] and body["value"]["size"] == len(raw)
    assert body["value"]["sha256"] == hashlib.sha256(raw).hexdigest()


def test_a_whole_utf8_value_is_kept_as_text_and_replayable():
    raw = '{"op": "upsert", "video_id": "é", "uri": "file:///data/a.mp4"}'.encode()
    body = parse_dlq_record(dlq_record(raw, "é".encode(), "t", 0, 5, "not_allowed", "why"))
    assert body["value"]["encoding"] == "utf-8" and not body["value"]["truncated"]
    assert replayable_value(body) == (raw, "")
    # A cut through a multi-byte character backs off to its start.
    cut = parse_dlq_record(dlq_record("é".encode() * 10, None, "t", 0, 5, "x", "y", keep_bytes=5))
    assert cut["value"]["data"] == "éé" and cut["value"]["truncated"]


CREDENTIALED = [
    "https://alice:hunter2@videos.example.com/a.mp4?X-Amz-Signature=s3cr3t",
    "file:///data/a.mp4?token=s3cr3t",
    "s3://bucket/a.mp4?versionId=1&token=s3cr3t#hunter2",
]


@pytest.mark.parametrize("uri", CREDENTIALED)
def test_dlq_record_redacts_credentials_in_the_original_value(uri):
    raw = json.dumps({"op": "upsert", "video_id": "v", "uri": uri}).encode()
    record = dlq_record(raw, b"v", "t", 0, 1, "not_allowed", f"{uri} is not allowed")
    assert b"s3cr3t" not in record and b"hunter2" not in record
    body = parse_dlq_record(record)
    assert body["value"]["redacted"] and body["value"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert replayable_value(body)[0] is None  # the original is not in the record any more
    # Escaped slashes and non-UTF-8 values are redacted too.
    escaped = raw.replace(b"/", b"\\/")
    assert b"s3cr3t" not in dlq_record(escaped, None, "t", 0, 1, "x", "y")
    binary = parse_dlq_record(dlq_record(b"\xff" + raw, None, "t", 0, 1, "x", "y"))
    assert b"s3cr3t" not in base64.b64decode(binary["value"]["data"]) and binary["value"]["redacted"]


def test_redact_text_keeps_plain_urls():
    assert redact_text("see file:///data/a.mp4 and https://h/x") == ("see file:///data/a.mp4 and https://h/x", False)


@pytest.mark.parametrize("uri,public", [
    ("https://alice:hunter2@h.example/a.mp4?sig=1#t", "https://h.example/a.mp4"),
    ("file:///data/a.mp4?token=secret", "file:///data/a.mp4"),
    ("file:///data/a.mp4", "file:///data/a.mp4"),
    ("/data/plain path.mp4", "/data/plain path.mp4"),
])
def test_stored_uri_is_public_and_the_full_one_is_kept_apart(uri, public):
    payload = build_payload("v", uri, {}, [0.0], 1.0, "fe", "v1")
    assert payload["uri"] == public
    assert source_uri(payload) == uri
    assert (SOURCE_URI_FIELD in payload) == (uri != public)
