"""The embedded Tansu broker, spoken to with the plain Kafka protocol (kafka-python)."""
from __future__ import annotations

import logging
import os
import stat
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from vidsearch.broker import BrokerError, EmbeddedBroker, TopicError, ensure_topics
from vidsearch.config import BrokerSettings


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _consumer(bootstrap: str, group: str, topic: str) -> KafkaConsumer:
    # Short session/poll intervals so a group handover doesn't wait for a departed member.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=1000, max_poll_interval_ms=10_000)
    consumer.subscribe([topic])
    return consumer


def _poll_until(consumer: KafkaConsumer, count: int, max_polls: int = 60) -> list:
    records = []
    for _ in range(max_polls):
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
        if len(records) >= count:
            break
    return records


def test_default_topics_exist_with_configured_partitions(broker):
    defaults = BrokerSettings()
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        described = {t["name"]: len(t["partitions"])
                     for t in admin.describe_topics([defaults.ingest_topic, defaults.dlq_topic])}
    finally:
        admin.close()
    assert described == {defaults.ingest_topic: 4, defaults.dlq_topic: 4}
    assert broker.bootstrap.startswith("127.0.0.1:")


def test_ensure_topics_is_idempotent(broker):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(broker.bootstrap, [topic, topic], partitions=3) == {topic: 3}
    # A second call, even asking for another count, leaves the existing topic alone.
    assert ensure_topics(broker.bootstrap, [topic], partitions=5) == {topic: 3}
    assert ensure_topics(broker.bootstrap, [], partitions=3) == {}


def test_ensure_topics_rejects_bad_partition_count(broker):
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        ensure_topics(broker.bootstrap, ["x"], partitions=0)
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        EmbeddedBroker(partitions=0)


def test_ensure_topics_on_unreachable_kafka_is_a_clear_error():
    with EmbeddedBroker(partitions=1, topics=()) as gone:
        bootstrap = gone.bootstrap
    with pytest.raises(BrokerError, match="cannot reach Kafka"):
        ensure_topics(bootstrap, ["x"], partitions=1, timeout_s=2)


def test_produce_consume_commit_and_resume(broker):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    group = f"g-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, [topic], partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for i in range(6):
            # .get() makes the send synchronous: the broker acknowledged it with acks=all.
            meta = producer.send(topic, key=f"v{i}".encode(), value=f"m{i}".encode()).get(timeout=10)
            assert meta.offset == i
    finally:
        producer.close()

    first = _consumer(broker.bootstrap, group, topic)
    try:
        records = _poll_until(first, 6)
        assert [r.value for r in records] == [f"m{i}".encode() for i in range(6)]
        # Commit only the first three: as if the worker died before storing the rest.
        first.commit({TopicPartition(topic, 0): OffsetAndMetadata(records[2].offset + 1, "", -1)})
    finally:
        first.close(autocommit=False)

    second = _consumer(broker.bootstrap, group, topic)
    try:
        resumed = _poll_until(second, 3)
        # At least once: everything after the committed offset comes again, nothing before.
        assert [r.value for r in resumed] == [b"m3", b"m4", b"m5"]
        assert second.committed(TopicPartition(topic, 0)) == 3
    finally:
        second.close(autocommit=False)


def test_stop_ends_the_process():
    broker = EmbeddedBroker(partitions=2, topics=("a", "b"))
    with broker:
        pid = broker.pid
        assert broker.running and _process_exists(pid)
        assert ensure_topics(broker.bootstrap, ["a", "b"], partitions=2) == {"a": 2, "b": 2}
    assert not broker.running
    assert not _process_exists(pid)
    with pytest.raises(BrokerError, match="not running"):
        broker.bootstrap
    broker.stop()  # stopping twice is harmless


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "fake-broker"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_broker_that_exits_reports_its_output(tmp_path):
    binary = _script(tmp_path, 'echo "fatal: cannot parse flags" >&2\nexit 3')
    with pytest.raises(BrokerError) as info:
        EmbeddedBroker(binary=binary).start()
    assert "exited with code 3" in str(info.value)
    assert "fatal: cannot parse flags" in str(info.value)


def test_broker_that_never_listens_times_out_and_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    binary = _script(tmp_path, f'echo "stuck starting" >&2\necho $$ > {pid_file}\nexec sleep 60')
    broker = EmbeddedBroker(binary=binary, startup_timeout_s=1.0)
    with pytest.raises(BrokerError) as info:
        broker.start()
    assert "did not accept Kafka connections" in str(info.value)
    assert "stuck starting" in str(info.value)
    assert not broker.running
    assert not _process_exists(int(pid_file.read_text()))


def test_missing_binary_is_a_clear_error(tmp_path):
    with pytest.raises(BrokerError, match="cannot run broker binary"):
        EmbeddedBroker(binary=tmp_path / "nope").start()


# --- broker.create_topics=false: topics managed elsewhere (Strimzi KafkaTopics) ------------

def _topic_names(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_without_creation_a_missing_topic_is_one_line_naming_it_and_nothing_is_created(broker):
    there, missing = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, [there], partitions=2)
    with pytest.raises(TopicError) as excinfo:
        ensure_topics(broker.bootstrap, [there, missing], partitions=2, create=False)
    text = str(excinfo.value)
    assert f"topic {missing!r} does not exist on {broker.bootstrap}" in text and "broker.create_topics" in text
    assert "\n" not in text and there not in text
    assert missing not in _topic_names(broker.bootstrap)


def test_without_creation_existing_topics_answer_their_own_partition_count(broker, caplog):
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, [topic], partitions=3)
    caplog.set_level(logging.WARNING, logger="vidsearch.broker")
    # broker.partitions (the chart's kafka.partitions) says 4; the topic has 3.
    assert ensure_topics(broker.bootstrap, [topic], partitions=4, create=False) == {topic: 3}
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.fields == {"topic": topic, "partitions": 3, "wanted": 4}
    assert "at most that many ingest workers get partitions" in warning.getMessage()


def test_an_ingest_worker_without_creation_stops_on_a_missing_topic(broker):
    from vidsearch.config import Settings
    from vidsearch.services.ingest.worker import IngestWorker, WorkerError

    topic, dlq = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, [topic], partitions=2)  # the DLQ topic is the missing one
    settings = Settings(broker=BrokerSettings(bootstrap=broker.bootstrap, ingest_topic=topic, dlq_topic=dlq,
                                              create_topics=False))
    worker = IngestWorker(settings)
    with pytest.raises(WorkerError) as excinfo:
        worker.start()  # before Ray, the store or the metrics port: the topics come first
    assert str(excinfo.value).startswith(f"topic {dlq!r} does not exist on {broker.bootstrap}")
    assert "\n" not in str(excinfo.value) and dlq not in _topic_names(broker.bootstrap)


def test_publish_without_creation_names_the_missing_topic_and_sends_nothing(broker):
    from vidsearch.messages import DeleteOp
    from vidsearch.services.ingest.producer import ProducerError, publish

    topic = f"t-{uuid.uuid4().hex[:8]}"
    with pytest.raises(ProducerError, match=rf"^topic '{topic}' does not exist on "):
        publish(broker.bootstrap, topic, [DeleteOp("v1")], partitions=2, progress=False, create_topics=False)
    assert topic not in _topic_names(broker.bootstrap)
    ensure_topics(broker.bootstrap, [topic], partitions=2)
    sent = publish(broker.bootstrap, topic, [DeleteOp("v1")], partitions=2, progress=False, create_topics=False)
    assert sent.sent == 1


def test_create_topics_comes_from_the_environment():
    from vidsearch.config import load_settings

    assert load_settings(env={}).broker.create_topics is True
    assert load_settings(env={"VIDSEARCH_BROKER__CREATE_TOPICS": "false"}).broker.create_topics is False


def test_the_ingest_cli_without_creation_is_one_line_naming_the_missing_topic(broker):
    # `vidsearch ingest` with broker.create_topics=false (a least-privilege user): the topic
    # managed elsewhere is missing, so nothing is sent and nothing created.
    import os
    import subprocess
    import sys

    topic = f"t-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap, "VIDSEARCH_BROKER__CREATE_TOPICS": "false"}
    done = subprocess.run([sys.executable, "-m", "vidsearch.cli", "ingest", "--topic", topic, "--no-progress",
                           "--delete", "v1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"topic '{topic}' does not exist on {broker.bootstrap}" in lines[0], done.stderr
    assert topic not in _topic_names(broker.bootstrap)
