"""The embedded broker's durable storage: real Tansu on its s3:// engine, the real object
server process, kafka-python clients as the ingest worker uses them.

Each scenario publishes to the ingest topic, consumes and commits part of it as the ingest
consumer group, writes a DLQ record, then ends the broker (a clean stop, a SIGKILL of
everything, a SIGKILL of its owner alone) and starts a new one on the same data directory:
every message not committed comes back exactly once, the offsets and the DLQ are still there.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.structs import OffsetAndMetadata

from vidsearch.broker import BrokerError, EmbeddedBroker
from vidsearch.config import BrokerSettings, ConfigError, Settings, load_settings
from vidsearch.objstore.datadir import record_process, start_time

DEFAULTS = BrokerSettings()
INGEST, DLQ, GROUP = DEFAULTS.ingest_topic, DEFAULTS.dlq_topic, DEFAULTS.consumer_group
PARTITIONS = 4
N = 24
# A broker owned by another process (what `vidsearch up` is), for the SIGKILL scenarios.
OWNER = """
import json, sys, time
from vidsearch.broker import EmbeddedBroker
broker = EmbeddedBroker(partitions=4, data_dir=sys.argv[1]).start()
print(json.dumps({"bootstrap": broker.bootstrap, "tansu": broker.pid, "objstore": broker._storage.pid}), flush=True)
time.sleep(3600)
"""


def consumer(bootstrap: str) -> KafkaConsumer:
    # The ingest worker's group and settings (short timeouts, as the environment notes advise).
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=GROUP, enable_auto_commit=False,
                      auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000,
                      max_poll_interval_ms=10_000)
    c.subscribe([INGEST])
    return c


def poll(c: KafkaConsumer, count: int, settle_s: float = 4.0, limit_s: float = 90.0) -> list:
    """Records until ``count`` arrived and then ``settle_s`` more (a duplicate would show up)."""
    records, deadline, enough_at = [], time.monotonic() + limit_s, None
    while time.monotonic() < deadline:
        for batch in c.poll(timeout_ms=500).values():
            records.extend(batch)
        if len(records) >= count:
            enough_at = enough_at or time.monotonic()
            if time.monotonic() - enough_at >= settle_s:
                break
    return records


def write_and_half_consume(bootstrap: str, close_consumer: bool = True) -> tuple[set, dict]:
    """Publish N messages and one DLQ record; consume all, commit about half of each partition.
    Returns the records not committed, as (partition, offset, value), and the commits."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(N):
        producer.send(INGEST, key=f"video-{i}".encode(), value=json.dumps({"op": "delete", "video_id": f"video-{i}"})
                      .encode(), partition=i % PARTITIONS).get(timeout=30)
    producer.send(DLQ, key=b"video-bad", value=b'{"error_class": "bad_message"}', partition=1).get(timeout=30)
    producer.close()
    c = consumer(bootstrap)
    records = poll(c, N, settle_s=0)
    assert len(records) == N, f"consumed {len(records)} of {N}"
    commits = {}
    for p in range(PARTITIONS):
        offsets = sorted(r.offset for r in records if r.partition == p)
        commits[TopicPartition(INGEST, p)] = offsets[0] + len(offsets) // 2
    c.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in commits.items()})
    if close_consumer:
        c.close(autocommit=False)
    # (else the member is left in the group, as a SIGKILLed worker leaves it)
    left = {(r.partition, r.offset, r.value) for r in records if r.offset >= commits[TopicPartition(INGEST, r.partition)]}
    return left, commits


def verify_resumed(bootstrap: str, left: set, commits: dict) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        committed = admin.list_group_offsets(GROUP).get(GROUP, {})
    finally:
        admin.close()
    assert {tp: meta.offset for tp, meta in committed.items() if tp.topic == INGEST} == commits
    c = consumer(bootstrap)
    try:
        resumed = poll(c, len(left))
        got = [(r.partition, r.offset, r.value) for r in resumed]
        assert len(got) == len(set(got)), "a message came twice"
        assert set(got) == left
        ends = c.end_offsets([TopicPartition(INGEST, p) for p in range(PARTITIONS)])
        assert sum(ends.values()) == N  # nothing lost from the log, nothing doubled
    finally:
        c.close(autocommit=False)
    dlq = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        dlq.assign([TopicPartition(DLQ, p) for p in range(PARTITIONS)])
        dlq.seek_to_beginning()
        found = []
        for _ in range(20):
            for batch in dlq.poll(timeout_ms=500).values():
                found.extend(batch)
            if found:
                break
        assert [(r.key, r.value) for r in found] == [(b"video-bad", b'{"error_class": "bad_message"}')]
    finally:
        dlq.close()


def gone(pid: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return start_time(pid) is None


def start_owner(data_dir: Path) -> tuple[subprocess.Popen, dict]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(data_dir)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    line = owner.stdout.readline()
    assert line, f"the owner process exited with {owner.wait()}"
    return owner, json.loads(line)


# --------------------------------------------------------------------------- scenarios

def test_a_clean_stop_and_start_keeps_unconsumed_messages_offsets_and_the_dlq(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    broker = EmbeddedBroker(partitions=PARTITIONS, data_dir=tmp_path / "broker").start()
    assert broker.storage == "durable" and str(tmp_path / "broker") in broker.describe_storage()
    try:
        left, commits = write_and_half_consume(broker.bootstrap)
        secret = broker._storage.credentials.secret_access_key
        # Credentials travel in Tansu's environment only, never on a command line.
        assert secret not in Path(f"/proc/{broker.pid}/cmdline").read_text()
        assert secret in Path(f"/proc/{broker.pid}/environ").read_text()
        assert "s3://tansu/" in Path(f"/proc/{broker.pid}/cmdline").read_text()

    finally:
        broker.stop()
    assert not broker.running and not list((tmp_path / "broker" / "run").glob("*.pid.json"))
    again = EmbeddedBroker(partitions=PARTITIONS, data_dir=tmp_path / "broker").start()
    try:
        verify_resumed(again.bootstrap, left, commits)
        assert secret not in again.output_tail(10**6) + again._storage.output_tail(10**6)
    finally:
        again.stop()
    assert secret not in caplog.text


def test_a_sigkill_of_tansu_and_the_object_server_loses_nothing_acknowledged(tmp_path):
    owner, pids = start_owner(tmp_path / "broker")
    try:
        # The consumer is left a member of the group, as a SIGKILLed ingest worker leaves it.
        left, commits = write_and_half_consume(pids["bootstrap"], close_consumer=False)
    finally:
        for pid in (pids["tansu"], pids["objstore"], owner.pid):  # everything at once
            os.kill(pid, signal.SIGKILL)
        owner.wait()
    assert gone(pids["tansu"]) and gone(pids["objstore"])
    again = EmbeddedBroker(partitions=PARTITIONS, data_dir=tmp_path / "broker").start()
    try:
        verify_resumed(again.bootstrap, left, commits)
    finally:
        again.stop()


def test_a_sigkilled_owner_takes_its_processes_along_and_the_next_start_recovers(tmp_path):
    """Only `vidsearch up` is killed: Tansu and the object server (which runs in its own
    session, so that a signal to the stack's group can't stop it before Tansu) go with their
    parent (parent-death signal). The next start serves the same data; it also stops a process
    a dead owner recorded that still runs, and leaves alone records of processes that are gone
    or whose pid now belongs to someone else."""
    owner, pids = start_owner(tmp_path / "broker")
    assert os.getsid(pids["objstore"]) != os.getsid(owner.pid) == os.getsid(pids["tansu"])
    try:
        left, commits = write_and_half_consume(pids["bootstrap"])
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
    assert gone(pids["objstore"]) and gone(pids["tansu"]), "a broker process outlived its owner"
    leftover = subprocess.Popen(["sleep", "300"])
    record_process(tmp_path / "broker", "tansu", leftover.pid)
    record_process(tmp_path / "broker", "ghost", 2**22 + 777)
    (tmp_path / "broker" / "run" / "reused.pid.json").write_text(json.dumps({"pid": os.getpid(), "start": "1"}))
    again = EmbeddedBroker(partitions=PARTITIONS, data_dir=tmp_path / "broker").start()
    try:
        assert leftover.wait(timeout=5) == -signal.SIGTERM
        verify_resumed(again.bootstrap, left, commits)
    finally:
        again.stop()


def test_a_stale_object_server_still_running_is_replaced(tmp_path):
    """Where the parent-death signal did not reach it (another OS, a lost race), a dead owner's
    object server may still serve the directory: the next start stops it and starts its own."""
    from vidsearch.objstore.process import ObjectServerProcess

    stale = ObjectServerProcess(tmp_path / "broker").start()  # recorded in run/, as the broker records it
    with EmbeddedBroker(partitions=1, data_dir=tmp_path / "broker") as broker:
        assert gone(stale.pid, timeout_s=1.0) and broker._storage.pid != stale.pid
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        producer.send(INGEST, value=b"after the stale server", partition=0).get(timeout=30)
        producer.close()
    stale.stop()


def test_one_broker_owns_a_data_directory(tmp_path):
    with EmbeddedBroker(partitions=1, data_dir=tmp_path / "broker"):
        second = EmbeddedBroker(partitions=1, data_dir=tmp_path / "broker")
        with pytest.raises(BrokerError) as info:
            second.start()
        assert "in use by another embedded broker" in str(info.value) and "\n" not in str(info.value)
        assert not second.running


def test_the_storage_secret_never_reaches_an_error_message(tmp_path):
    """Tansu prints its configuration when it fails; here a stand-in prints its whole environment."""
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\nenv\necho 'fatal: storage s3://tansu/ failed'\nexit 3\n")
    fake.chmod(0o755)
    broker = EmbeddedBroker(partitions=1, binary=fake, data_dir=tmp_path / "broker")
    with pytest.raises(BrokerError) as info:
        broker.start()
    secret = json.loads((tmp_path / "broker" / "credentials").read_text())["secret_access_key"]
    message = str(info.value)
    assert "exited with code 3" in message and "AWS_SECRET_ACCESS_KEY=<redacted>" in message
    assert secret not in message
    assert not broker.running and not broker._storage.running  # its object server was stopped too


def test_memory_storage_still_works_and_forgets_on_stop():
    broker = EmbeddedBroker(partitions=2, topics=("mem.t",)).start()
    assert broker.storage == "memory" and broker.describe_storage().startswith("memory")
    try:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        producer.send("mem.t", value=b"x", partition=0).get(timeout=30)
        producer.close()
    finally:
        broker.stop()
    with EmbeddedBroker(partitions=2, topics=("mem.t",)) as again:
        c = KafkaConsumer(bootstrap_servers=again.bootstrap)
        try:
            assert sum(c.end_offsets([TopicPartition("mem.t", p) for p in range(2)]).values()) == 0
        finally:
            c.close()


def test_storage_setting_defaults_to_durable_and_a_bad_value_is_one_line(tmp_path):
    assert (Settings().broker.storage, Settings().broker.data_dir) == ("durable", "./data/broker")
    settings = load_settings(env={"VIDSEARCH_BROKER__STORAGE": "memory", "VIDSEARCH_BROKER__DATA_DIR": "123"})
    assert (settings.broker.storage, settings.broker.data_dir) == ("memory", "123")
    with pytest.raises(ConfigError) as info:
        load_settings(env={"VIDSEARCH_BROKER__STORAGE": "disk"})
    assert "broker.storage" in str(info.value) and "'durable' or 'memory'" in str(info.value)
    env = {**os.environ, "VIDSEARCH_BROKER__STORAGE": "postgres"}
    result = subprocess.run([str(Path(sys.executable).parent / "vidsearch"), "config"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "invalid setting broker.storage" in result.stderr


def test_the_local_stack_starts_the_storage_the_setting_names(tmp_path):
    from vidsearch.services.stack.local import LocalStack, StackError

    for storage, expected in (("durable", "durable"), ("memory", "memory")):
        settings = load_settings(env={"VIDSEARCH_BROKER__STORAGE": storage,
                                      "VIDSEARCH_BROKER__DATA_DIR": str(tmp_path / "broker"),
                                      "VIDSEARCH_BROKER__PARTITIONS": "1"})
        stack = LocalStack(settings, worker=False, serve=False)
        stack._start_broker()
        try:
            assert stack.broker.storage == expected and stack.endpoints()["broker_storage"].startswith(expected)
            assert stack.settings.broker.bootstrap == stack.broker.bootstrap
            stack.check_alive()
        finally:
            stack.broker.stop()
    # An in-use data directory is one line from the stack, not a traceback.
    settings = load_settings(env={"VIDSEARCH_BROKER__DATA_DIR": str(tmp_path / "broker"),
                                  "VIDSEARCH_BROKER__PARTITIONS": "1"})
    with EmbeddedBroker(partitions=1, data_dir=tmp_path / "broker"):
        with pytest.raises(StackError, match="in use by another embedded broker"):
            LocalStack(settings, worker=False, serve=False)._start_broker()
    # A dead object server stops the stack with a line that says so.
    stack = LocalStack(settings, worker=False, serve=False)
    stack._start_broker()
    try:
        os.kill(stack.broker._storage.pid, signal.SIGKILL)
        stack.broker._storage._proc.wait()
        with pytest.raises(StackError, match="object server exited"):
            stack.check_alive()
    finally:
        stack.broker.stop()
