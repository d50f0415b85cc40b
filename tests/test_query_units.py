"""The pure pieces of the query path: validation, filters, fusion, auth, the CLI client's
filter parsing and table, and the live-index swap (with real tiny models and a real
in-memory Qdrant)."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2

from vidsearch.config import ServeSettings, StoreSettings
from vidsearch.services.query.auth import bearer_token, is_authorized
from vidsearch.services.query.client import ClientError, describe_rpc_error, format_response, parse_filter
from vidsearch.services.query.deadline import DEADLINE_METADATA, deadline_from_metadata
from vidsearch.services.query.errors import RequestError
from vidsearch.services.query.filters import filters_from_proto
from vidsearch.services.query.fusion import best_moments, frame_text_cosine, fuse, minmax, rank
from vidsearch.services.query.validation import validate_search, validate_video_id
from vidsearch.store_schema import Match, MatchAny, Range
from vidsearch.v1 import search_pb2

FIELDS = {"video_id": "keyword", "duration_s": "float", "ingested_at": "datetime", "tags": "keyword",
          "views": "integer", "live": "bool"}


def value(v) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out


def request(**fields) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(**{"query": "a red ball", **fields})


# --------------------------------------------------------------------------- validation

def test_defaults_are_filled_in():
    params = validate_search(request(query="  a red ball  "), ServeSettings(), FIELDS)
    assert (params.query, params.top_k, params.recall_k, params.rerank, params.beta, params.filters) == \
        ("a red ball", 10, 50, True, 0.5, ())


def test_unset_recall_k_is_raised_to_a_large_top_k():
    params = validate_search(request(top_k=80), ServeSettings(), FIELDS)
    assert (params.top_k, params.recall_k) == (80, 80)


def test_explicit_values_are_kept():
    params = validate_search(request(top_k=3, recall_k=7, rerank=False, beta=0.0), ServeSettings(), FIELDS)
    assert (params.top_k, params.recall_k, params.rerank, params.beta) == (3, 7, False, 0.0)


def test_query_limit_counts_what_the_client_sent():
    serve = ServeSettings(max_query_chars=10)
    assert validate_search(request(query="x" * 10), serve, FIELDS).query == "x" * 10
    with pytest.raises(RequestError, match=r"^query: is 12 characters, the limit is 10$"):
        validate_search(request(query=" " + "x" * 10 + " "), serve, FIELDS)


@pytest.mark.parametrize("fields, prefix", [
    ({"query": ""}, "query: must not be empty"),
    ({"top_k": 101}, "top_k: must be between 1 and 100 (got 101)"),
    ({"top_k": 5, "recall_k": 4}, "recall_k: must be between top_k (5) and 1000 (got 4)"),
    ({"recall_k": 1001}, "recall_k: "),
    ({"beta": -0.1}, "beta: "),
    ({"beta": float("inf")}, "beta: "),
])
def test_invalid_fields_are_named(fields, prefix):
    with pytest.raises(RequestError) as err:
        validate_search(request(**fields), ServeSettings(), FIELDS)
    assert str(err.value).startswith(prefix)


def test_video_id_validation():
    assert validate_video_id("abc") == "abc"
    for bad in ("", "   ", "x" * 513):
        with pytest.raises(RequestError, match="^video_id: "):
            validate_video_id(bad)


# --------------------------------------------------------------------------- filters

def test_filters_convert_to_store_specs():
    protos = [
        search_pb2.FieldFilter(field="tags", equals=value("red")),
        search_pb2.FieldFilter(field="views", equals=value(3.0)),
        search_pb2.FieldFilter(field="live", equals=value(True)),
        search_pb2.FieldFilter(field="views", any_of=search_pb2.AnyOf(values=[value(1), value(2)])),
        search_pb2.FieldFilter(field="duration_s", range=search_pb2.Range(gte=value(1.5), lt=value(4))),
        search_pb2.FieldFilter(field="ingested_at", range=search_pb2.Range(gt=value("2024-01-01T00:00:00Z"))),
    ]
    specs = filters_from_proto(protos, FIELDS)
    assert specs == [Match("tags", "red"), Match("views", 3), Match("live", True), MatchAny("views", [1, 2]),
                     Range("duration_s", gte=1.5, lt=4.0), Range("ingested_at", gt="2024-01-01T00:00:00Z")]
    assert isinstance(specs[1].value, int)  # protobuf numbers are doubles; integer fields want ints


@pytest.mark.parametrize("proto, prefix", [
    (search_pb2.FieldFilter(field="nope", equals=value("x")), "filters[0].field: unknown filter field 'nope'"),
    (search_pb2.FieldFilter(field="tags"), "filters[0]: needs a condition"),
    (search_pb2.FieldFilter(field="views", equals=value(1.5)), "filters[0].equals: integer field needs a whole"),
    (search_pb2.FieldFilter(field="views", equals=value({"a": 1})), "filters[0].equals: must be a string"),
    (search_pb2.FieldFilter(field="tags", any_of=search_pb2.AnyOf()), "filters[0].any_of: needs at least one"),
    (search_pb2.FieldFilter(field="tags", any_of=search_pb2.AnyOf(values=[value("a"), value([1])])),
     "filters[0].any_of.values[1]: "),
    (search_pb2.FieldFilter(field="views", range=search_pb2.Range(gte=value(float("nan")))),
     "filters[0].range.gte: must be a finite number"),
    (search_pb2.FieldFilter(field="views", range=search_pb2.Range(gte=value(9), lte=value(1))),
     "filters[0].range: range is empty"),
    (search_pb2.FieldFilter(field="ingested_at", range=search_pb2.Range(gte=value("2024-01-01T00:00:00"))),
     "filters[0].range: datetime bound needs a timezone"),
    (search_pb2.FieldFilter(field="duration_s", equals=value(2.0)), "filters[0].equals: exact match is not"),
])
def test_bad_filters_name_the_field(proto, prefix):
    with pytest.raises(RequestError) as err:
        filters_from_proto([proto], FIELDS)
    assert str(err.value).startswith(prefix), str(err.value)


def test_default_filter_fields_are_the_store_settings():
    specs = filters_from_proto([search_pb2.FieldFilter(field="category", equals=value("news"))],
                               StoreSettings().filter_fields)
    assert specs == [Match("category", "news")]


# --------------------------------------------------------------------------- fusion

def test_minmax_and_its_degenerate_cases():
    assert minmax(np.array([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]
    assert minmax(np.array([0.3, 0.3])).tolist() == [1.0, 1.0]
    assert minmax(np.array([0.7])).tolist() == [1.0]
    assert minmax(np.array([])).size == 0


def test_fuse_is_the_beta_mix_of_normalised_scores():
    recall = np.array([0.9, 0.5, 0.1])
    rerank = np.array([-2.0, 4.0, 1.0])
    assert fuse(recall, None, 0.7).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert fuse(recall, rerank, 0.0).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert fuse(recall, rerank, 1.0).tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert fuse(recall, rerank, 0.25).tolist() == pytest.approx([0.75, 0.625, 0.125])
    with pytest.raises(ValueError):
        fuse(recall, rerank[:2], 0.5)


def test_rank_is_stable_so_ties_keep_recall_order():
    assert rank(np.array([0.5, 1.0, 0.5, 1.0])).tolist() == [1, 3, 0, 2]


def test_best_moment_never_picks_padding():
    relevance = np.array([[0.1, 0.9, 5.0], [0.3, 0.2, 0.0]])
    mask = np.array([[True, True, False], [True, True, False]])
    assert best_moments(relevance, mask, [[0.0, 1.5, 3.0], [0.25, 0.75]]) == [1.5, 0.25]
    assert best_moments(relevance, mask, [[], [0.25, 0.75]]) == [0.0, 0.25]


def test_frame_text_cosine_guards_zero_padding():
    text = np.array([1.0, 0.0], dtype=np.float32)
    frames = np.array([[[2.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    assert frame_text_cosine(text, frames).tolist() == [[1.0, 0.0]]


# --------------------------------------------------------------------------- auth

def test_bearer_token_parsing():
    assert bearer_token([("application", "x"), ("authorization", "Bearer abc ")]) == "abc"
    assert bearer_token([("Authorization", b"bearer abc")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None
    assert bearer_token([]) is None


def test_is_authorized():
    assert is_authorized([], None)
    assert is_authorized([("authorization", "Bearer k")], "k")
    assert not is_authorized([("authorization", "Bearer k2")], "k")
    assert not is_authorized([], "k")


# --------------------------------------------------------------------------- CLI client

def test_parse_filter_spellings():
    eq = parse_filter("category=news")
    assert eq.field == "category" and eq.equals.string_value == "news"
    num = parse_filter("views=3")
    assert num.equals.number_value == 3
    quoted = parse_filter('tags="123"')
    assert quoted.equals.string_value == "123"
    any_of = parse_filter("category=news, music")
    assert [v.string_value for v in any_of.any_of.values] == ["news", "music"]
    low = parse_filter("duration_s>=2.5")
    assert low.range.gte.number_value == 2.5 and not low.range.HasField("lt")
    high = parse_filter("ingested_at<2024-01-01T00:00:00Z")
    assert high.range.lt.string_value == "2024-01-01T00:00:00Z"
    assert parse_filter("live=true").equals.bool_value is True
    assert parse_filter("tags=NaN").equals.string_value == "NaN"


@pytest.mark.parametrize("text", ["views", "=3", "views>=", "1x=3", "tags=a,,b"])
def test_parse_filter_rejects_garbage(text):
    with pytest.raises(ClientError, match=r"^--filter "):
        parse_filter(text)


def test_format_response_table():
    payload = struct_pb2.Struct()
    payload.update({"metadata": {"title": "a red ball " * 10}})
    response = search_pb2.SearchResponse(
        results=[search_pb2.SearchResult(video_id="v1", score=1.0, recall_score=0.25, rerank_score=3.5,
                                         best_moment_seconds=1.25, payload=payload),
                 search_pb2.SearchResult(video_id="v22", score=0.0, recall_score=0.125, rerank_score=-1.0)],
        reranked=True, model_version="base-1", index="videos__base-1",
        timings=search_pb2.StageTimings(encode_ms=1, recall_ms=2, rerank_ms=3, total_ms=7))
    lines = format_response(response, "q", mark="v22").splitlines()
    assert lines[0] == "'q': 2 result(s), re-ranked; model base-1, index videos__base-1"
    assert lines[1] == "timings: encode 1.0 ms, recall 2.0 ms, rerank 3.0 ms, total 7.0 ms"
    assert lines[3].split()[:6] == ["1", "v1", "1.000", "0.2500", "3.5000", "1.25s"]
    assert lines[3].endswith("…") and len(lines[3].split("1.25s")[1].strip()) == 48
    assert lines[4].split()[:3] == ["2", "v22", "*"]
    empty = format_response(search_pb2.SearchResponse(model_version="m", index="i"))
    assert empty.splitlines()[-1] == "(no results)" and "recall only" in empty


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_rpc_errors_become_one_line():
    assert describe_rpc_error(_Rpc(grpc.StatusCode.INVALID_ARGUMENT, "top_k: bad\nmore"), "h:1") == \
        "INVALID_ARGUMENT: top_k: bad"
    assert describe_rpc_error(_Rpc(grpc.StatusCode.UNAVAILABLE, "refused"), "h:1") == \
        "cannot reach the search service at h:1: refused"


# --------------------------------------------------------------------------- live index swap

@pytest.fixture(scope="module")
def tiny_models():
    from vidsearch.models import build_model

    return {"v1": build_model("tiny", device="cpu", seed=0), "v2": build_model("tiny", device="cpu", seed=1)}


def test_live_index_follows_the_alias_and_keeps_serving_when_a_load_fails(tiny_models, tmp_path):
    """Rule 2 of live.py: the new version is loaded before the swap, and a version that
    can't be loaded leaves the old pair live."""
    from qdrant_client import QdrantClient

    from vidsearch.services.query.live import LiveIndexTracker
    from vidsearch.store import VectorStore

    store = VectorStore.in_process(QdrantClient(location=":memory:"), StoreSettings(alias="videos"))
    loads: list[str] = []

    def load(version: str):
        loads.append(version)
        if version not in tiny_models:
            raise RuntimeError(f"no such version {version}")
        return tiny_models[version]

    tracker = LiveIndexTracker(store, "videos", load, poll_s=60)
    assert tracker.refresh() is None and "does not point" in tracker.problem
    for version in ("v1", "v2", "broken"):
        store.ensure_collection(f"videos__{version}", 32, 32)

    store.set_alias("videos__v1")
    first = tracker.refresh()
    assert (first.version, first.collection, first.model) == ("v1", "videos__v1", tiny_models["v1"])
    assert tracker.refresh() is first and loads == ["v1"]  # unchanged alias: nothing reloaded

    store.set_alias("videos__broken")
    with pytest.raises(RuntimeError):
        tracker.refresh()
    assert tracker.current is first  # still serving v1
    assert "videos__broken" in tracker.problem

    store.set_alias("videos__v2")
    second = tracker.refresh()
    assert (second.version, second.model) == ("v2", tiny_models["v2"])
    assert first.collection == "videos__v1"  # a request holding the old pair keeps it whole


def test_deadline_metadata_is_parsed_in_seconds():
    assert deadline_from_metadata([("application", "x")]) is None
    assert deadline_from_metadata([(DEADLINE_METADATA, "1500")]) == 1.5
    assert deadline_from_metadata([("Vidsearch-Deadline-Ms", b"250")]) == 0.25


@pytest.mark.parametrize("raw", ["soon", "0", "-5", "nan", "inf", ""])
def test_bad_deadline_metadata_names_the_entry(raw):
    with pytest.raises(RequestError, match=f"^{DEADLINE_METADATA}: must be"):
        deadline_from_metadata([(DEADLINE_METADATA, raw)])
