"""The vector store really goes away for a while: the worker retries, commits nothing,
and catches up once the store is back.

The outage is real (see ingest_support.store_held_down): the embedded store actor is
stopped and this test process holds Qdrant local mode's exclusive file lock on the
store directory, so every store actor the worker's handle starts dies on open until
the lock is released. Holding the lock also lets the test read the store's true
content during the outage.
"""
from __future__ import annotations

from typing import Any

from vidsearch.config import Settings
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store, shutdown_embedded_store

from ingest_support import (  # noqa: F401 - fixtures
    committed_offsets, encoder_pool, ensure_topic, model_registry, produce, run_to_end, settings_for,
    store_held_down, store_path, stored_ids, upsert_msg, video_root,
)

TIMEOUT_S = 120
OUTAGE = [f"clip-{i:03d}" for i in range(30, 34)]


def _store_retries(worker: IngestWorker) -> float:
    return worker.metrics.value("vidsearch_ingest_retries_total", stage="store")


def _outage_settings(settings_for: Any, tmp_path: Any) -> Settings:
    # Its own store directory (so its own store actor) and a short store timeout, so
    # each failed attempt to reach the store costs about a second.
    return settings_for(store_path=tmp_path / "store", store_timeout_s=1.0)


def _ingest_one_before(worker: IngestWorker, broker: Any, video_root: Any) -> None:
    produce(broker.bootstrap, worker.topic, [upsert_msg("before", video_root / "clip-029.mp4")])
    assert run_to_end(worker, broker.bootstrap, worker.topic, TIMEOUT_S), worker.metrics.snapshot()


def test_store_outage_is_retried_without_commits_then_everything_is_ingested(
        settings_for, encoder_pool, broker, video_root, tmp_path):
    settings = _outage_settings(settings_for, tmp_path)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        _ingest_one_before(worker, broker, video_root)
        collection = worker.collection
        committed_before = committed_offsets(broker.bootstrap, group, topic)
        # (A cold store actor may already have cost a retry against the 1 s timeout.)
        baseline = _store_retries(worker)

        with store_held_down(settings) as held:
            produce(broker.bootstrap, topic, [upsert_msg(v, video_root / f"{v}.mp4") for v in OUTAGE])
            assert worker.run_until(lambda w: _store_retries(w) >= baseline + 2, TIMEOUT_S), \
                worker.metrics.snapshot()
            first_look = _store_retries(worker)
            assert worker.run_until(lambda w: _store_retries(w) >= first_look + 2, TIMEOUT_S)

            # Down: the batches are done but waiting; nothing new is stored or committed.
            assert worker.inflight_batches > 0
            assert worker.metrics.value("vidsearch_ingest_videos_total", op="upsert") == 1
            assert committed_offsets(broker.bootstrap, group, topic) == committed_before
            assert held.count(collection, exact=True).count == 1

        assert run_to_end(worker, broker.bootstrap, topic, TIMEOUT_S), worker.metrics.snapshot()
    finally:
        worker.close()

    assert worker.metrics.value("vidsearch_ingest_videos_total", op="upsert") == 1 + len(OUTAGE)
    assert worker.metrics.total("vidsearch_ingest_dlq_total") == 0  # transient: never dead-lettered
    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == sorted(["before", *OUTAGE])
    shutdown_embedded_store(settings)


def test_a_drain_that_outlasts_its_grace_leaves_in_flight_work_uncommitted(
        settings_for, encoder_pool, broker, video_root, tmp_path):
    settings = _outage_settings(settings_for, tmp_path)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        _ingest_one_before(worker, broker, video_root)
        collection = worker.collection
        committed_before = committed_offsets(broker.bootstrap, group, topic)
        baseline = _store_retries(worker)
        with store_held_down(settings) as held:
            produce(broker.bootstrap, topic, [upsert_msg(v, video_root / f"{v}.mp4") for v in OUTAGE])
            assert worker.run_until(lambda w: _store_retries(w) > baseline and w.inflight_batches > 0, TIMEOUT_S)
            # What a SIGTERM does: stop, drain within the grace. The store stays down, so
            # the grace runs out and the batches are given up, not committed.
            assert worker.drain(grace_s=1.0) is False
            assert worker.inflight_batches > 0
            worker.close()
            assert worker.metrics.value("vidsearch_ingest_batches_total", outcome="abandoned") >= 1
            assert committed_offsets(broker.bootstrap, group, topic) == committed_before
            assert held.count(collection, exact=True).count == 1
    finally:
        worker.close()

    # The next member of the group re-reads the abandoned records and stores them.
    successor = IngestWorker(settings, pool=encoder_pool, client_id="successor")
    try:
        assert run_to_end(successor, broker.bootstrap, topic, TIMEOUT_S), successor.metrics.snapshot()
    finally:
        successor.close()
    assert successor.metrics.value("vidsearch_ingest_videos_total", op="upsert") == len(OUTAGE)
    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == sorted(["before", *OUTAGE])
    shutdown_embedded_store(settings)
