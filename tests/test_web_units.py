"""The search page's pure pieces, without Ray: HTTP parameters -> SearchRequest,
Range headers, error bodies, the one-frame decoder and the thumbnail cache."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from vidsearch.config import DecodeSettings
from vidsearch.services.query.errors import RequestError, RpcFailure
from vidsearch.services.web.http_errors import from_rpc_failure, parameter_of
from vidsearch.services.web.params import MAX_FILTERS, search_request
from vidsearch.services.web.ranges import ByteRange, RangeNotSatisfiable, parse_range
from vidsearch.services.web.thumbs import ThumbCache, jpeg_frame, parse_time
from vidsearch.video import NotAllowed, decode_frame_at
from vidsearch.video_writer import write_video


# --------------------------------------------------------------------------- parameters

def test_parameters_become_the_grpc_request():
    request = search_request([("q", "a red ball"), ("top_k", "5"), ("recall_k", "20"), ("rerank", "false"),
                              ("beta", "0.25"), ("filter", "tags=red,blue"), ("filter", "duration_s>=1.5")])
    assert (request.query, request.top_k, request.recall_k) == ("a red ball", 5, 20)
    assert request.HasField("rerank") and request.rerank is False
    assert request.HasField("beta") and request.beta == pytest.approx(0.25)
    assert [f.field for f in request.filters] == ["tags", "duration_s"]
    assert [v.string_value for v in request.filters[0].any_of.values] == ["red", "blue"]
    assert request.filters[1].range.gte.number_value == 1.5


def test_absent_parameters_leave_the_server_defaults():
    request = search_request([("q", "x")])
    assert request.top_k == 0 and request.recall_k == 0
    assert not request.HasField("rerank") and not request.HasField("beta") and not request.filters


@pytest.mark.parametrize("params, field", [
    ([], "query"),
    ([("q", "a"), ("q", "b")], "query"),
    ([("q", "a"), ("top_k", "five")], "top_k"),
    ([("q", "a"), ("top_k", "2.5")], "top_k"),
    ([("q", "a"), ("top_k", "-1")], "top_k"),
    ([("q", "a"), ("top_k", str(2**32))], "top_k"),
    ([("q", "a"), ("recall_k", "many")], "recall_k"),
    ([("q", "a"), ("rerank", "maybe")], "rerank"),
    ([("q", "a"), ("beta", "high")], "beta"),
    ([("q", "a"), ("filter", "no operator")], "filters[0]"),
    ([("q", "a"), ("filter", "tags=red"), ("filter", "tags=")], "filters[1]"),
    ([("q", "a")] + [("filter", "tags=red")] * (MAX_FILTERS + 1), "filters"),
    ([("q", "a"), ("topk", "5")], "topk"),
    ([("q", "a"), ("top_k", "1"), ("top_k", "2")], "top_k"),
])
def test_bad_parameters_name_the_field(params, field):
    with pytest.raises(RequestError) as caught:
        search_request(params)
    assert caught.value.field == field, str(caught.value)
    assert str(caught.value).startswith(f"{field}:")


def test_parameters_the_validator_judges_are_passed_through():
    # Limits are the gRPC validator's (applied by the ingress), not re-implemented here.
    assert search_request([("q", ""), ("top_k", "101"), ("beta", "nan")]).top_k == 101


@pytest.mark.parametrize("field, parameter", [
    ("query", "q"), ("top_k", "top_k"), ("filters[2].range.gte", "filter"), ("filters", "filter"), ("t", "t"),
])
def test_error_fields_map_to_http_parameters(field, parameter):
    assert parameter_of(field) == parameter


def test_rpc_failures_map_to_http_statuses():
    import grpc

    cases = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
             grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.FAILED_PRECONDITION: 503,
             grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
             grpc.StatusCode.INTERNAL: 500}
    for code, status in cases.items():
        error = from_rpc_failure(RpcFailure(code, "top_k: must be between 1 and 100"))
        assert error.status == status
    body = from_rpc_failure(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "query: must not be empty")).body()
    assert body["error"] == {"status": 400, "code": "INVALID_ARGUMENT", "field": "query", "parameter": "q",
                             "message": "query: must not be empty"}
    assert from_rpc_failure(RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, "no live index")).headers["Retry-After"]


def test_rpc_failure_survives_pickling():
    import pickle

    import grpc

    failure = pickle.loads(pickle.dumps(RpcFailure(grpc.StatusCode.NOT_FOUND, "video_id: no video 'x'")))
    assert failure.code == grpc.StatusCode.NOT_FOUND and failure.details == "video_id: no video 'x'"


# --------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("header, expected", [
    (None, None),
    ("bytes=0-99", ByteRange(0, 99)),
    ("bytes=10-", ByteRange(10, 999)),
    ("bytes=-100", ByteRange(900, 999)),
    ("bytes=-5000", ByteRange(0, 999)),
    ("bytes=990-5000", ByteRange(990, 999)),
    ("BYTES = 5 - 6", ByteRange(5, 6)),
    ("bytes=5-4", None),  # invalid: ignored, the whole file
    ("bytes=0-1,5-9", None),  # several ranges: ignored
    ("items=0-1", None),
    ("bytes=-", None),
    ("garbage", None),
])
def test_range_headers(header, expected):
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-1001", "bytes=5000-", "bytes=-0"])
def test_ranges_past_the_end_are_not_satisfiable(header):
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(header, 1000)
    assert caught.value.size == 1000


def test_any_range_of_an_empty_file_is_not_satisfiable():
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-10", 0)


def test_open_ended_ranges_are_capped():
    assert parse_range("bytes=100-", 10_000, open_ended_cap=1000) == ByteRange(100, 1099)
    assert parse_range("bytes=9500-", 10_000, open_ended_cap=1000) == ByteRange(9500, 9999)
    # An explicit end is the client's choice and is honoured.
    assert parse_range("bytes=0-4999", 10_000, open_ended_cap=1000) == ByteRange(0, 4999)
    assert ByteRange(100, 1099).content_range(10_000) == "bytes 100-1099/10000"


# --------------------------------------------------------------------------- one frame

@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """3 s at 8 fps, 48x64; frame k is uniformly grey level 10*k."""
    root = tmp_path_factory.mktemp("web-frames")
    frames = [np.full((48, 64, 3), 10 * k, np.uint8) for k in range(24)]
    return write_video(root / "grey.mp4", frames, fps=8.0)


def decode_settings(root: Path, **fields) -> DecodeSettings:
    return DecodeSettings(allowed_prefixes=[str(root)], **fields)


@pytest.mark.parametrize("at_s, index", [(0.0, 0), (1.0, 8), (1.3, 10), (2.9, 23), (60.0, 23)])
def test_decode_frame_at_gives_the_frame_on_screen(clip, at_s, index):
    decoded = decode_frame_at(str(clip), decode_settings(clip.parent), at_s)
    assert decoded.frames.shape == (1, 48, 64, 3)
    assert decoded.timestamps[0] == pytest.approx(index / 8.0)
    assert abs(float(decoded.frames.mean()) - 10 * index) < 4


def test_decode_frame_at_scales_down_never_up(clip):
    settings = decode_settings(clip.parent)
    assert decode_frame_at(str(clip), settings, 1.0, max_short_side=24).frames.shape == (1, 24, 32, 3)
    assert decode_frame_at(str(clip), settings, 1.0, max_short_side=480).frames.shape == (1, 48, 64, 3)


@pytest.mark.parametrize("at_s", [-1.0, float("nan"), float("inf"), "1", True])
def test_decode_frame_at_rejects_bad_times(clip, at_s):
    with pytest.raises(ValueError, match="at_s"):
        decode_frame_at(str(clip), decode_settings(clip.parent), at_s)


def test_decode_frame_at_keeps_the_allowlist(clip, tmp_path):
    with pytest.raises(NotAllowed):
        decode_frame_at(str(clip), decode_settings(tmp_path), 0.0)


def test_jpeg_frame_is_a_jpeg_of_that_frame(clip):
    from PIL import Image

    data = jpeg_frame(str(clip), decode_settings(clip.parent), 1.0)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (64, 48)
    assert abs(float(np.asarray(image).mean()) - 80) < 5


@pytest.mark.parametrize("raw, field_ok", [(None, 0.0), ("", 0.0), ("1.5", 1.5), ("0", 0.0)])
def test_thumb_time_parameter(raw, field_ok):
    assert parse_time(raw) == field_ok


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "soon"])
def test_bad_thumb_times_name_t(raw):
    with pytest.raises(RequestError) as caught:
        parse_time(raw)
    assert caught.value.field == "t"


def test_thumb_cache_is_a_bounded_lru():
    cache = ThumbCache(2)
    keys = [ThumbCache.key("videos__v1", f"vid-{i}", f"file:///v{i}.mp4", 1.234) for i in range(3)]
    cache.put(keys[0], b"0")
    cache.put(keys[1], b"1")
    assert cache.get(keys[0]) == b"0"  # now most recent
    cache.put(keys[2], b"2")
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == b"0" and len(cache) == 2
    # 10 ms resolution: the same thumbnail for 1.234 and 1.2341.
    assert ThumbCache.key("c", "v", "u", 1.234) == ThumbCache.key("c", "v", "u", 1.2341)
    off = ThumbCache(0)
    off.put(keys[0], b"0")
    assert off.get(keys[0]) is None
