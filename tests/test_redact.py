"""vidsearch.redact, the one credential redaction behind every surface, and the places
that build messages with it: the error constructors, the DLQ record, the log formatters."""
from __future__ import annotations

import base64
import json
import logging

import grpc
import pytest

from vidsearch.config import DecodeSettings
from vidsearch.dlq import dlq_record, parse_dlq_record, redact_record, replayable_value
from vidsearch.messages import BAD_MESSAGE, MessageError, parse_ingest_message
from vidsearch.redact import (REDACTED, is_sensitive_name, looks_like_secret, redact, redact_cut, redact_json,
                              redact_text, redact_uri)
from vidsearch.services.ingest.producer import ProducerError
from vidsearch.services.query.errors import RequestError, RpcFailure
from vidsearch.telemetry import JsonFormatter, KeyValueFormatter, log_event
from vidsearch.uris import NotAllowed, UnsupportedURI, VideoError, resolve_uri

SECRET = "Hunter2Secret"

# (text holding SECRET, what must still be readable after redaction)
CREDENTIALED = [
    ("file://user:Hunter2Secret@localhost/data/a.mp4", "file://<redacted>@localhost/data/a.mp4"),
    ("http://user:Hunter2Secret@h.example/a.mp4", "http://<redacted>@h.example/a.mp4"),
    ("https://Hunter2Secret@h.example/a.mp4", "https://<redacted>@h.example/a.mp4"),
    ("s3://AKID:Hunter2Secret@bucket/clips/a.mp4", "s3://<redacted>@bucket/clips/a.mp4"),
    ("https:\\/\\/u:Hunter2Secret@h.example\\/a.mp4", "https:\\/\\/<redacted>@h.example\\/a.mp4"),  # JSON-escaped
    ("got host 'user:Hunter2Secret@localhost'", "got host '<redacted>@localhost'"),
    ("/data/a.mp4?token=Hunter2Secret", "/data/a.mp4?token=<redacted>"),
    ("'/data/my clip.mp4?t=5&token=Hunter2Secret' resolves outside", "clip.mp4?t=5&token=<redacted>' resolves"),
    ("https://h/a.mp4?X-Amz-Date=20260101T000000Z&X-Amz-Signature=Hunter2Secret",
     "https://h/a.mp4?X-Amz-Date=20260101T000000Z&X-Amz-Signature=<redacted>"),
    ("https://h/a.mp4?X-Amz-Security-Token=Hunter2Secret&v=2", "X-Amz-Security-Token=<redacted>&v=2"),
    ("/v/a.mp4?a=1&signature=Hunter2Secret", "/v/a.mp4?a=1&signature=<redacted>"),
    ("/v/a.mp4?api_key=Hunter2Secret", "/v/a.mp4?api_key=<redacted>"),
    ("https://h/a?sv=2024&sig=Hunter2Secret", "https://h/a?sv=2024&sig=<redacted>"),
    ("https://h/cb?access_token=Hunter2Secret&state=x", "access_token=<redacted>&state=x"),
    ("https://h/a?key=Hunter2Secret", "https://h/a?key=<redacted>"),
    ("/v/a.mp4?password=Hunter2Secret", "/v/a.mp4?password=<redacted>"),
    ("/v/a.mp4?x=e3b0c44298fc1c149afbf4c8996fbHunter2Secret", "/v/a.mp4?x=<redacted>"),  # looks like a key
    ("s3://b/a.mp4?versionId=1#Hunter2Secret", "s3://b/a.mp4?versionId=1#<redacted>"),
    ("https://h/cb#access_token=Hunter2Secret", "https://h/cb#<redacted>"),
    ("https://h/x?next=https%3A%2F%2Fh2%2Fy%3Ftoken%3DHunter2Secret", "https://h/x?next=<redacted>"),
    ("https://h/x?next=https://u:Hunter2Secret@h2/y", "https://h/x?next=https://<redacted>@h2/y"),
    ("Authorization: Bearer Hunter2Secret", "Authorization: Bearer <redacted>"),
    ("authorization=Basic Hunter2Secret", "authorization=Basic <redacted>"),
    ("the header was Bearer Hunter2Secret.", "the header was Bearer <redacted>"),
    ('{"Authorization": "Bearer Hunter2Secret"}', '{"Authorization": "Bearer <redacted>"}'),
    ('{"api_key": "Hunter2Secret", "n": 1}', '{"api_key": "<redacted>", "n": 1}'),
    ("password: Hunter2Secret and then", "password: <redacted> and then"),
    ("X-Api-Key: Hunter2Secret", "X-Api-Key: <redacted>"),
    ("client_secret='Hunter 2 Secret Hunter2Secret'", "client_secret='<redacted>'"),
    ("bootstrap=admin:Hunter2Secret@broker:9092", "bootstrap=<redacted>@broker:9092"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJIdW50ZXIyU2VjcmV0In0.Hunter2Secret ok", "jwt <redacted> ok"),
]

READABLE = [
    "file:///data/videos/a.mp4",
    "/data/videos/clip 1.mp4",
    "/data/take#2.mp4",
    "https://cdn.example.com/videos/a.mp4?t=30&lang=en&format=mp4",
    "s3://bucket/clips/a.mp4?versionId=3",
    "/v/a.mp4?id=123e4567-e89b-12d3-a456-426614174000",
    "metadata.a.a.a is nested 9 levels deep, over the limit messages.max_metadata_depth=8",
    "metadata has more than 256 keys, over the limit messages.max_metadata_keys=256",
    "scheme 'https' is not in allowed_schemes ['file']: 'https://h/a.mp4'",
    "key 'abc' does not match video_id 'abd'",
    "mail alice@example.com about it",
    "authorization: missing or invalid API key (send 'authorization: Bearer <key>')",
    "broker.sasl_password: Input should be a valid string",  # an error naming a secret's field
    "needs broker.sasl_username and broker.sasl_password",
    "lag topic:3=12 partition stalled offset=17",
    '{"op": "upsert", "video_id": "v", "uri": "file:///d/a.mp4", "metadata": {"title": "A red ball"}}',
    "",
]


@pytest.mark.parametrize("text,shown", CREDENTIALED)
def test_each_credential_form_is_redacted_and_the_rest_stays_readable(text, shown):
    out, changed = redact_text(text)
    assert SECRET not in out and changed, out
    assert shown in out, out
    assert redact(out) == out  # idempotent: a redacted text never changes again


@pytest.mark.parametrize("text", READABLE)
def test_ordinary_text_paths_and_query_parameters_are_left_alone(text):
    assert redact_text(text) == (text, False)


def test_sensitive_names_and_key_like_values():
    for name in ("token", "access_token", "X-Amz-Signature", "X-Amz-Credential", "api_key", "apiKey", "X-Api-Key",
                 "password", "passwd", "client_secret", "sig", "AccessKeyId", "Authorization", "sessionToken"):
        assert is_sensitive_name(name), name
    for name in ("t", "lang", "versionId", "max_metadata_keys", "video_id", "author", "passed", "reason", "key"):
        assert not is_sensitive_name(name), name
    assert is_sensitive_name("key", in_query=True) and is_sensitive_name("code", in_query=True)
    assert looks_like_secret("e3b0c44298fc1c149afbf4c8996fb92427ae41e4")
    assert looks_like_secret("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    for value in ("clip-000-with-a-long-name", "123e4567-e89b-12d3-a456-426614174000", "videos/2024/clips/abc",
                  "20260101T000000Z", "abcdefghijklmnopqrstuvwxyz"):
        assert not looks_like_secret(value), value


def test_redact_json_redacts_strings_keys_and_secret_named_fields():
    body = {"uri": "https://u:Hunter2Secret@h/a.mp4", "metadata": {
        "api_key": "Hunter2Secret", "auth": {"user": "a", "pass": "Hunter2Secret"}, "pin": {"password": 1234},
        "tags": ["Bearer Hunter2Secret", "red"], "token=Hunter2Secret": 1, "title": "a red ball", "key": "C major"}}
    out = redact_json(body)
    assert SECRET not in json.dumps(out) and "1234" not in json.dumps(out)
    assert out["uri"] == "https://<redacted>@h/a.mp4" and out["metadata"]["auth"] == REDACTED
    assert out["metadata"]["title"] == "a red ball" and out["metadata"]["key"] == "C major"
    assert out["metadata"]["tags"] == ["Bearer <redacted>", "red"] and "token=<redacted>" in out["metadata"]


@pytest.mark.parametrize("cut", [30, 33, 36, 40, 44])
def test_a_cut_never_leaves_part_of_a_credential(cut):
    text = "reason: 'https://alice:Hunter2Secret@h.example/a.mp4?token=Hunter2Secret' was refused"
    out = redact_cut(text, cut)
    assert len(out) <= cut and out.endswith("...")
    assert "Hunter" not in out and "Secret" not in out and "alice" not in out, out
    assert redact_uri("/data/" + "x" * 1000, limit=50).endswith("...")


def test_dlq_value_cut_through_a_credential_keeps_no_piece_of_it():
    uri = "https://alice:Hunter2Secret@h.example/a.mp4"
    raw = json.dumps({"op": "upsert", "video_id": "v", "uri": uri, "metadata": {"blob": "x" * 500}}).encode()
    for keep in range(raw.index(b"alice"), raw.index(b"@h.example") + 2):
        body = parse_dlq_record(dlq_record(raw, b"v", "t", 0, 1, "x", "y", keep_bytes=keep))
        assert body["value"]["truncated"], keep
        assert "alice" not in body["value"]["data"] and "Hunter" not in body["value"]["data"], (keep, body["value"])


def test_json_escapes_cannot_hide_a_secret_from_the_dlq_record():
    # "\u0074oken" is "token", "\u0040" is "@": the raw text hides both from a text scan.
    raw = (b'{"op": "upsert", "video_id": "v", "uri": "/d/a.mp4?\\u0074oken=Hunter2Secret", '
           b'"metadata": {"src": "https://u:Hunter2Secret\\u0040h/x", "password": "Hunter2Secret"}}')
    record = dlq_record(raw, b"v", "t", 0, 1, "not_allowed", "why")
    assert SECRET.encode() not in record
    body = parse_dlq_record(record)
    assert body["value"]["redacted"] and replayable_value(body)[0] is None
    assert json.loads(body["value"]["data"])["uri"] == "/d/a.mp4?token=<redacted>"  # still readable JSON


def test_dlq_reason_and_key_are_redacted_and_the_reason_still_says_what_was_wrong():
    reason = "'file://user:Hunter2Secret@localhost/a.mp4' resolves outside the allowed prefixes"
    record = dlq_record(b"{}", b"/k?token=Hunter2Secret", "t", 0, 1, "not_allowed", reason)
    assert SECRET.encode() not in record
    body = parse_dlq_record(record)
    assert body["reason"] == "'file://<redacted>@localhost/a.mp4' resolves outside the allowed prefixes"
    assert body["key"]["data"] == "/k?token=<redacted>" and body["key"]["redacted"]


def test_redact_record_cleans_a_record_written_without_redaction():
    # What an older worker (or another producer) may have put on the DLQ topic.
    value = b'{"uri": "/d/a.mp4?token=Hunter2Secret"}'
    old = {"error_class": "not_allowed", "reason": "got host 'u:Hunter2Secret@localhost'",
           "value": {"encoding": "utf-8", "data": value.decode(), "truncated": False, "redacted": False},
           "key": {"encoding": "base64", "data": base64.b64encode(b"Bearer Hunter2Secret").decode(),
                   "truncated": False, "redacted": False},
           "source": {"topic": "t", "partition": 0, "offset": 1}}
    shown = redact_record(old)
    assert SECRET not in json.dumps(shown) and SECRET not in base64.b64decode(shown["key"]["data"]).decode()
    assert shown["value"]["redacted"] and shown["key"]["redacted"] and shown["reason"].endswith("<redacted>@localhost'")
    assert old["value"]["data"] == value.decode()  # the record read back is not changed in place


def test_uri_errors_say_what_is_wrong_without_the_secret():
    local = DecodeSettings(allowed_prefixes=["/data"])
    with pytest.raises(UnsupportedURI) as info:
        resolve_uri("file://user:Hunter2Secret@localhost/data/a.mp4", local)
    assert "must not carry user-info" in info.value.reason and SECRET not in str(info.value)
    with pytest.raises(NotAllowed) as info:
        resolve_uri("/etc/a.mp4?token=Hunter2Secret", local)
    assert info.value.reason == "'/etc/a.mp4?token=<redacted>' resolves outside the allowed prefixes"
    remote = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=["https://cdn.example.com/v/"])
    with pytest.raises(NotAllowed) as info:
        resolve_uri("https://u:Hunter2Secret@cdn.example.com/v/a.mp4", remote)
    assert "user-info (user:password@)" in info.value.reason and SECRET not in info.value.reason
    # Every constructor redacts, whatever its caller passed; pickling (Ray) keeps it redacted.
    import pickle

    error = pickle.loads(pickle.dumps(VideoError("no file at /d/a.mp4?sig=Hunter2Secret")))
    assert error.reason == "no file at /d/a.mp4?sig=<redacted>"


def test_message_request_rpc_and_producer_errors_are_redacted_where_built():
    with pytest.raises(MessageError) as info:
        parse_ingest_message(b'{"op": "token=Hunter2Secret", "video_id": "v"}', b"v")
    assert info.value.reason == "unknown op 'token=<redacted>'; expected one of upsert, delete"
    assert SECRET not in str(MessageError(BAD_MESSAGE, "uri https://u:Hunter2Secret@h/x"))
    request = RequestError("filters[0].field", "unknown filter field 'api_key=Hunter2Secret'")
    assert str(request) == "filters[0].field: unknown filter field 'api_key=<redacted>'"
    failure = RpcFailure(grpc.StatusCode.NOT_FOUND, "video_id: no video '/v?token=Hunter2Secret'")
    assert failure.details == "video_id: no video '/v?token=<redacted>'" and SECRET not in str(failure)
    assert str(ProducerError("/d/a.mp4?token=Hunter2Secret: no such file")) == "/d/a.mp4?token=<redacted>: no such file"


@pytest.mark.parametrize("formatter", [KeyValueFormatter(), JsonFormatter()])
def test_log_lines_are_redacted_by_log_event_and_by_the_formatters(formatter):
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(formatter)
    logger = logging.getLogger("vidsearch.tests.redact")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        log_event(logger, "sent to DLQ", logging.WARNING, reason="'/d/a.mp4?token=Hunter2Secret' not found",
                  uri="https://u:Hunter2Secret@h/x", api_key="Hunter2Secret", offset=17)
        logger.info("plain call with %s", "Authorization: Bearer Hunter2Secret")
        try:
            raise OSError("reading 'https://h/a?X-Amz-Signature=Hunter2Secret' failed")
        except OSError:
            logger.exception("with a traceback")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(lines)
    assert len(lines) == 3 and SECRET not in text, text
    assert "token=<redacted>" in text and "Bearer <redacted>" in text and "X-Amz-Signature=<redacted>" in text
    assert "17" in lines[0]  # numbers stay numbers


@pytest.mark.timeout(120)
def test_hostile_input_is_redacted_in_linear_time():
    # Each of these would take minutes with a backtracking pattern (no timing asserted:
    # the timeout only stops a quadratic regression from hanging the suite).
    size = 256 * 1024
    for text in ("a." * (size // 2), "a:" * (size // 2), '"password": "' + '\\"' * (size // 2),
                 "eyJ" * (size // 3), "a:b@" * (size // 4), "a://" * (size // 4), "?" + "a=1&" * (size // 4),
                 "token:'" * (size // 7), "\x01" * size, ("x" * 200 + "=") * (size // 201), "bearer " * (size // 7)):
        assert isinstance(redact(text), str)
