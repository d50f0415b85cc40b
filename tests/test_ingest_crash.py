"""Crash safety and graceful shutdown of the real `vidsearch ingest-worker` process.

The worker runs as a subprocess joined to the test's Ray (so it reaches the same
embedded store actor). It is killed (SIGKILL) or stopped (SIGTERM) while it is
between poll and commit; a fresh worker of the same consumer group then finishes
the topic. The contract checked: offsets are committed only for what is stored, and
in the end every video is stored exactly once and every partition is committed.
"""
from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from vidsearch.config import Settings
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import collection_name, open_store, shutdown_embedded_store

from ingest_support import (  # noqa: F401 - fixtures
    WorkerProcess, kill_after_first_point, committed_offsets, count_points, encoder_pool, end_offsets, ensure_topic, free_port,
    model_registry, produce, read_records, run_to_end, scrape_metrics, settings_for, store_held_down, store_path,
    stored_ids, upsert_msg, video_root, wait_for,
)

NUM = 24
START_TIMEOUT_S = 180
FINISH_TIMEOUT_S = 120


@pytest.fixture
def store(settings_for):
    handle = open_store(settings_for())
    yield handle
    handle.close()


def _crash_settings(settings_for: Any, **overrides: Any) -> Settings:
    # Two records per poll: a dozen batches, so the worker spends most of its time
    # between poll and commit and a signal lands mid-batch. A short max_poll_interval
    # keeps a rebalance from waiting long for the departed member (see ENVIRONMENT.md).
    settings = settings_for(max_poll_records=2, **overrides)
    settings.broker.max_poll_interval_ms = 10_000
    return settings


def _produce_clips(broker: Any, settings: Settings, video_root: Path, first: int = 0,
                   last: int = NUM) -> list[str]:
    """Publish clips first..last-1 (video_id = clip name, metadata n = its number)."""
    ids = [f"clip-{i:03d}" for i in range(first, last)]
    ensure_topic(broker.bootstrap, settings.broker.ingest_topic)
    produce(broker.bootstrap, settings.broker.ingest_topic,
            [upsert_msg(v, video_root / f"{v}.mp4", n=int(v[-3:])) for v in ids])
    return ids


def _ids_below_committed(broker: Any, topic: str, group: str) -> set[str]:
    """The video ids of every record below its partition's committed offset."""
    committed = committed_offsets(broker.bootstrap, group, topic)
    records = read_records(broker.bootstrap, topic, NUM)
    assert len(records) == NUM
    return {r.key.decode() for r in records if r.offset < committed[r.partition]}


def _finish_with_new_worker(settings: Settings, encoder_pool: Any, broker: Any) -> IngestWorker:
    """A fresh in-process member of the same group consumes to the end and commits."""
    worker = IngestWorker(settings, pool=encoder_pool, client_id="successor")
    try:
        assert run_to_end(worker, broker.bootstrap, settings.broker.ingest_topic, FINISH_TIMEOUT_S), \
            worker.metrics.snapshot()
    finally:
        worker.close()
    return worker


def test_sigkill_mid_batch_then_a_new_worker_stores_every_video_exactly_once(
        settings_for, encoder_pool, broker, video_root, store, tmp_path):
    settings = _crash_settings(settings_for)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    collection = collection_name(encoder_pool.info.model_version, settings.store.alias)
    ids = _produce_clips(broker, settings, video_root)

    proc = WorkerProcess(settings, tmp_path, "doomed")
    kill_after_first_point(proc, store, collection, START_TIMEOUT_S)

    stored_at_kill = set(stored_ids(store, collection))
    committed_at_kill = _ids_below_committed(broker, topic, group)
    # Killed mid-way: some videos stored, not all of them committed.
    assert stored_at_kill, proc.log_tail()
    assert len(committed_at_kill) < NUM, "the worker finished before the kill; nothing was tested"
    # Commit-after-store: nothing below a committed offset is missing from the store.
    assert committed_at_kill <= stored_at_kill

    successor = _finish_with_new_worker(settings, encoder_pool, broker)

    # The successor resumed at the committed offsets: it re-did exactly the uncommitted
    # records (some of which the dead worker had already stored; uuid5 ids overwrite).
    assert successor.metrics.value("vidsearch_ingest_videos_total", op="upsert") == NUM - len(committed_at_kill)
    final = stored_ids(store, collection)
    assert sorted(final) == ids  # every video, each exactly once
    assert store.count(collection) == len(set(ids))
    assert committed_offsets(broker.bootstrap, group, topic) == end_offsets(broker.bootstrap, topic)
    for video in store.get(collection, ids):
        assert video.payload["metadata"] == {"n": ids.index(video.video_id)}


def _stuck_mid_batch(port: int) -> bool:
    """The worker's own /metrics say: batches in flight, and store writes being retried."""
    try:
        sample = scrape_metrics(port)
    except OSError:
        return False
    return (sample.get(("vidsearch_ingest_inflight_batches", ()), 0) >= 1
            and sample.get(("vidsearch_ingest_retries_total", (("stage", "store"),)), 0) >= 1)


def test_sigterm_mid_batch_finishes_and_commits_in_flight_work_then_exits_zero(
        settings_for, encoder_pool, broker, video_root, tmp_path):
    port = free_port()
    # Its own store (so the test can take it down), a short store timeout and a grace
    # period long enough to outlast the outage below.
    settings = _crash_settings(settings_for, store_path=tmp_path / "store", store_timeout_s=1.0,
                               metrics_port=port, shutdown_grace_s=120.0)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    collection = collection_name(encoder_pool.info.model_version, settings.store.alias)
    ids = _produce_clips(broker, settings, video_root, last=2)

    store = open_store(settings)
    proc = WorkerProcess(settings, tmp_path, "stopped")
    try:
        started = wait_for(lambda: count_points(store, collection) == 2 or not proc.running, START_TIMEOUT_S)
        assert started and proc.running, proc.log_tail()
        # Pin the worker mid-batch: the rest arrives while the store is down, so the
        # batches it polls can't finish.
        with store_held_down(settings) as held:
            ids += _produce_clips(broker, settings, video_root, first=2)
            assert wait_for(lambda: _stuck_mid_batch(port) or not proc.running, 60), proc.log_tail()
            stored_before = {p.payload["video_id"] for p in held.scroll(collection, limit=1000)[0]}
            committed_before = _ids_below_committed(broker, topic, group)
            assert committed_before <= stored_before and len(committed_before) < NUM

            proc.signal(signal.SIGTERM)
            assert wait_for(lambda: "draining in-flight batches" in proc.log_text() or not proc.running, 60)
            assert proc.running, proc.log_tail()  # draining, blocked on the store
        # The store is back: the drain finishes the in-flight batches, commits them, exits.
        code = proc.wait(120)
    finally:
        proc.kill()
        store.close()
    log_text = proc.log_text()
    assert code == 0, log_text[-4000:]
    draining = re.search(r"draining in-flight batches batches=(\d+) at_stop=(\d+)", log_text)
    assert draining and int(draining.group(1)) >= 1 and int(draining.group(2)) >= 1, log_text[-4000:]
    assert "abandoning in-flight batches" not in log_text
    assert "ingest worker stopped" in log_text

    with open_store(settings) as store:
        stored_at_stop = set(stored_ids(store, collection))
    committed_at_stop = _ids_below_committed(broker, topic, group)
    # Finished and committed: exactly what is stored is committed, including the batches
    # that were in flight at SIGTERM; what was never polled stays for the next worker.
    assert committed_at_stop == stored_at_stop
    assert committed_before < committed_at_stop
    assert len(committed_at_stop) < NUM

    successor = _finish_with_new_worker(settings, encoder_pool, broker)
    assert successor.metrics.value("vidsearch_ingest_videos_total", op="upsert") == NUM - len(committed_at_stop)
    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == ids
    assert committed_offsets(broker.bootstrap, group, topic) == end_offsets(broker.bootstrap, topic)
    shutdown_embedded_store(settings)
