"""The response builder's payload defences, directly (no service): a stored payload
that can't be encoded or is too large is cut for its own result, credentials never
leave, and the typed summary is filled (issue 9, failures 2 and 3)."""
from __future__ import annotations

import numpy as np
import pytest

from vidsearch.services.query.payloads import (NOTICE_FIELD, fit_response, payload_view, public_payload,
                                               summarize, to_struct)
from vidsearch.services.query.response import Candidates, build_results
from vidsearch.store_schema import Hit
from vidsearch.uris import public_uri
from vidsearch.v1 import search_pb2

LIMIT = 1024 * 1024
RESPONSE_LIMIT = 3584 * 1024
CLIENT_LIMIT = 4 * 1024 * 1024


def nested(depth: int) -> dict:
    value: object = "leaf"
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


def payload(video_id: str, metadata: dict, uri: str = "file:///data/v.mp4") -> dict:
    return {"video_id": video_id, "uri": uri, "metadata": metadata, "duration_s": 2.0,
            "frame_timestamps": [0.0, 1.0], "ingested_at": "2026-01-01T00:00:00.000Z",
            "frame_encoder": "enc", "model_version": "v1"}


def decodes(message: search_pb2.SearchResponse) -> search_pb2.SearchResponse:
    """What a client with protobuf's default limits reads back."""
    return search_pb2.SearchResponse.FromString(message.SerializeToString())


@pytest.mark.parametrize("bad, left_out", [
    ({"deep": nested(60), "title": "kept"}, "deep"),
    ({"broken": "\ud800 lone surrogate", "title": "kept"}, "broken"),
    ({"huge": "x" * (2 * LIMIT), "title": "kept"}, "huge"),
])
def test_a_poison_payload_is_cut_for_its_result_only(bad, left_out):
    view = payload_view("p", payload("p", bad), LIMIT)
    assert left_out in view.notice and view.notice.startswith("payload ")
    out = to_dict(view.struct)
    assert out["metadata"] == {"title": "kept"} and out[NOTICE_FIELD] == view.notice
    assert out["video_id"] == "p" and out["duration_s"] == 2.0
    # The cut payload itself is safe to send.
    decodes(search_pb2.SearchResponse(results=[search_pb2.SearchResult(payload=view.struct)]))


def test_the_payload_before_the_fix_could_not_be_decoded():
    """What the old builder did (to_struct of the stored payload, sent as is) fails:
    deep enough in the server (INTERNAL for the whole search), a little less in the client."""
    for depth in (40, 60):
        with pytest.raises(Exception, match="too deep|Exceeded|recursion|Error parsing"):
            decodes(search_pb2.SearchResponse(results=[search_pb2.SearchResult(
                payload=to_struct(payload("p", {"deep": nested(depth)})))]))
        assert "deep" in payload_view("p", payload("p", {"deep": nested(depth)}), LIMIT).notice


def test_a_payload_of_system_garbage_becomes_a_marker():
    bad = payload("p", {}, uri="file:///\ud800.mp4")
    view = payload_view("p", bad, LIMIT)
    assert to_dict(view.struct) == {"video_id": "p", NOTICE_FIELD: view.notice}
    assert "only the video id" in view.notice


def test_an_ordinary_payload_is_returned_whole():
    stored = payload("ok", {"title": "A red ball", "tags": ["ball", "red"], "category": "toys", "n": 3})
    view = payload_view("ok", stored, LIMIT)
    assert view.notice == "" and to_dict(view.struct) == stored
    assert view.summary.title == "A red ball" and list(view.summary.tags) == ["ball", "red"]
    assert view.summary.duration_s == 2.0 and view.summary.category == "toys"
    assert view.summary.uri == "file:///data/v.mp4"


@pytest.mark.parametrize("uri, expected", [
    ("file:///data/a.mp4?token=secret", "file:///data/a.mp4"),
    ("https://user:pass@cdn.example.com:8443/v/a.mp4?X-Amz-Signature=abc#t=3", "https://cdn.example.com:8443/v/a.mp4"),
    ("s3://bucket/key.mp4?versionId=1", "s3://bucket/key.mp4"),
    ("/data/plain path?.mp4", "/data/plain path?.mp4"),  # a plain path is a file name, kept
])
def test_credentials_never_leave_in_the_uri(uri, expected):
    assert public_uri(uri) == expected
    stored = {**payload("c", {}, uri=uri), "source_uri": uri, "_private": "x"}
    view = payload_view("c", stored, LIMIT)
    out = to_dict(view.struct)
    assert out["uri"] == expected and view.summary.uri == expected
    assert "source_uri" not in out and "_private" not in out
    assert set(public_payload(stored)) == set(stored) - {"source_uri", "_private"}


def test_summary_ignores_wrong_types_and_caps_lengths():
    summary = summarize({"metadata": {"title": ["not", "a", "string"], "tags": "solo", "category": 5},
                         "duration_s": float("nan")})
    assert summary.title == "" and list(summary.tags) == ["solo"] and summary.category == ""
    assert summary.duration_s == 0.0
    long = summarize({"metadata": {"title": "t" * 5000, "tags": ["a" * 999, 3, None, "b"]}})
    assert len(long.title) == 1024 and [len(t) for t in long.tags] == [256, 1]


def test_the_response_is_cut_until_it_fits_the_client_limit():
    """100 hits of 100 KB each: the largest payloads are cut, the response fits 4 MB."""
    hits = [Hit(video_id=f"v{i}", score=1.0 - i / 100, payload=payload(f"v{i}", {"blob": "y" * 100_000}),
                frames=np.ones((2, 4), np.float32)) for i in range(100)]
    frames = np.ones((100, 2, 4), np.float32)
    candidates = Candidates(hits=hits, frames=frames, mask=np.ones((100, 2), bool))
    results = build_results(candidates, np.ones(4, np.float32), 100, 0.5, None, None,
                            max_payload_bytes=LIMIT, max_response_bytes=RESPONSE_LIMIT)
    response = search_pb2.SearchResponse(results=results)
    assert response.ByteSize() <= RESPONSE_LIMIT < CLIENT_LIMIT
    cut = [r for r in results if r.payload_notice]
    assert 0 < len(cut) < 100 and len(results) == 100
    assert all("exceed" in r.payload_notice for r in cut)
    whole = [r for r in results if not r.payload_notice]
    assert all(to_dict(r.payload)["metadata"]["blob"] == "y" * 100_000 for r in whole)
    decodes(response)


def test_fit_response_leaves_small_responses_alone():
    results = [search_pb2.SearchResult(video_id="a", payload=to_struct({"x": 1}))]
    assert fit_response(results, [{"x": 1}], RESPONSE_LIMIT) == 0 and not results[0].payload_notice


def to_dict(struct) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(struct)
