"""The worker's Prometheus metrics after a known workload, read from the registry and
scraped once from the real /metrics HTTP endpoint."""
from __future__ import annotations

from vidsearch.services.ingest.metrics import IngestMetrics
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store

from ingest_support import (  # noqa: F401 - fixtures
    delete_msg, encoder_pool, end_offsets, ensure_topic, free_port, fully_committed, model_registry,
    produce_to, scrape_metrics, settings_for, store_path, stored_ids, upsert_msg, video_root,
)

TIMEOUT_S = 120
GOOD = [f"clip-{i:03d}" for i in range(8)]


def _lags(worker: IngestWorker) -> dict[str, float]:
    """partition -> current consumer-lag gauge value."""
    return {sample.labels["partition"]: sample.value
            for metric in worker.metrics.registry.collect() if metric.name == "vidsearch_ingest_consumer_lag"
            for sample in metric.samples}


def test_metrics_count_the_workload_and_are_served_over_http(settings_for, encoder_pool, broker, video_root):
    port = free_port()
    # One record per poll and one batch in flight: a batch per record, and records
    # wait on the broker long enough for the lag gauge to see them.
    settings = settings_for(metrics_port=port, log_summary_interval_s=0.2, max_poll_records=1,
                            max_inflight_batches=1)
    topic, group = settings.broker.ingest_topic, settings.broker.consumer_group
    ensure_topic(broker.bootstrap, topic)
    bad = [(b"broken", b"{nope", 0), (*upsert_msg("lost", video_root / "lost.mp4"), 1)]
    messages = [(*upsert_msg(v, video_root / f"{v}.mp4"), i % 4) for i, v in enumerate(GOOD)]
    messages += bad + [(*delete_msg("ghost"), 2)]
    produce_to(broker.bootstrap, topic, messages)
    ends = end_offsets(broker.bootstrap, topic)
    assert sum(ends.values()) == len(messages)

    worker = IngestWorker(settings, pool=encoder_pool)
    max_lag = 0.0

    def done(w: IngestWorker) -> bool:
        nonlocal max_lag
        lags = _lags(w)
        max_lag = max([max_lag, *lags.values()])
        return (w.metrics.value("vidsearch_ingest_batches_total", outcome="committed") == len(messages)
                and w.inflight_batches == 0 and len(lags) == 4 and not any(lags.values()))

    try:
        assert worker.run_until(done, TIMEOUT_S), (worker.metrics.snapshot(), _lags(worker))
        collection = worker.collection
        served = scrape_metrics(port)  # the real endpoint, once
    finally:
        worker.close()

    metrics = worker.metrics
    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == GOOD
        frames_stored = sum(len(v.payload["frame_timestamps"]) for v in store.get(collection, GOOD))
    assert fully_committed(broker.bootstrap, group, topic)

    assert metrics.value("vidsearch_ingest_videos_total", op="upsert") == len(GOOD)
    assert metrics.value("vidsearch_ingest_videos_total", op="delete") == 1
    assert metrics.value("vidsearch_ingest_frames_encoded_total") == frames_stored > 0
    assert metrics.value("vidsearch_ingest_dlq_total", error_class="bad_json") == 1
    assert metrics.value("vidsearch_ingest_dlq_total", error_class="not_found") == 1
    assert metrics.total("vidsearch_ingest_dlq_total") == len(bad)
    assert metrics.total("vidsearch_ingest_retries_total") == 0  # nothing transient happened
    # One observation per committed batch; every batch here held one record.
    assert metrics.value("vidsearch_ingest_batch_seconds_count") == len(messages)
    assert metrics.value("vidsearch_ingest_batch_seconds_bucket", le="+Inf") == len(messages)
    assert metrics.value("vidsearch_ingest_batch_seconds_sum") > 0
    assert metrics.value("vidsearch_ingest_batches_total", outcome="abandoned") == 0
    assert metrics.value("vidsearch_ingest_inflight_batches") == 0
    # Lag: seen above zero while records waited, zero per partition once all were consumed.
    assert max_lag > 0
    assert metrics.snapshot()["lag"] == 0

    # The endpoint served the same numbers.
    assert served[("vidsearch_ingest_videos_total", (("op", "upsert"),))] == len(GOOD)
    assert served[("vidsearch_ingest_videos_total", (("op", "delete"),))] == 1
    assert served[("vidsearch_ingest_frames_encoded_total", ())] == frames_stored
    assert served[("vidsearch_ingest_dlq_total", (("error_class", "bad_json"),))] == 1
    assert served[("vidsearch_ingest_dlq_total", (("error_class", "not_found"),))] == 1
    assert served[("vidsearch_ingest_batch_seconds_count", ())] == len(messages)
    assert served[("vidsearch_ingest_inflight_batches", ())] == 0
    lag_samples = {labels: value for (name, labels), value in served.items()
                   if name == "vidsearch_ingest_consumer_lag"}
    assert lag_samples == {(("partition", str(p)), ("topic", topic)): 0.0 for p in range(4)}

    # Closing the worker stopped its endpoint and freed the port: a worker started again
    # in this process can serve on it.
    again = IngestMetrics()
    again.serve(port)
    again.close()
