"""`vidsearch status` counts every pending record, also when the producer batched them.

The embedded broker (Tansu 0.6.0) answers ListOffsets with its last record batch's base
offset + 1, so lag computed from that watermark stops short after a batched produce
(benchmarks/faults.py saw 44 of 80 pending messages). Against the real broker, with its
own topics and group: the lag and DLQ count from status, and kafka_offsets.end_offsets,
against the records actually there."""
from __future__ import annotations

import uuid

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from vidsearch.broker import ensure_topics
from vidsearch.config import BrokerSettings, Settings
from vidsearch.kafka_offsets import end_offsets
from vidsearch.services.stack.status import StackStatus, broker_status

PARTITIONS = 2


def produce_batched(bootstrap: str, topic: str, per_partition: int) -> None:
    """``per_partition`` records to each partition, lingering so that each partition's go in one batch."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200)
    for partition in range(PARTITIONS):
        for i in range(per_partition):
            producer.send(topic, key=f"k{partition}-{i}".encode(), value=b"{}", partition=partition)
    producer.flush(30)
    producer.close(5)


def test_status_counts_lag_and_dlq_records_of_a_batched_produce(broker):
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(broker=BrokerSettings(bootstrap=broker.bootstrap, ingest_topic=f"lag-{suffix}",
                                              dlq_topic=f"lag-{suffix}.dlq", consumer_group=f"lag-{suffix}",
                                              partitions=PARTITIONS))
    b = settings.broker
    ensure_topics(b.bootstrap, [b.ingest_topic, b.dlq_topic], PARTITIONS)
    produce_batched(b.bootstrap, b.ingest_topic, 5)
    produce_batched(b.bootstrap, b.dlq_topic, 3)

    consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(b.ingest_topic, p) for p in range(PARTITIONS)]
        assert end_offsets(consumer, parts) == {tp: 5 for tp in parts}
        assert not consumer.assignment()  # the read-back leaves the consumer as it was
    finally:
        consumer.close()

    status = StackStatus()
    broker_status(settings, status)
    assert status.health["broker"].ok, status.health
    assert status.lag == {f"{b.ingest_topic}:{p}": 5 for p in range(PARTITIONS)}  # no commits yet: all pending
    assert status.dlq_records == 2 * 3
