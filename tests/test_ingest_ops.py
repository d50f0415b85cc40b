"""Deletes, op ordering within and across batches, and deterministic point ids,
through the real worker, broker, store actor and tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from vidsearch.messages import DeleteOp, UpsertOp
from vidsearch.services.ingest.batch import Batch
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store

from ingest_support import (  # noqa: F401 - fixtures
    delete_msg, encoder_pool, ensure_topic, model_registry, produce, produce_to, read_records, read_topic,
    run_to_end, settings_for, store_path, stored_ids, upsert_msg, uri, video_root,
)

TIMEOUT_S = 120


@pytest.fixture
def setup(settings_for, encoder_pool, broker):
    """(settings, a started worker of a fresh group, the store); the worker is closed after."""
    settings = settings_for()
    ensure_topic(broker.bootstrap, settings.broker.ingest_topic)
    worker = IngestWorker(settings, pool=encoder_pool)
    store = open_store(settings)
    yield settings, worker, store
    worker.close()
    store.close()


def _ingest(worker: IngestWorker, broker, messages) -> None:
    produce(broker.bootstrap, worker.topic, messages)
    assert run_to_end(worker, broker.bootstrap, worker.topic, TIMEOUT_S), worker.metrics.snapshot()


def test_delete_removes_the_point_and_a_later_upsert_brings_it_back(setup, broker, video_root):
    _settings, worker, store = setup
    _ingest(worker, broker, [upsert_msg("a", video_root / "clip-000.mp4"),
                             upsert_msg("b", video_root / "clip-001.mp4")])
    collection = worker.collection
    assert sorted(stored_ids(store, collection)) == ["a", "b"]

    # Deleting an id that was never stored is not an error (deletes are idempotent).
    _ingest(worker, broker, [delete_msg("a"), delete_msg("never-stored")])
    assert stored_ids(store, collection) == ["b"]
    assert store.get(collection, ["a"]) == []

    _ingest(worker, broker, [upsert_msg("a", video_root / "clip-002.mp4", round=2)])
    assert sorted(stored_ids(store, collection)) == ["a", "b"]
    [again] = store.get(collection, ["a"])
    assert again.payload["uri"] == uri(video_root / "clip-002.mp4")
    assert again.payload["metadata"] == {"round": 2}

    metrics = worker.metrics
    assert metrics.value("vidsearch_ingest_videos_total", op="upsert") == 3
    assert metrics.value("vidsearch_ingest_videos_total", op="delete") == 2
    assert metrics.total("vidsearch_ingest_dlq_total") == 0


# Ops on one partition, in this order: per video the last op that did not fail wins.
SAME_BATCH = [
    ("x", "upsert", "clip-003.mp4"), ("x", "delete", None),           # ends deleted
    ("y", "delete", None), ("y", "upsert", "clip-004.mp4"),           # ends present
    ("z", "upsert", "clip-005.mp4"), ("z", "upsert", "clip-006.mp4"),  # the second file wins
    ("w", "upsert", "clip-007.mp4"), ("w", "upsert", "missing.mp4"),   # a failed op is a no-op
]


def _same_batch_messages(video_root):
    return [(*(upsert_msg(v, video_root / f) if op == "upsert" else delete_msg(v)), 0)
            for v, op, f in SAME_BATCH]


def test_ops_of_one_video_in_one_batch_end_in_the_state_of_the_last_successful_op(
        setup, broker, video_root):
    settings, worker, store = setup
    # y exists beforehand, so "delete then upsert" really has something to delete.
    _ingest(worker, broker, [upsert_msg("y", video_root / "clip-010.mp4")])
    collection = worker.collection
    # One partition and fewer records than max_poll_records: they arrive in one poll.
    produce_to(broker.bootstrap, worker.topic, _same_batch_messages(video_root))
    assert run_to_end(worker, broker.bootstrap, worker.topic, TIMEOUT_S), worker.metrics.snapshot()

    assert sorted(stored_ids(store, collection)) == ["w", "y", "z"]
    got = {v.video_id: v.payload["uri"] for v in store.get(collection, ["w", "y", "z"])}
    assert got == {"w": uri(video_root / "clip-007.mp4"), "y": uri(video_root / "clip-004.mp4"),
                   "z": uri(video_root / "clip-006.mp4")}
    [dead] = read_topic(broker.bootstrap, settings.broker.dlq_topic, 1)
    assert dead["error_class"] == "not_found" and "missing.mp4" in dead["reason"]


def test_batch_final_ops_collapse_real_records_to_the_last_successful_op(broker, settings_for, video_root):
    """The collapse rule itself, on ConsumerRecords read back from the real topic."""
    settings = settings_for()
    topic = settings.broker.ingest_topic
    ensure_topic(broker.bootstrap, topic)
    produce_to(broker.bootstrap, topic, _same_batch_messages(video_root))
    records = read_records(broker.bootstrap, topic, len(SAME_BATCH))
    assert len(records) == len(SAME_BATCH)

    batch = Batch.from_records(records)
    # What the pipeline would report for the upsert of a missing file.
    missing = [item for item in batch.items if isinstance(item.op, UpsertOp) and "missing" in item.op.uri]
    missing[0].fail("not_found", "no file")
    upserts, deletes = batch.final_ops()
    assert sorted((i.op.video_id, i.op.uri.rsplit("/", 1)[1]) for i in upserts) == [
        ("w", "clip-007.mp4"), ("y", "clip-004.mp4"), ("z", "clip-006.mp4")]
    assert [(i.op.video_id, type(i.op)) for i in deletes] == [("x", DeleteOp)]
    assert batch.dlq_items() == missing
    assert batch.commit_offsets() == {(topic, 0): len(SAME_BATCH)}


def test_reingesting_a_video_id_overwrites_its_point(setup, broker, video_root):
    _settings, worker, store = setup
    _ingest(worker, broker, [upsert_msg("same", video_root / "clip-020.mp4", version=1),
                             upsert_msg("other", video_root / "clip-021.mp4")])
    collection = worker.collection
    [first] = store.get(collection, ["same"], with_vectors=True)

    _ingest(worker, broker, [upsert_msg("same", video_root / "clip-022.mp4", version=2)])
    assert store.count(collection) == 2
    assert sorted(stored_ids(store, collection)) == ["other", "same"]
    [second] = store.get(collection, ["same"], with_vectors=True)
    assert second.payload["uri"] == uri(video_root / "clip-022.mp4")
    assert second.payload["metadata"] == {"version": 2}
    assert not np.allclose(first.video_vector, second.video_vector)
    assert first.frames.shape == second.frames.shape and not np.allclose(first.frames, second.frames)
