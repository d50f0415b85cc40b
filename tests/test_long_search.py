"""A long synthetic video through the real stack with the shipped model: a one-event
caption finds the video, once, and the best moment lies inside the event's span.

A 2-minute long video (``vidsearch synth --long``, 2 fps: few frames to decode) and a
few short synthetic videos as distractors go through Kafka and a real IngestWorker
(segments on: 30 s windows, 5 s overlap) into the embedded store; Ray Serve answers
gRPC searches with the ingress and the reranker, both on the shipped trained model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import grpc
import pytest

from query_support import (DEPLOY_TIMEOUT_S, Client, base_settings, free_port, ingest_through_broker,
                           small_options, wait_until)

from vidsearch.models.shipped import install_shipped_model, shipped_version
from vidsearch.retrieval_metrics import in_span, moment_metrics
from vidsearch.synth import generate_dataset, load_manifest
from vidsearch.synth_long import generate_long_dataset

SECONDS, FPS = 120.0, 2.0
DISTRACTORS = 6
# Measured on this set (seed 5, 12 captions) with the shipped model: R@1 91.7% (11 of 12),
# moment in the span for 33.3% of the captions (4 of 12) against a chance of 7.1%. The
# bounds keep a margin (9 of 12; 2 of 12, over twice chance) and still fail a search that
# ignores the query's time (chance) or the video (1 in 7).
MIN_R1, MIN_MOMENT = 75.0, 15.0


@dataclass
class LongService:
    client: Client
    record: Any  # the long video's SynthRecord
    video_ids: list[str]


@pytest.fixture(scope="module")
def long_service(ray_local, broker, tmp_path_factory) -> Iterator[LongService]:
    from ray import serve

    from vidsearch.services.query.deploy import deploy

    root = tmp_path_factory.mktemp("long-search")
    [record] = load_manifest(generate_long_dataset(root / "long", 1, seed=5, fps=FPS, seconds=SECONDS,
                                                   progress=False))
    short = load_manifest(generate_dataset(root / "short", DISTRACTORS, seed=5, progress=False))
    settings = base_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("long-store"),
                             video_root=root, registry=tmp_path_factory.mktemp("long-registry"), alias="videos",
                             grpc_port=free_port())
    settings = settings.model_copy(update={"decode": settings.decode.model_copy(update={"max_duration_s": 600.0})})
    assert install_shipped_model(settings) == shipped_version()
    bodies = [{"op": "upsert", "video_id": r.video_id, "uri": r.uri, "metadata": {"title": r.metadata["title"]}}
              for r in [record, *short]]
    _, version = ingest_through_broker(settings, bodies)
    assert version == shipped_version()
    deploy(settings, ingress_options=small_options(), reranker_options=small_options(), http_port=free_port())
    channel = grpc.insecure_channel(f"127.0.0.1:{settings.serve.grpc_port}")
    client = Client(channel, settings.serve.app_name)
    try:
        wait_until(lambda: client.search("warm up", top_k=1).reranked, DEPLOY_TIMEOUT_S, "a re-ranked search")
        yield LongService(client=client, record=record, video_ids=[r.video_id for r in [record, *short]])
    finally:
        channel.close()
        serve.shutdown()


def test_event_captions_find_the_long_video_and_its_moment(long_service):
    record = long_service.record
    windows = 5  # 120 s in 30 s windows 25 s apart
    ranks, moments, spans = [], [], []
    for event in record.events:
        response = long_service.client.search(event["caption"], top_k=len(long_service.video_ids))
        assert response.reranked and response.model_version == shipped_version()
        ids = [r.video_id for r in response.results]
        assert sorted(ids) == sorted(long_service.video_ids)  # every video once: grouped by video_id
        rank = ids.index(record.video_id) + 1
        hit = response.results[rank - 1]
        # Mechanics: the result names one of the video's segments, and its moment lies in it.
        assert hit.segment_count == windows and 0 <= hit.segment < windows
        assert hit.segment_end_s - hit.segment_start_s == pytest.approx(30.0)
        assert in_span(hit.best_moment_seconds, hit.segment_start_s, hit.segment_end_s + 1e-3)
        ranks.append(rank)
        moments.append(hit.best_moment_seconds)
        spans.append((event["start_s"], event["end_s"]))
    metrics = moment_metrics(ranks, moments, spans, [SECONDS] * len(spans))
    print(f"long search: {len(spans)} captions, R@1 {100 * ranks.count(1) / len(ranks):.1f}%, "
          f"moment@1 {metrics['moment@1']:.1f}%, moment_found {metrics['moment_found']:.1f}%, "
          f"chance {metrics['chance']:.1f}%")
    assert 100 * ranks.count(1) / len(ranks) >= MIN_R1
    assert metrics["moment_found"] >= MIN_MOMENT > 2 * metrics["chance"]


def test_a_short_video_is_one_segment_spanning_it(long_service):
    record = long_service.record
    response = long_service.client.search(record.events[0]["caption"], top_k=len(long_service.video_ids))
    short = [r for r in response.results if r.video_id != record.video_id]
    assert short and all(r.segment_count == 1 and r.segment == 0 and r.segment_start_s == 0.0 for r in short)
    assert all(r.segment_end_s == pytest.approx(3.0, abs=0.2) and 0 <= r.best_moment_seconds < r.segment_end_s
               for r in short)
