"""Long videos through the real ingest path: Tansu, local Ray, the embedded store.

A video longer than ``decode.segment_s`` becomes one point per segment (window),
a short one stays one point under its old id; re-ingesting a video that got
shorter leaves none of its old segments; delete removes them all; a video needing
more than ``decode.max_segments`` goes to the DLQ (and the producer's pre-check
refuses it); a SIGKILL in the middle of long videos loses and duplicates nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vidsearch.messages import UpsertOp
from vidsearch.services.ingest.producer import ProducerError, check_ops
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import collection_name, open_store
from vidsearch.store_schema import point_id
from vidsearch.uris import TooLarge
from vidsearch.video import probe_video

from ingest_support import (  # noqa: F401 - fixtures
    WorkerProcess, kill_after_first_point, committed_offsets, count_points, encoder_pool, end_offsets, ensure_topic, model_registry,
    produce, read_records, read_topic, run_to_end, settings_for, store_path, upsert_msg, delete_msg, uri,
    video_root, wait_for,
)
from segment_support import check_segment_points, expected_spans, segmented, segments_of, write_long_clip

FINISH_TIMEOUT_S = 120
START_TIMEOUT_S = 180
CRASH_VIDEOS = 10


@pytest.fixture(scope="module")
def long_files(video_root) -> dict[str, Path]:
    root = video_root / "segments"
    root.mkdir(exist_ok=True)
    return {
        "long": write_long_clip(root / "long.mp4", 13.0, seed=1),  # 4 segments
        "shorter": write_long_clip(root / "shorter.mp4", 7.0, seed=2),  # 2 segments
        "short": write_long_clip(root / "short.mp4", 2.0, seed=3),  # one point
        "huge": write_long_clip(root / "huge.mp4", 20.0, seed=4),  # 7 segments: over max_segments=5
    }


def _ids(store: Any, collection: str) -> list[str]:
    return sorted(p.video_id for page in store.scroll(collection) for p in page)


def test_long_video_segments_shorter_reingest_delete_and_the_segment_limit(
        settings_for, encoder_pool, broker, long_files):
    settings = segmented(settings_for(), max_segments=5)
    topic = settings.broker.ingest_topic
    collection = collection_name(encoder_pool.info.model_version, settings.store.alias)
    ensure_topic(broker.bootstrap, topic, settings.broker.dlq_topic)
    produce(broker.bootstrap, topic, [upsert_msg("long", long_files["long"], title="long"),
                                      upsert_msg("short", long_files["short"], title="short"),
                                      upsert_msg("huge", long_files["huge"])])
    worker = IngestWorker(settings, pool=encoder_pool, client_id="segments")
    store = open_store(settings)
    try:
        assert run_to_end(worker, broker.bootstrap, topic, FINISH_TIMEOUT_S), worker.metrics.snapshot()

        # The long video: one point per window, each with its own frames and span.
        long_parts = segments_of(store, collection, "long", with_vectors=True)
        duration = long_parts[0].payload["duration_s"]
        assert len(long_parts) == len(expected_spans(duration)) == 4
        check_segment_points(long_parts, duration)
        assert all(p.payload["metadata"] == {"title": "long"} for p in long_parts)
        assert len({p.payload["ingested_at"] for p in long_parts}) == 1
        # Segment 0 keeps the video's old point id (get reads by that id).
        assert store.get(collection, ["long"])[0].payload["segment"] == 0
        # The short video: one point, under point_id(video_id), spanning it all.
        (short,) = segments_of(store, collection, "short")
        assert store.get(collection, ["short"])[0].payload == short.payload
        assert (short.payload["segment"], short.payload["segment_count"], short.payload["start_s"]) == (0, 1, 0.0)
        assert short.payload["end_s"] == short.payload["duration_s"]
        assert store.count(collection) == 5 and _ids(store, collection) == ["long"] * 4 + ["short"]
        assert point_id("long", 1) not in {point_id("long"), point_id("long#1")}

        # Over max_segments: the DLQ, with a reason naming the setting; nothing stored.
        (dead,) = read_topic(broker.bootstrap, settings.broker.dlq_topic, 1)
        assert dead["error_class"] == "too_large"
        assert "7 segments" in dead["reason"] and "max_segments=5" in dead["reason"], dead["reason"]
        # The producer CLI's pre-check refuses it from the header, before publishing.
        with pytest.raises(TooLarge, match="max_segments=5"):
            probe_video(uri(long_files["huge"]), settings.decode)
        with pytest.raises(ProducerError, match=r"decode\.max_segments"):
            check_ops([UpsertOp("huge", uri(long_files["huge"]), {})], settings)
        check_ops([UpsertOp("long", uri(long_files["long"]), {})], settings)

        # Re-ingested from a shorter file: 2 segments, none of the old 4 left.
        produce(broker.bootstrap, topic, [upsert_msg("long", long_files["shorter"], title="shorter")])
        assert run_to_end(worker, broker.bootstrap, topic, FINISH_TIMEOUT_S)
        parts = segments_of(store, collection, "long", with_vectors=True)
        assert len(parts) == 2 and all(p.payload["metadata"] == {"title": "shorter"} for p in parts)
        check_segment_points(parts, parts[0].payload["duration_s"])
        assert store.count(collection) == 3

        # Delete: every segment goes, the other video stays.
        produce(broker.bootstrap, topic, [delete_msg("long")])
        assert run_to_end(worker, broker.bootstrap, topic, FINISH_TIMEOUT_S)
        assert segments_of(store, collection, "long") == []
        assert _ids(store, collection) == ["short"]
    finally:
        worker.close()
        store.close()


def test_sigkill_in_the_middle_of_long_videos_loses_and_duplicates_no_segment(
        settings_for, encoder_pool, broker, long_files, tmp_path):
    # One record per poll: many batches, so the kill lands between poll and commit.
    settings = segmented(settings_for(max_poll_records=1))
    settings.broker.max_poll_interval_ms = 10_000
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    collection = collection_name(encoder_pool.info.model_version, settings.store.alias)
    files = [long_files["long"], long_files["shorter"]]
    ids = [f"long-{i:02d}" for i in range(CRASH_VIDEOS)]
    segments = {v: 4 if i % 2 == 0 else 2 for i, v in enumerate(ids)}
    ensure_topic(broker.bootstrap, topic)
    produce(broker.bootstrap, topic, [upsert_msg(v, files[i % 2], n=i) for i, v in enumerate(ids)])
    store = open_store(settings)
    proc = WorkerProcess(settings, tmp_path, "doomed-segments")
    kill_after_first_point(proc, store, collection, START_TIMEOUT_S)
    try:
        committed = committed_offsets(broker.bootstrap, group, topic)
        records = read_records(broker.bootstrap, topic, CRASH_VIDEOS)
        done = {r.key.decode() for r in records if r.offset < committed[r.partition]}
        assert len(done) < CRASH_VIDEOS, "the worker finished before the kill; nothing was tested"
        # Commit after store: a committed video has every one of its segments.
        for video_id in done:
            assert len(segments_of(store, collection, video_id)) == segments[video_id]

        successor = IngestWorker(settings, pool=encoder_pool, client_id="segments-successor")
        try:
            assert run_to_end(successor, broker.bootstrap, topic, FINISH_TIMEOUT_S), successor.metrics.snapshot()
        finally:
            successor.close()
        assert successor.metrics.value("vidsearch_ingest_videos_total", op="upsert") == CRASH_VIDEOS - len(done)
        # Every video whole, no segment twice (ids are per segment, so a rewrite overwrites).
        assert store.count(collection) == sum(segments.values())
        for i, video_id in enumerate(ids):
            parts = segments_of(store, collection, video_id)
            assert [p.payload["segment"] for p in parts] == list(range(segments[video_id]))
            assert all(p.payload["metadata"] == {"n": i} for p in parts)
        assert committed_offsets(broker.bootstrap, group, topic) == end_offsets(broker.bootstrap, topic)
    finally:
        store.close()
