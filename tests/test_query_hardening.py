"""Search never fails because of one stored point, and no credential leaves (issue 9).

A Serve deployment of its own over an index of its own (alias ``hard<suffix>``,
built from the session's ingested frames): 99 filler points whose metadata is as
large as ingest accepts, plus the points each test writes straight into Qdrant, as
an old or foreign writer would. Clients use gRPC's default limits (4 MB receive).
"""
from __future__ import annotations

import json
import uuid

import grpc
import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from query_support import (DEPLOY_TIMEOUT_S, free_port, query_data, serve_settings,  # noqa: F401 (fixture)
                           small_options, wait_until)
from vidsearch.config import MessageSettings
from vidsearch.messages import MessageError, check_metadata, parse_ingest_message

FILLERS = 99
LIMITS = MessageSettings()
# Frame timestamps of the stored frames every test point reuses (set by the fixture).
STAMPS: list[float] = []


def worst_case_metadata(index: int) -> dict:
    """Metadata at the ingest limits: many small array items (the costliest in protobuf)
    and text up to messages.max_metadata_bytes."""
    meta = {"title": f"filler {index}", "tags": ["filler", f"n{index % 7}"], "category": "filler",
            "nums": [index % 10] * 900}
    used = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode())
    left = (LIMITS.max_metadata_bytes - used - 40) // 2  # two-byte characters
    meta["text"] = ["é" * min(left, 4000), "é" * max(left - 4000, 0)]
    check_metadata(meta, LIMITS)
    return meta


class Hardened:
    def __init__(self, data, settings, store, collection, frames, vector) -> None:
        self.data, self.settings, self.store, self.collection = data, settings, store, collection
        self.frames, self.vector = frames, vector
        self.channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")  # default limits
        from vidsearch.v1 import search_pb2_grpc

        self.stub = search_pb2_grpc.SearchServiceStub(self.channel)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("application", self.settings.serve.app_name)]

    def write(self, video_id: str, payload: dict) -> None:
        """A point written straight into Qdrant (no ingest checks)."""
        from vidsearch.store import VideoPoint

        self.store.upsert(self.collection, [VideoPoint(video_id, self.vector, self.frames, payload)])

    def search(self, **fields):
        from vidsearch.v1 import search_pb2

        return self.stub.Search(search_pb2.SearchRequest(query="a clip", **fields), metadata=self.metadata,
                                timeout=60)

    def get(self, video_id: str):
        from vidsearch.v1 import search_pb2

        return self.stub.GetVideo(search_pb2.GetVideoRequest(video_id=video_id), metadata=self.metadata, timeout=30)


def payload_for(video_id: str, uri: str, metadata: dict) -> dict:
    from vidsearch.store import build_payload

    return build_payload(video_id, uri, metadata, STAMPS, 1.0, "test-encoder", "test")


@pytest.fixture(scope="module")
def hardened(query_data):
    from ray import serve

    from vidsearch.services.query.deploy import deploy
    from vidsearch.store import VideoPoint, collection_name, open_store

    alias = f"hard{uuid.uuid4().hex[:6]}"
    base = serve_settings(query_data, free_port())
    settings = base.model_copy(update={"store": base.store.model_copy(update={"alias": alias})})
    store = open_store(settings)
    real = store.get(query_data.collection, query_data.video_ids[:1], with_vectors=True)[0]
    collection = collection_name(query_data.model_version, alias)
    STAMPS[:] = real.payload["frame_timestamps"]
    store.ensure_collection(collection, real.video_vector.shape[0], real.frames.shape[1])
    uri = (query_data.video_root / "vid-00.mp4").resolve().as_uri()
    store.upsert(collection, [VideoPoint(f"filler-{i:03d}", real.video_vector, real.frames,
                                         payload_for(f"filler-{i:03d}", uri, worst_case_metadata(i)))
                              for i in range(FILLERS)])
    store.set_alias(collection, alias)
    deploy(settings, ingress_options=small_options(), reranker_options=small_options(), http_port=free_port())
    service = Hardened(query_data, settings, store, collection, real.frames, real.video_vector)
    try:
        wait_until(lambda: service.search(top_k=1, rerank=False).results, DEPLOY_TIMEOUT_S, "the first search")
        yield service
    finally:
        service.channel.close()
        serve.shutdown()


def as_dict(struct) -> dict:
    return json_format.MessageToDict(struct)


def test_a_full_page_of_worst_case_points_fits_the_default_client_limit(hardened):
    response = hardened.search(top_k=100, recall_k=100, rerank=False,
                               filters=[_prefix_filter([f"filler-{i:03d}" for i in range(FILLERS)])])
    assert len(response.results) == FILLERS and response.payloads_cut == 0
    assert response.ByteSize() < 4 * 1024 * 1024
    assert all(not r.payload_notice and r.summary.category == "filler" for r in response.results)


@pytest.mark.parametrize("name, metadata, why", [
    ("deep", {"title": "deep one", "x": json.loads('{"a":' * 60 + '1' + '}' * 60)}, "cannot be encoded"),
    ("huge", {"title": "huge one", "x": "z" * (5 * 1024 * 1024)}, "over the"),
    ("surrogate", {"title": "bad text", "x": "\ud800"}, "cannot be encoded"),
])
def test_a_poison_point_is_cut_and_the_other_results_come_back(hardened, name, metadata, why):
    """Before the fix: INTERNAL 'Message too deep' (deep), RESOURCE_EXHAUSTED in the
    client (huge), INTERNAL encode error (surrogate), for every search that hit it."""
    video_id = f"poison-{name}"
    stored = payload_for(video_id, "file:///v/p.mp4", {"title": metadata["title"]})
    stored["metadata"] = metadata  # what an old or foreign writer could store
    hardened.write(video_id, stored)
    try:
        ids = [video_id] + [f"filler-{i:03d}" for i in range(20)]
        response = hardened.search(top_k=21, recall_k=21, rerank=False, filters=[_prefix_filter(ids)])
        assert {r.video_id for r in response.results} == set(ids)
        assert response.payloads_cut == 1
        (poison,) = [r for r in response.results if r.video_id == video_id]
        assert why in poison.payload_notice and "'x'" in poison.payload_notice
        assert as_dict(poison.payload)["metadata"] == {"title": metadata["title"]}
        assert poison.summary.title == metadata["title"] if name != "surrogate" else True
        assert all(not r.payload_notice for r in response.results if r.video_id != video_id)
        got = hardened.get(video_id)
        assert why in got.payload_notice and as_dict(got.payload)["video_id"] == video_id
        # Ordinary searches over everything keep working too.
        assert hardened.search(top_k=100, recall_k=100).results
    finally:
        hardened.store.delete(hardened.collection, [video_id])


def test_credentials_in_stored_uris_never_reach_a_client(hardened):
    secrets = {"cred-file": "file:///v/a.mp4?token=s3cr3t-token",
               "cred-http": "https://alice:pa55word@cdn.example.com/v/a.mp4?X-Amz-Signature=s1gnature#frag"}
    for video_id, uri in secrets.items():
        hardened.write(video_id, {**payload_for(video_id, uri, {"title": video_id}), "uri": uri, "source_uri": uri})
    try:
        response = hardened.search(top_k=2, recall_k=2, rerank=False, filters=[_prefix_filter(list(secrets))])
        wire = response.SerializeToString() + b"".join(hardened.get(v).SerializeToString() for v in secrets)
        for word in (b"s3cr3t", b"alice", b"pa55word", b"s1gnature", b"frag"):
            assert word not in wire
        uris = {r.video_id: (as_dict(r.payload)["uri"], r.summary.uri) for r in response.results}
        assert uris == {"cred-file": ("file:///v/a.mp4", "file:///v/a.mp4"),
                        "cred-http": ("https://cdn.example.com/v/a.mp4", "https://cdn.example.com/v/a.mp4")}
    finally:
        hardened.store.delete(hardened.collection, list(secrets))


def test_typed_summary_fields(hardened):
    got = hardened.get("filler-003")
    assert got.summary.title == "filler 3" and list(got.summary.tags) == ["filler", "n3"]
    assert got.summary.duration_s == 1.0 and got.summary.ingested_at.endswith("Z")


def test_a_single_grpc_app_is_served_whatever_the_application_header_says(hardened):
    """What the README states: the reranker is not a gRPC app, so the proxy has one."""
    from vidsearch.v1 import search_pb2

    request = search_pb2.SearchRequest(query="a clip", top_k=1, rerank=False)
    for metadata in ([], [("application", "no-such-app")]):
        assert hardened.stub.Search(request, metadata=metadata, timeout=60).results


# --------------------------------------------------------------------------- property

JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=6)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=6), max_leaves=40)
METADATA = st.one_of(
    st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=8),
    # Near the size limits: long strings and long arrays.
    st.fixed_dictionaries({"title": st.text(max_size=4096), "tags": st.lists(st.text(max_size=64), max_size=200),
                           "n": st.lists(st.integers(-(2**53) + 1, 2**53 - 1), max_size=1000)}),
)


@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                  HealthCheck.data_too_large])
@given(metadata=METADATA, uri_tail=st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                                           max_size=60))
def test_whatever_ingest_accepts_search_and_get_video_return_whole(hardened, metadata, uri_tail):
    """Any message the ingest parser accepts becomes a point that GetVideo and a top-100
    Search (next to 99 points at the ingest limits) return whole, within 4 MB."""
    body = {"op": "upsert", "video_id": "prop", "uri": "file:///v/" + uri_tail, "metadata": metadata}
    value = json.dumps(body, ensure_ascii=False).encode("utf-8")
    try:
        op = parse_ingest_message(value, b"prop", LIMITS)
    except MessageError:
        assume(False)
        return
    stored = payload_for(op.video_id, op.uri, op.metadata)
    hardened.write("prop", stored)
    got = hardened.get("prop")
    assert got.payload_notice == ""
    assert as_dict(got.payload)["metadata"] == op.metadata
    response = hardened.search(top_k=100, recall_k=100, rerank=False)
    assert len(response.results) == 100 and response.payloads_cut == 0
    (hit,) = [r for r in response.results if r.video_id == "prop"]
    assert as_dict(hit.payload)["metadata"] == op.metadata


def _prefix_filter(video_ids: list[str]):
    from vidsearch.v1 import search_pb2

    values = [json_format.ParseDict(v, __import__("google.protobuf.struct_pb2", fromlist=["Value"]).Value())
              for v in video_ids]
    return search_pb2.FieldFilter(field="video_id", any_of=search_pb2.AnyOf(values=values))
