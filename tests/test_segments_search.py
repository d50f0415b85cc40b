"""Searching long videos over gRPC: each video once, with its best segment.

Real pieces throughout: videos ingested through Tansu by an IngestWorker into the
embedded store, Ray Serve with the ingress and the Reranker, a gRPC client. The
expected answer is computed in-process from the same store and model version
(group-by recall, cross-encoder scores per segment, fusion per video), the way the
other query tests check the service. Then a re-index to a new head recomputes each
segment's vector from its own stored frames and keeps its segment payload.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

from vidsearch.config import Settings
from vidsearch.services.query.response import build_results, pad_groups
from vidsearch.services.reranker.scoring import RerankRequest, score_requests
from vidsearch.services.trainer.reindex import reindex
from vidsearch.store import collection_name, open_store, shutdown_embedded_store

from query_support import (Client, base_settings, free_port, ingest_through_broker, small_options,
                           wait_until)
from reindex_support import aggregate_one, load_version, publish_new_head
from segment_support import check_segment_points, segmented, segments_of, write_long_clip

RERANK_SEGMENTS = 2
VIDEOS = {"long-a": 13.0, "long-b": 10.0, "short-c": 2.0, "short-d": 3.0}
QUERIES = ("a red sunset over the sea", "people walking", "a blue car")


@dataclass
class Env:
    settings: Settings
    client: Client
    store: Any
    collection: str
    version: str


def _publish(settings: Settings) -> str:
    """A tiny seqTransf model (a head with weights, so a new head changes the vectors)
    with non-zero cross-encoder output layers (a fresh one scores like recall)."""
    import torch

    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import PRODUCTION_ALIAS, save_model_version
    from vidsearch.registry import ModelRegistry

    model = build_model(load_model_config("tiny-seqtransf"), device="cpu", seed=0)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for head in (model.scorer.score_head, model.scorer.relevance_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
    registry = ModelRegistry(settings.model.registry_root)
    version = save_model_version(registry, settings.model.model_name, model, training={"note": "segment tests"})
    registry.set_alias(settings.model.model_name, PRODUCTION_ALIAS, version)
    return version


@pytest.fixture(scope="module")
def env(ray_local, broker, tmp_path_factory) -> Iterator[Env]:
    from ray import serve

    from vidsearch.services.query.deploy import deploy

    root = tmp_path_factory.mktemp("segment-videos")
    settings = segmented(base_settings(
        bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("segment-store"), video_root=root,
        registry=tmp_path_factory.mktemp("segment-registry"), alias="videos", grpc_port=free_port(),
        rerank_segments=RERANK_SEGMENTS))
    published = _publish(settings)
    bodies = []
    for seed, (video_id, seconds) in enumerate(VIDEOS.items()):
        path = write_long_clip(root / f"{video_id}.mp4", seconds, seed=20 + seed)
        bodies.append({"op": "upsert", "video_id": video_id, "uri": path.resolve().as_uri(),
                       "metadata": {"title": video_id}})
    collection, version = ingest_through_broker(settings, bodies)
    assert version == published
    store = open_store(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
    try:
        deploy(settings, ingress_options=small_options(), reranker_options=small_options(), http_port=free_port())
        client = Client(channel, settings.serve.app_name)
        wait_until(lambda: client.search("warm up", top_k=1).reranked, 180, "the first re-ranked search")
        yield Env(settings=settings, client=client, store=store, collection=collection, version=version)
    finally:
        channel.close()
        serve.shutdown()
        store.close()
        shutdown_embedded_store(settings)


def _expected(env: Env, query: str, rerank: bool) -> list[Any]:
    """What the service should answer, computed here from the same store and version."""
    import torch

    model = load_version(env.settings, env.version)
    with torch.inference_mode():
        vector = model.encode_text([query]).cpu().numpy()[0].astype(np.float32)
    groups = env.store.query_groups(env.collection, vector, 10, RERANK_SEGMENTS, None, True)
    candidates = pad_groups(groups)
    scores = relevance = None
    if rerank:
        ((scores, relevance),) = score_requests(model, [RerankRequest(query, candidates.frames, candidates.mask,
                                                                      env.version)])
    return build_results(candidates, vector, 10, env.settings.serve.beta, rerank_scores=scores,
                         frame_relevance=relevance, max_payload_bytes=env.settings.serve.max_payload_bytes,
                         max_response_bytes=env.settings.serve.max_response_bytes)


def test_search_returns_each_video_once_with_its_best_segment_span_over_grpc(env):
    assert env.store.count(env.collection) == 4 + 3 + 1 + 1  # 13 s and 10 s cut into 4 and 3 segments
    for video_id in VIDEOS:
        parts = segments_of(env.store, env.collection, video_id)
        check_segment_points(parts, parts[0].payload["duration_s"])
    best_segments = set()
    for query in QUERIES:
        for rerank in (True, False):
            response = env.client.search(query, top_k=10, recall_k=10, rerank=rerank)
            assert response.reranked is rerank
            ids = [r.video_id for r in response.results]
            assert sorted(ids) == sorted(VIDEOS)  # every video once, never one per segment
            for result in response.results:
                parts = segments_of(env.store, env.collection, result.video_id)
                stored = parts[result.segment].payload
                assert result.segment_count == len(parts) == stored["segment_count"]
                assert (result.segment_start_s, result.segment_end_s) == pytest.approx(
                    (stored["start_s"], stored["end_s"]))
                # The best moment is a frame of the returned segment, in seconds from the start.
                assert result.best_moment_seconds == pytest.approx(
                    min(stored["frame_timestamps"], key=lambda t: abs(t - result.best_moment_seconds)), abs=1e-4)
                assert result.segment_start_s - 0.25 <= result.best_moment_seconds <= result.segment_end_s
                if result.segment_count == 1:
                    assert result.segment_start_s == 0.0
                    assert result.segment_end_s == pytest.approx(VIDEOS[result.video_id], abs=0.3)
            expected = _expected(env, query, rerank)
            assert ids == [r.video_id for r in expected]
            for got, want in zip(response.results, expected):
                assert got.segment == want.segment, (query, rerank, got.video_id)
                assert got.best_moment_seconds == pytest.approx(want.best_moment_seconds, abs=1e-4)
                assert got.score == pytest.approx(want.score, abs=1e-4)
                best_segments.add((got.video_id, got.segment))
    # Not always a video's first segment: the grouping picks among them.
    assert any(segment > 0 for _, segment in best_segments), best_segments


def test_reindex_recomputes_each_segment_from_its_own_frames_and_keeps_its_span(env):
    new = publish_new_head(env.settings, env.version, seed=3)
    report = reindex(env.settings, new, progress=False, grace_s=1.0)
    assert report.decoded == 0 and not report.failed
    target = collection_name(new, env.settings.store.alias)
    model = load_version(env.settings, new)
    assert env.store.count(target) == env.store.count(env.collection)
    for video_id in VIDEOS:
        before = segments_of(env.store, env.collection, video_id, with_vectors=True)
        after = segments_of(env.store, target, video_id, with_vectors=True)
        assert len(after) == len(before)
        for old, fresh in zip(before, after):
            for field in ("segment", "segment_count", "start_s", "end_s", "frame_timestamps", "ingested_at"):
                assert fresh.payload[field] == old.payload[field]
            assert fresh.payload["model_version"] == new
            np.testing.assert_allclose(fresh.frames, old.frames, atol=1e-6)
            np.testing.assert_allclose(fresh.video_vector, aggregate_one(model, fresh.frames), atol=1e-4)
            assert not np.allclose(fresh.video_vector, old.video_vector, atol=1e-3)
