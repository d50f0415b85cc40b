"""Search and GetVideo end to end over gRPC: Ray Serve (two apps) in front of videos
ingested through the real broker by a real IngestWorker (tiny preset).

Covers every response field, filters, every invalid-input status, FAILED_PRECONDITION
without a live index, NOT_FOUND, the API key check, and the clients: `vidsearch search`
(the installed entry point, in a subprocess) and the README's Python snippet.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2

from vidsearch.model_versions import load_model_for_version
from vidsearch.store import open_store
from vidsearch.services.query.deadline import DEADLINE_METADATA
from vidsearch.v1 import search_pb2

from query_support import (NUM_VIDEOS, free_port, query_data, query_service, rpc_error,  # noqa: F401
                           serve_settings)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
VIDSEARCH = Path(sys.executable).with_name("vidsearch")
API_KEY = "s3cret-key"


def value(v) -> struct_pb2.Value:
    out = struct_pb2.Value()
    json_format.ParseDict(v, out)
    return out


def equals(field: str, v) -> search_pb2.FieldFilter:
    return search_pb2.FieldFilter(field=field, equals=value(v))


def any_of(field: str, *values) -> search_pb2.FieldFilter:
    return search_pb2.FieldFilter(field=field, any_of=search_pb2.AnyOf(values=[value(v) for v in values]))


def in_range(field: str, **bounds) -> search_pb2.FieldFilter:
    return search_pb2.FieldFilter(field=field, range=search_pb2.Range(**{k: value(v) for k, v in bounds.items()}))


def ids(response) -> set[str]:
    return {r.video_id for r in response.results}


def payload(result) -> dict:
    return json_format.MessageToDict(result.payload)


@pytest.fixture(scope="module")
def expected_recall(query_service):
    """query -> {video_id: cosine}, computed in-process with the same model version."""
    data = query_service.data
    model = load_model_for_version(data.settings, data.model_version)
    store = open_store(data.settings)
    videos = {v.video_id: v.video_vector for v in store.get(data.collection, data.video_ids, with_vectors=True)}

    def compute(query: str) -> dict[str, float]:
        text = model.encode_text([query]).detach().numpy()[0]
        return {vid: float(np.dot(text, vec) / np.linalg.norm(vec)) for vid, vec in videos.items()}

    return compute


# --------------------------------------------------------------------------- search

def test_search_returns_ingested_videos_with_every_field(query_service, expected_recall):
    data = query_service.data
    query = "a red clip with a moving square"
    response = query_service.client().search(query, top_k=NUM_VIDEOS)

    assert sorted(ids(response)) == data.video_ids  # recall_k 50 > 12 videos: all come back
    assert response.reranked is True
    assert response.model_version == data.model_version
    assert response.index == data.collection
    timings = response.timings
    assert timings.encode_ms > 0 and timings.recall_ms > 0 and timings.rerank_ms > 0
    assert timings.total_ms >= timings.encode_ms + timings.recall_ms + timings.rerank_ms - 1e-3

    recall = expected_recall(query)
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 <= min(scores) < max(scores) <= 1.0
    for result in response.results:
        body = payload(result)
        # recall_score is the raw cosine of the query with the stored video vector,
        # computed here with the very model version that built the index.
        assert result.recall_score == pytest.approx(recall[result.video_id], abs=1e-4)
        assert result.rerank_score != 0.0 and math.isfinite(result.rerank_score)
        assert 0.0 <= result.score <= 1.0
        assert result.best_moment_seconds == pytest.approx(
            min(body["frame_timestamps"], key=lambda t: abs(t - result.best_moment_seconds)))
        assert body["video_id"] == result.video_id
        assert body["metadata"] == data.metadata[result.video_id]
        assert body["uri"] == (data.video_root / f"{result.video_id}.mp4").resolve().as_uri()
        assert body["model_version"] == data.model_version
        assert body["duration_s"] == pytest.approx(data.durations[result.video_id])


def test_top_k_cuts_the_fused_ranking(query_service):
    client = query_service.client()
    full = client.search("green clip", top_k=NUM_VIDEOS)
    top3 = client.search("green clip", top_k=3)
    assert [r.video_id for r in top3.results] == [r.video_id for r in full.results][:3]


def test_default_top_k_is_ten(query_service):
    assert len(query_service.client().search("any clip").results) == 10


def test_no_rerank_gives_recall_order(query_service, expected_recall):
    response = query_service.client().search("blue clip", top_k=NUM_VIDEOS, rerank=False)
    assert response.reranked is False
    assert all(r.rerank_score == 0.0 for r in response.results)
    recall = expected_recall("blue clip")
    assert [r.video_id for r in response.results] == sorted(recall, key=recall.get, reverse=True)
    # Recall-only scores are the min-max normalised cosines.
    low, high = min(recall.values()), max(recall.values())
    for r in response.results:
        assert r.score == pytest.approx((recall[r.video_id] - low) / (high - low), abs=1e-4)


def test_recall_k_limits_the_candidates(query_service, expected_recall):
    response = query_service.client().search("red clip", top_k=4, recall_k=4)
    recall = expected_recall("red clip")
    assert ids(response) == set(sorted(recall, key=recall.get, reverse=True)[:4])


# --------------------------------------------------------------------------- filters

def test_equality_filter_on_a_keyword_field(query_service):
    response = query_service.client().search("clip", top_k=NUM_VIDEOS, filters=[equals("category", "sports")])
    assert ids(response) == {vid for vid, m in query_service.data.metadata.items() if m["category"] == "sports"}


def test_equality_filter_on_a_list_field_matches_an_element(query_service):
    response = query_service.client().search("clip", top_k=NUM_VIDEOS, filters=[equals("tags", "red")])
    expected = {vid for vid, m in query_service.data.metadata.items() if "red" in m["tags"]}
    assert ids(response) == expected and len(expected) == NUM_VIDEOS // 3


def test_any_of_filter(query_service):
    response = query_service.client().search("clip", top_k=NUM_VIDEOS,
                                             filters=[any_of("category", "news", "music")])
    assert ids(response) == {vid for vid, m in query_service.data.metadata.items()
                             if m["category"] in ("news", "music")}


def test_numeric_range_on_a_system_field(query_service):
    durations = query_service.data.durations
    response = query_service.client().search("clip", top_k=NUM_VIDEOS, filters=[in_range("duration_s", gte=2.5)])
    expected = {vid for vid, d in durations.items() if d >= 2.5}
    assert ids(response) == expected and 0 < len(expected) < NUM_VIDEOS


def test_integer_range_on_a_metadata_field_and_filters_are_anded(query_service):
    metadata = query_service.data.metadata
    response = query_service.client().search(
        "clip", top_k=NUM_VIDEOS, filters=[in_range("views", gte=30, lt=90), equals("tags", "even")])
    assert ids(response) == {vid for vid, m in metadata.items() if 30 <= m["views"] < 90 and "even" in m["tags"]}


def test_datetime_range(query_service):
    client = query_service.client()
    everything = client.search("clip", top_k=NUM_VIDEOS, filters=[in_range("ingested_at", gte="2000-01-01T00:00:00Z")])
    assert len(everything.results) == NUM_VIDEOS
    nothing = client.search("clip", top_k=NUM_VIDEOS, filters=[in_range("ingested_at", lt="2000-01-01T00:00:00Z")])
    assert list(nothing.results) == [] and nothing.index == query_service.data.collection


# --------------------------------------------------------------------------- GetVideo

def test_get_video_returns_the_stored_payload(query_service):
    data = query_service.data
    response = query_service.client().get_video("vid-03")
    assert response.video_id == "vid-03" and response.index == data.collection
    body = json_format.MessageToDict(response.payload)
    assert body["metadata"] == data.metadata["vid-03"] and len(body["frame_timestamps"]) >= 1


def test_get_video_of_an_unknown_id_is_not_found(query_service):
    error = rpc_error(lambda: query_service.client().get_video("no-such-video"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-video" in error.details() and error.details().startswith("video_id")


def test_get_video_with_an_empty_id_is_invalid(query_service):
    error = rpc_error(lambda: query_service.client().get_video("  "))
    assert error.code() == INVALID and error.details().startswith("video_id:")


# --------------------------------------------------------------------------- invalid input

@pytest.mark.parametrize("fields, field", [
    ({"query": ""}, "query"),
    ({"query": " \t\n "}, "query"),
    ({"query": "x" * 513}, "query"),
    ({"top_k": 101}, "top_k"),
    ({"top_k": 20, "recall_k": 10}, "recall_k"),
    ({"recall_k": 1001}, "recall_k"),
    ({"beta": 1.5}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"filters": [equals("colour", "red")]}, "filters[0].field"),
    ({"filters": [equals("tags", "red"), search_pb2.FieldFilter(field="")]}, "filters[1].field"),
    ({"filters": [search_pb2.FieldFilter(field="tags")]}, "filters[0]"),
    ({"filters": [search_pb2.FieldFilter(field="duration_s", range=search_pb2.Range())]}, "filters[0].range"),
    ({"filters": [in_range("duration_s", gte=5, lt=2)]}, "filters[0].range"),
    ({"filters": [in_range("duration_s", gte="soon")]}, "filters[0].range"),
    ({"filters": [in_range("duration_s", gte=1, gt=2)]}, "filters[0].range"),
    ({"filters": [in_range("ingested_at", gte="yesterday")]}, "filters[0].range"),
    ({"filters": [in_range("tags", gte=1)]}, "filters[0].range"),
    ({"filters": [in_range("views", gte=True)]}, "filters[0].range.gte"),
    ({"filters": [equals("duration_s", 2.0)]}, "filters[0].equals"),
    ({"filters": [equals("views", 2.5)]}, "filters[0].equals"),
    ({"filters": [equals("tags", None)]}, "filters[0].equals"),
    ({"filters": [any_of("category")]}, "filters[0].any_of"),
    ({"filters": [any_of("duration_s", 1.0, 2.0)]}, "filters[0].any_of"),
])
def test_invalid_request_is_invalid_argument_naming_the_field(query_service, fields, field):
    fields = {"query": "a red clip", **fields}
    error = rpc_error(lambda: query_service.client().search(**fields))
    assert error.code() == INVALID, error.details()
    assert error.details().startswith(f"{field}:"), error.details()


# --------------------------------------------------------------------------- no live index

@pytest.fixture(scope="module")
def extra_apps(query_service) -> dict[str, str]:
    """Two more ingress applications, deployed together: one over an alias that points
    nowhere (nothing ingested or published) and one with serve.api_key = API_KEY."""
    data, port = query_service.data, query_service.settings.serve.grpc_port
    empty = serve_settings(data, port)
    empty = empty.model_copy(update={"store": empty.store.model_copy(update={"alias": "nothing_here"})})
    keyed = serve_settings(data, port, api_key=API_KEY)
    query_service.deploy_ingresses(empty, keyed)
    return {"no_index": empty.serve.app_name, "auth": keyed.serve.app_name}


def test_without_a_live_index_search_is_failed_precondition(query_service, extra_apps):
    client = query_service.client(extra_apps["no_index"])
    error = rpc_error(lambda: client.search("a red clip"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no live index" in error.details() and "nothing_here" in error.details()
    assert rpc_error(lambda: client.get_video("vid-01")).code() == grpc.StatusCode.FAILED_PRECONDITION
    # Validation still comes first: a bad request is reported as such.
    assert rpc_error(lambda: client.search(" ")).code() == INVALID


# --------------------------------------------------------------------------- deadline

def test_client_deadline_metadata_is_respected(query_service):
    client = query_service.client()
    base = client.metadata()
    # A deadline already spent when the request reaches the replica ends it there.
    late = rpc_error(lambda: client.search("a red clip", metadata=base + [(DEADLINE_METADATA, "0.001")]))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in late.details()
    bad = rpc_error(lambda: client.search("a red clip", metadata=base + [(DEADLINE_METADATA, "soon")]))
    assert bad.code() == INVALID and bad.details().startswith(DEADLINE_METADATA)
    ok = client.search("a red clip", top_k=3, metadata=base + [(DEADLINE_METADATA, "60000")])
    assert len(ok.results) == 3


# --------------------------------------------------------------------------- auth

@pytest.fixture(scope="module")
def auth_app(extra_apps) -> str:
    return extra_apps["auth"]


def test_api_key_is_required_when_configured(query_service, auth_app):
    key = API_KEY
    client = query_service.client(auth_app)

    missing = rpc_error(lambda: client.search("a red clip"))
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert missing.details().startswith("authorization:")
    wrong = rpc_error(lambda: client.search("a red clip", api_key="not-the-key"))
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    basic = rpc_error(lambda: client.search("a red clip", metadata=[("application", client.app),
                                                                     ("authorization", f"Basic {key}")]))
    assert basic.code() == grpc.StatusCode.UNAUTHENTICATED
    # Checked before validation: an unauthenticated caller learns nothing about the API.
    assert rpc_error(lambda: client.search(" ")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_error(lambda: client.get_video("vid-01")).code() == grpc.StatusCode.UNAUTHENTICATED

    response = client.search("a red clip", api_key=key, top_k=3)
    assert len(response.results) == 3 and response.model_version == query_service.data.model_version
    assert client.get_video("vid-01", api_key=key).video_id == "vid-01"
    # The main app has no key configured and accepts plain requests.
    assert len(query_service.client().search("a red clip", top_k=2).results) == 2


# --------------------------------------------------------------------------- clients

def vidsearch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VIDSEARCH), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def search(service, *args: str, app: str | None = None, env: dict[str, str] | None = None):
    return vidsearch("search", *args, "--address", service.address, "--app", app or service.settings.serve.app_name,
                     env=env)


def table_ids(stdout: str) -> list[str]:
    """Video ids of the table rows (the lines that start with a rank)."""
    rows = [line.split() for line in stdout.splitlines() if line.strip()[:1].isdigit()]
    return [row[1] for row in rows]


def test_cli_search_prints_a_table(query_service):
    data = query_service.data
    result = search(query_service, "a red clip", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[0].startswith("'a red clip': 3 result(s), re-ranked")
    assert data.model_version in lines[0] and data.collection in lines[0]
    assert lines[1].startswith("timings: encode")
    assert lines[2].split() == ["rank", "video", "id", "score", "recall", "rerank", "moment", "title"]
    ids = table_ids(out)
    assert len(ids) == 3 and set(ids) <= set(data.video_ids)
    for video_id in ids:
        row = next(line for line in lines if f" {video_id} " in line)
        assert data.metadata[video_id]["title"] in row


def test_cli_search_filters_and_no_rerank(query_service):
    data = query_service.data
    result = search(query_service, "clip", "--top-k", "12", "--filter", "category=news,music",
                    "--filter", "views>=50", "--no-rerank")
    assert result.returncode == 0, result.stderr
    assert "recall only (not re-ranked)" in result.stdout.splitlines()[0]
    assert set(table_ids(result.stdout)) == {vid for vid, m in data.metadata.items()
                                             if m["category"] in ("news", "music") and m["views"] >= 50}


@pytest.mark.parametrize("args, message", [
    (["a red clip", "--top-k", "101"], "vidsearch search: INVALID_ARGUMENT: top_k: must be between 1 and 100"),
    (["a red clip", "--filter", "colour=red"], "vidsearch search: INVALID_ARGUMENT: filters[0].field: unknown"),
    (["   "], "vidsearch search: INVALID_ARGUMENT: query: must not be empty"),
    (["a red clip", "--beta", "2"], "vidsearch search: INVALID_ARGUMENT: beta: must be between 0 and 1"),
    (["a red clip", "--filter", "views"], "vidsearch search: --filter 'views': expected FIELD=VALUE"),
])
def test_cli_bad_request_is_one_line_and_non_zero(query_service, args, message):
    result = search(query_service, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(message), result.stderr


def test_cli_without_a_server_is_one_line_naming_the_address():
    address = f"127.0.0.1:{free_port()}"
    result = vidsearch("search", "a red clip", "--address", address, "--timeout", "10")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"vidsearch search: cannot reach the search service at {address}: "), line


def test_cli_sends_the_api_key_from_the_environment(query_service, auth_app):
    key, app = API_KEY, auth_app

    without = search(query_service, "a red clip", app=app)
    assert without.returncode == 1
    assert without.stderr.strip().startswith("vidsearch search: UNAUTHENTICATED: authorization:")
    wrong = search(query_service, "a red clip", app=app, env={"VIDSEARCH_API_KEY": "nope"})
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    right = search(query_service, "a red clip", "--top-k", "2", app=app, env={"VIDSEARCH_API_KEY": key})
    assert right.returncode == 0, right.stderr
    assert len(table_ids(right.stdout)) == 2


def test_readme_python_client_runs_against_the_service(query_service, capsys):
    from test_readme import readme_python_client

    snippet = readme_python_client()
    assert '"127.0.0.1:50051"' in snippet and '("application", "vidsearch")' in snippet
    snippet = snippet.replace('"127.0.0.1:50051"', repr(query_service.address))
    snippet = snippet.replace('("application", "vidsearch")', f'("application", {query_service.settings.serve.app_name!r})')
    exec(compile(snippet, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    assert all(line.split()[0] in query_service.data.metadata for line in lines)
