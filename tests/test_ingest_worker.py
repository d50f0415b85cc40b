"""The ingest worker in-process against the real broker, store actor, Ray and tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vidsearch.store import open_store, point_id
from vidsearch.services.ingest.worker import IngestWorker

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, fully_committed, group_lag, model_registry, produce, read_topic,
    settings_for, store_path, stored_ids, upsert_msg, delete_msg, uri, video_root,
)

TIMEOUT_S = 120


@pytest.fixture
def store(settings_for):
    handle = open_store(settings_for())
    yield handle
    handle.close()


def _worker(settings, encoder_pool, **kwargs) -> IngestWorker:
    return IngestWorker(settings, pool=encoder_pool, **kwargs)


def test_thirty_videos_become_thirty_points_and_offsets_are_committed(settings_for, encoder_pool, broker,
                                                                     video_root, store):
    settings = settings_for()
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    ids = [f"clip-{i:03d}" for i in range(30)]
    produce(broker.bootstrap, topic, [upsert_msg(v, video_root / f"{v}.mp4", title=f"title {v}", tags=["a", v])
                                      for v in ids])
    worker = _worker(settings, encoder_pool)
    try:
        worker.start()
        collection = worker.collection
        done = worker.run_until(lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= 30
                                and w.inflight_batches == 0, TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        assert worker.metrics.value("vidsearch_ingest_frames_encoded_total") >= 30
    finally:
        worker.close()

    assert sorted(stored_ids(store, collection)) == ids
    assert store.resolve_alias(settings.store.alias) == collection  # first boot created the alias
    videos = store.get(collection, ids, with_vectors=True)
    dim = encoder_pool.info.embed_dim
    for video in videos:
        assert video.video_vector.shape == (dim,)
        assert np.isclose(np.linalg.norm(video.video_vector), 1.0, atol=1e-3)
        frames = video.frames
        assert frames.ndim == 2 and frames.shape[1] == dim and 1 <= frames.shape[0] <= 4
        payload = video.payload
        assert payload["uri"] == uri(video_root / f"{video.video_id}.mp4")
        assert len(payload["frame_timestamps"]) == frames.shape[0]
        assert payload["frame_timestamps"] == sorted(payload["frame_timestamps"])
        assert payload["duration_s"] > 0
        assert payload["metadata"] == {"title": f"title {video.video_id}", "tags": ["a", video.video_id]}
        assert payload["frame_encoder"] == encoder_pool.info.frame_encoder_id
        assert payload["model_version"] == encoder_pool.info.model_version
        assert collection.endswith(payload["model_version"])
    assert fully_committed(broker.bootstrap, group, topic), group_lag(broker.bootstrap, group, topic)
    assert sum(end for _, end in group_lag(broker.bootstrap, group, topic).values()) == 30
