"""A Kafka client the project didn't write: confluent-kafka (librdkafka >= 2.2, the
README's alternative to an old kcat) produces ingest messages, the worker ingests them,
and the same client reads the DLQ in a consumer group."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, model_registry, settings_for, store_path, stored_ids, unique, uri, video_root,
)

confluent_kafka = pytest.importorskip("confluent_kafka")
README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT_S = 120


def readme_confluent_snippet() -> str:
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                  if "confluent_kafka" in b]
    return snippet


def test_librdkafka_is_new_enough():
    # 2.0.2 (Debian 12's kcat) mis-reads the broker's ApiVersions v3 answer; 2.2.0 fixed it.
    version = tuple(int(x) for x in confluent_kafka.libversion()[0].split(".")[:2])
    assert version >= (2, 2), confluent_kafka.libversion()


def test_confluent_kafka_produces_ingest_messages_and_reads_the_dlq(settings_for, encoder_pool, broker, video_root):
    settings = settings_for()
    topic, dlq = settings.broker.ingest_topic, settings.broker.dlq_topic
    ensure_topic(broker.bootstrap, topic, dlq)

    # The README's snippet, as written, against this broker and topic (its uri lies
    # outside the allowlist: a valid message that the worker sends to the DLQ).
    snippet = readme_confluent_snippet().replace("127.0.0.1:9092", broker.bootstrap)
    exec(compile(snippet.replace('"videos.ingest"', repr(topic)), "README.md", "exec"), {})

    producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    good = {"op": "upsert", "video_id": "rdkafka-good", "uri": uri(video_root / "clip-005.mp4"),
            "metadata": {"title": "from librdkafka", "tags": ["x"]}}
    errors: list[object] = []
    for key, value in ((b"rdkafka-bad", b'{"op": "upsert", '), (b"rdkafka-good", json.dumps(good).encode())):
        producer.produce(topic, key=key, value=value, partition=0,
                         on_delivery=lambda err, _msg: err and errors.append(err))
    assert producer.flush(30) == 0 and not errors, errors

    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        done = worker.run_until(
            lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= 1
            and w.metrics.total("vidsearch_ingest_dlq_total") >= 2 and w.inflight_batches == 0, TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        collection = worker.collection
    finally:
        worker.close()
    with open_store(settings) as store:
        [video] = store.get(collection, ["rdkafka-good"])
        assert stored_ids(store, collection) == ["rdkafka-good"]
    assert video.payload["metadata"] == good["metadata"]

    consumer = confluent_kafka.Consumer({"bootstrap.servers": broker.bootstrap, "group.id": unique("rdkafka"),
                                         "auto.offset.reset": "earliest", "enable.auto.commit": False,
                                         "session.timeout.ms": 6000})
    got: dict[str, dict] = {}
    try:
        consumer.subscribe([dlq])
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            assert message.error() is None, message.error()
            got[message.key().decode()] = json.loads(message.value())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    assert {key: body["error_class"] for key, body in got.items()} == {"abc": "not_allowed",
                                                                        "rdkafka-bad": "bad_json"}
    assert got["rdkafka-bad"]["source"]["partition"] == 0 and got["rdkafka-bad"]["value"]["size"] == 17
