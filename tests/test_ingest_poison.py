"""Poison messages never stop ingestion: each lands in the DLQ as a bounded, redacted
record (or, when the broker refuses even that for good, is logged and committed), and
the good messages behind them on the same partition are ingested. A stuck partition
shows as true lag and a stall metric, and SIGTERM's drain stays inside its grace."""
from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest

from vidsearch.broker import EmbeddedBroker
from vidsearch.dlq import decode_dlq_bytes
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, fully_committed, group_lag, model_registry, nested_metadata, read_records,
    run_until_settled, run_vidsearch, settings_for, store_path, stored_ids, upsert_msg, uri, video_root,
)

TIMEOUT_S = 120
SECRETS = (b"s3cr3t", b"hunter2")


def _produce_big(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]],
                 partition: int = 0) -> None:
    """Produce to one partition, in order, with a client that allows 8 MB requests
    (a sloppy producer: the broker takes them)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8 * 1024 * 1024)
    try:
        for key, value in messages:  # one at a time: the order on the partition is the list's
            producer.send(topic, key=key, value=value, partition=partition).get(timeout=30)
    finally:
        producer.close(timeout=5)


def _body(video_id: str, uri_text: str, metadata: object) -> bytes:
    return json.dumps({"op": "upsert", "video_id": video_id, "uri": uri_text, "metadata": metadata}).encode()


def _poison(root) -> list[tuple[str, bytes, str, str]]:
    """(key, value, error class, reason fragment), in the order they are produced."""
    clip = uri(root / "clip-000.mp4")
    return [
        # The first case: 200 KB of U+0001 (a 1.2 MB record once JSON-escaped).
        ("ctrl", b'{"op":"upsert","video_id":"ctrl","uri":"' + b"\x01" * 200_000 + b'"}', "bad_json",
         "not valid JSON"),
        ("huge", _body("huge", clip, {"blob": "x" * (5 * 1024 * 1024)}), "bad_message",
         "over the limit messages.max_bytes=1048576"),
        ("deep", _body("deep", clip, nested_metadata(50)), "bad_message", "over the limit messages.max_metadata_depth=8"),
        ("fat", _body("fat", clip, {f"f{i}": "x" * 1000 for i in range(200)}), "bad_message",
         "over the limit messages.max_metadata_bytes=16384"),
        ("bigint", _body("bigint", clip, {"n": 2**60}), "bad_message", "messages.max_integer"),
        ("cred-https", _body("cred-https", "https://alice:hunter2@videos.example.com/a.mp4?X-Amz-Signature=s3cr3t",
                             {}), "not_allowed", "allowed_schemes"),
        ("cred-file", _body("cred-file", "file:///etc/hostname?token=s3cr3t", {}), "not_allowed",
         "outside the allowed prefixes"),
    ]


def test_poison_messages_go_to_the_dlq_bounded_and_the_good_ones_behind_them_are_ingested(
        settings_for, encoder_pool, broker, video_root):
    settings = settings_for(max_poll_records=4)
    topic, dlq, group = settings.broker.ingest_topic, settings.broker.dlq_topic, settings.broker.consumer_group
    bootstrap = broker.bootstrap
    ensure_topic(bootstrap, topic)
    poison = _poison(video_root)
    at_limits = {"title": "t" * 4096, "n": 2**53 - 1, "deep": nested_metadata(7), "tags": ["a", "b"]}  # depth 8 in all
    good = [upsert_msg("good-plain", video_root / "clip-001.mp4"),
            # Credentials in a good uri: stored apart, never in the payload's `uri`.
            ("good-token".encode(), _body("good-token", uri(video_root / "clip-002.mp4") + "?token=s3cr3t",
                                          at_limits))]
    # Everything on partition 0, the good messages last: they are ingested only if
    # nothing stalls behind a poison message.
    _produce_big(bootstrap, topic, [(k.encode(), v) for k, v, _c, _r in poison] + good)

    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        done = run_until_settled(worker, upserts=len(good), dlq=len(poison), timeout_s=TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        worker._refresh_lag(force=True)
        snapshot = worker.metrics.snapshot()
        collection = worker.collection
    finally:
        worker.close()
    assert snapshot["lag"] == 0 and snapshot["retries"] == 0, snapshot  # nothing was retried

    dead = read_records(bootstrap, dlq, len(poison))
    assert len(dead) == len(poison)
    by_key = {}
    for record in dead:
        assert len(record.value) < settings.broker.max_request_bytes  # always fits the broker
        assert not any(secret in record.value for secret in SECRETS), record.value[:500]
        body = json.loads(record.value)
        by_key[decode_dlq_bytes(body["key"]).decode()] = body
    sources = {r.key.decode(): r for r in read_records(bootstrap, topic, len(poison) + len(good))}
    for key, value, error_class, fragment in poison:
        body = by_key[key]
        assert body["error_class"] == error_class and fragment in body["reason"], body["reason"]
        assert body["value"]["size"] == len(value) and body["value"]["sha256"] == hashlib.sha256(value).hexdigest()
        assert body["source"] == {"topic": topic, "partition": 0, "offset": sources[key].offset}
    assert by_key["ctrl"]["value"]["encoding"] == "base64" and by_key["ctrl"]["value"]["truncated"]
    assert by_key["huge"]["value"]["truncated"]
    assert by_key["cred-https"]["value"]["redacted"] and by_key["cred-file"]["value"]["redacted"]

    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == ["good-plain", "good-token"]
        [token] = store.get(collection, ["good-token"])
    assert token.payload["uri"] == uri(video_root / "clip-002.mp4")  # no query string
    assert token.payload["source_uri"].endswith("?token=s3cr3t")  # kept apart, for re-decoding
    assert token.payload["metadata"] == at_limits
    assert fully_committed(bootstrap, group, topic), group_lag(bootstrap, group, topic)

    # The operator's view of the same DLQ.
    env = {"KAFKA_BOOTSTRAP": bootstrap, "VIDSEARCH_BROKER__DLQ_TOPIC": dlq}
    listed = run_vidsearch(["dlq", "--error-class", "bad_message"], env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 4 and all("bad_message" in line and f"{topic}[0]@" in line for line in lines), lines
    assert "max_metadata_depth" in listed.stdout and listed.stderr.strip().endswith("4 record(s)")
    one = run_vidsearch(["dlq", "--key", "deep", "--json"], env=env)
    [record] = [json.loads(line) for line in one.stdout.splitlines()]
    assert record["source"]["offset"] == sources["deep"].offset


@pytest.mark.parametrize("limit,lands", [(4096, True), (300, False)], ids=["minimal-record", "refused-for-good"])
def test_a_dlq_record_the_broker_refuses_for_good_is_never_retried_forever(
        settings_for, encoder_pool, broker, video_root, limit, lands, caplog):
    """A real producer whose request limit is below the record (as a broker with a smaller
    message.max.bytes than the worker was told): MessageSizeTooLargeError is not retriable,
    so the minimal record goes instead; when even that is refused, the message is logged
    with its coordinates and committed. Either way the good message behind it is ingested."""
    from kafka import KafkaProducer

    settings = settings_for()
    topic, dlq = settings.broker.ingest_topic, settings.broker.dlq_topic
    ensure_topic(broker.bootstrap, topic)
    bad = b'{"op": "upsert", "video_id": ' + b'"x' * 10_000
    _produce_big(broker.bootstrap, topic, [(b"bad", bad), upsert_msg("after", video_root / "clip-003.mp4")])

    worker = IngestWorker(settings, pool=encoder_pool).start()
    worker._producer.close(timeout=5)
    worker._producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", max_request_size=limit)
    caplog.set_level(logging.WARNING, logger="vidsearch.services.ingest.worker")
    try:
        done = worker.run_until(
            lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= 1 and w.inflight_batches == 0,
            TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        metrics = worker.metrics
    finally:
        worker.close()
    assert metrics.total("vidsearch_ingest_retries_total") == 0  # refused for good is not a retry
    assert fully_committed(broker.bootstrap, settings.broker.consumer_group, topic)
    refusals = [r for r in caplog.records if "refused the DLQ record for good" in r.getMessage()]
    assert refusals and refusals[0].fields["offset"] == 0
    if lands:
        [record] = read_records(broker.bootstrap, dlq, 1)
        body = json.loads(record.value)
        assert body["value"]["data"] is None and body["value"]["size"] == len(bad)
        assert body["value"]["sha256"] == hashlib.sha256(bad).hexdigest() and body["error_class"] == "bad_json"
        assert metrics.value("vidsearch_ingest_dlq_total", error_class="bad_json") == 1
    else:
        assert read_records(broker.bootstrap, dlq, 0, timeout_s=2) == []
        assert metrics.value("vidsearch_ingest_dlq_refused_total", error_class="bad_json") == 1
        [dropped] = [r for r in caplog.records if "committed without a DLQ record" in r.getMessage()]
        # The log line says which message it was, and where.
        assert dropped.levelno == logging.ERROR and dropped.fields["sha256"] == hashlib.sha256(bad).hexdigest()
        assert (dropped.fields["partition"], dropped.fields["offset"], dropped.fields["size"]) == (0, 0, len(bad))


def test_a_stuck_partition_shows_true_lag_a_stall_and_sigterm_drains_within_the_grace(
        settings_for, encoder_pool, video_root, caplog):
    """The broker dies while a bad message waits for its DLQ publish: the partition's lag
    counts the stuck records (not 0), the stall gauge and a log line name it, and the
    drain plus close after SIGTERM end inside the grace period."""
    grace_s = 6.0
    with EmbeddedBroker(partitions=1, topics=()) as private:
        settings = settings_for(bootstrap=private.bootstrap, stall_after_s=1.0, publish_timeout_s=1.0,
                                shutdown_grace_s=grace_s, retry_max_s=0.5)
        settings.broker.partitions = 1
        topic = settings.broker.ingest_topic
        ensure_topic(private.bootstrap, topic)
        _produce_big(private.bootstrap, topic, [(b"bad", b"not json"),
                                                upsert_msg("after", video_root / "clip-004.mp4")])
        worker = IngestWorker(settings, pool=encoder_pool)
        caplog.set_level(logging.INFO, logger="vidsearch.services.ingest.worker")
        try:
            assert worker.run_until(lambda w: w.inflight_batches == 1, 60), worker.metrics.snapshot()
            worker._refresh_lag(force=True)
            # Both records are polled and none is committed: that is lag 2, not 0.
            assert worker.metrics.value("vidsearch_ingest_consumer_lag", topic=topic, partition="0") == 2
            private._proc.kill()  # the broker is gone: the DLQ publish fails, retriably, for as long as it lasts
            private._proc.wait(10)
            assert worker.run_until(lambda w: (topic, 0) in w.stalled_partitions, 30), caplog.text[-2000:]
            assert worker.metrics.value("vidsearch_ingest_partition_stalled", topic=topic, partition="0") == 1
            assert worker.metrics.value("vidsearch_ingest_retries_total", stage="dlq") >= 1
            [stall] = [r for r in caplog.records if r.getMessage() == "partition stalled"]
            assert (stall.fields["topic"], stall.fields["partition"], stall.fields["offset"]) == (topic, 0, 0)
            assert stall.fields["last_failure"].startswith("dlq: ")  # says what is stuck
            assert worker.inflight_batches == 1  # nothing was committed past the stuck message

            started = time.monotonic()
            worker.stop()  # what the SIGTERM handler does; run() then drains and closes
            drained = worker.drain(grace_s)
            worker.close()
            elapsed = time.monotonic() - started
        finally:
            worker.close()
    assert not drained
    assert elapsed <= grace_s + 0.5, elapsed
