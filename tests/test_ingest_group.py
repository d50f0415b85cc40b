"""Two workers in one consumer group split the partitions and never duplicate work."""
from __future__ import annotations

import threading
from collections import Counter

from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store, shutdown_embedded_store

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, fully_committed, group_lag, model_registry, produce, read_records,
    settings_for, store_held_down, store_path, stored_ids, upsert_msg, video_root, wait_for,
)

NUM = 16
TIMEOUT_S = 120


def test_two_workers_split_the_partitions_and_each_video_is_processed_once(
        settings_for, encoder_pool, broker, video_root):
    settings = settings_for()
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    # Two members of one group in threads of this process (kafka-python consumers are
    # per-thread objects; each worker stays on its own thread), sharing the encoder actor.
    workers = [IngestWorker(settings, pool=encoder_pool, client_id=f"member-{i}") for i in range(2)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def drive(worker: IngestWorker) -> None:
        try:
            worker.run_until(lambda _w: stop.is_set(), 4 * TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            worker.close()

    threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        def balanced() -> bool:
            a, b = (set(w.assignment) for w in workers)
            return bool(a) and bool(b) and not (a & b) and len(a | b) == 4

        # Produce only once the group is settled, so no rebalance moves work mid-way.
        assert wait_for(balanced, TIMEOUT_S), ([w.assignment for w in workers], errors)
        assignments = [set(w.assignment) for w in workers]
        ids = [f"clip-{i:03d}" for i in range(NUM)]
        produce(broker.bootstrap, topic, [upsert_msg(v, video_root / f"{v}.mp4") for v in ids])

        def upserts(worker: IngestWorker) -> float:
            return worker.metrics.value("vidsearch_ingest_videos_total", op="upsert")

        assert wait_for(lambda: sum(upserts(w) for w in workers) >= NUM
                        and fully_committed(broker.bootstrap, group, topic), TIMEOUT_S, interval_s=0.5), \
            ([w.metrics.snapshot() for w in workers], errors)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert [set(w.assignment) for w in workers] == [set(), set()]  # both left the group on close

    # Which worker owned which video: the partition each record landed on.
    partition_of = {r.key.decode(): r.partition for r in read_records(broker.bootstrap, topic, NUM)}
    per_partition = Counter(partition_of.values())
    for worker, assigned in zip(workers, assignments):
        owned = sum(per_partition[p] for _t, p in assigned)
        assert owned > 0, "keys all hashed to one member's partitions; nothing was tested"
        assert upserts(worker) == owned
        assert worker.metrics.value("vidsearch_ingest_batches_total", outcome="abandoned") == 0
    assert sum(upserts(w) for w in workers) == NUM

    with open_store(settings) as store:
        assert sorted(stored_ids(store, workers[0].collection)) == ids
        assert store.count(workers[0].collection) == NUM
    assert fully_committed(broker.bootstrap, group, topic), group_lag(broker.bootstrap, group, topic)



def test_a_member_joining_mid_batch_takes_partitions_over_without_losing_a_video(
        settings_for, encoder_pool, broker, video_root, tmp_path):
    # Its own store (so the test can take it down) and a short store timeout.
    settings = settings_for(store_path=tmp_path / "store", store_timeout_s=1.0)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    ids = [f"clip-{i:03d}" for i in range(NUM, 2 * NUM)]
    first, second = (IngestWorker(settings, pool=encoder_pool, client_id=name) for name in ("first", "second"))
    # Started (collection ready, subscribed) while the store is up; a member joins the
    # group only when it first polls, in its thread below.
    first.start()
    second.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def drive(worker: IngestWorker) -> None:
        try:
            worker.run_until(lambda _w: stop.is_set(), 4 * TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            worker.close()

    def stuck(worker: IngestWorker) -> bool:
        return worker.inflight_batches > 0 and worker.metrics.total("vidsearch_ingest_retries_total") > 0

    threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in (first, second)]
    try:
        with store_held_down(settings):
            # The first member polls everything it can and is stuck mid-batch on the store.
            threads[0].start()
            produce(broker.bootstrap, topic, [upsert_msg(v, video_root / f"{v}.mp4") for v in ids])
            assert wait_for(lambda: stuck(first) or bool(errors), TIMEOUT_S), (first.metrics.snapshot(), errors)
            # The second joins: the rebalance revokes the first's in-flight batches.
            threads[1].start()
            assert wait_for(lambda: bool(first.assignment) and bool(second.assignment)
                            and not (first.assignment & second.assignment) or bool(errors), TIMEOUT_S), errors
        assert wait_for(lambda: not first.inflight_batches and not second.inflight_batches
                        and fully_committed(broker.bootstrap, group, topic), TIMEOUT_S, interval_s=0.5), \
            ([w.metrics.snapshot() for w in (first, second)], errors)
    finally:
        stop.set()
        for thread in threads:
            if thread.ident is not None:
                thread.join(60)
        for worker in (first, second):
            worker.close()
    assert not errors, errors

    # Abandoned, not committed: the revoked batches were given up uncommitted and their
    # records re-read by whichever member owns the partition now.
    assert first.metrics.value("vidsearch_ingest_batches_total", outcome="abandoned") >= 1
    with open_store(settings) as store:
        assert sorted(stored_ids(store, first.collection)) == ids
        assert store.count(first.collection) == NUM
    upserts = [w.metrics.value("vidsearch_ingest_videos_total", op="upsert") for w in (first, second)]
    assert sum(upserts) == NUM and all(upserts), upserts
    assert fully_committed(broker.bootstrap, group, topic), group_lag(broker.bootstrap, group, topic)
    shutdown_embedded_store(settings)
