"""Helpers and fixtures for the ingest tests (imported by tests/test_ingest_*.py).

The expensive pieces are shared: one encoder actor (tiny model) for the in-process
workers of the session, one embedded store actor per module (tests isolate
themselves with their own alias, hence their own collection), and one directory
of real mp4 files. Each test uses its own topic, DLQ topic and consumer group.
"""
from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from vidsearch.config import (BrokerSettings, DecodeSettings, IngestSettings, ModelSettings, Settings,
                              StoreSettings)
from vidsearch.video_writer import write_video

NUM_VIDEOS = 40


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_settings(*, bootstrap: str, store_path: Path, video_root: Path, registry: Path,
                  topic: str | None = None, group: str | None = None, alias: str | None = None,
                  store_timeout_s: float = 10.0, max_poll_records: int = 8, **ingest: Any) -> Settings:
    ingest_fields = {"encoder_actors": 1, "metrics_port": 0, "retry_initial_s": 0.1, "retry_max_s": 1.0,
                     "log_summary_interval_s": 5.0, "decode_parallelism": 2, "max_inflight_batches": 2,
                     "encoder_batch_frames": 64, "shutdown_grace_s": 20.0, **ingest}
    return Settings(
        broker=BrokerSettings(bootstrap=bootstrap, ingest_topic=topic or unique("ingest"),
                              dlq_topic=unique("dlq"), consumer_group=group or unique("group"), partitions=4,
                              session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=60_000,
                              max_poll_records=max_poll_records),
        store=StoreSettings(path=str(store_path), alias=alias or unique("v").replace("-", "_"),
                            timeout_s=store_timeout_s),
        decode=DecodeSettings(allowed_prefixes=[str(video_root)], max_bytes=2_000_000, max_duration_s=30.0,
                              max_pixels=320 * 240),
        model=ModelSettings(preset="tiny", registry_root=str(registry), device="cpu"),
        ingest=IngestSettings(**ingest_fields),
    )


def write_clip(path: Path, seed: int, frames: int = 8, size: tuple[int, int] = (32, 48)) -> Path:
    """A short real mp4 whose content depends on ``seed`` (so vectors differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, size[0], size[1], 3))
    drift = np.arange(frames).reshape(-1, 1, 1, 1) * rng.integers(1, 8)
    return write_video(path, ((base + drift) % 256).astype(np.uint8), fps=8.0)


# pytest registers a fixture once per module that imports it, so a session fixture
# imported by several test modules would be built once per module (and each encoder
# pool would hold a Ray CPU until the session ends, starving the next ones). The
# session fixtures below therefore build their value once per process and share it.
_SESSION: dict[str, Any] = {}


def _once(key: str, make: Callable[[], Any]) -> Any:
    if key not in _SESSION:
        _SESSION[key] = make()
    return _SESSION[key]


def _write_videos(root: Path) -> Path:
    for i in range(NUM_VIDEOS):
        write_clip(root / f"clip-{i:03d}.mp4", seed=i)
    (root / "garbage.mp4").write_bytes(b"this is not a video at all" * 40)
    write_clip(root / "big.mp4", seed=99, frames=4, size=(480, 640))  # over max_pixels
    return root


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    """NUM_VIDEOS real mp4 files clip-000.mp4 ... plus a few bad files."""
    return _once("video_root", lambda: _write_videos(tmp_path_factory.mktemp("ingest-videos")))


def uri(path: Path) -> str:
    return path.resolve().as_uri()


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce raw (key, value) pairs with acks=all (the topic must exist)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close(timeout=5)


def upsert_msg(video_id: str, path: Path, **metadata: Any) -> tuple[bytes, bytes]:
    body = {"op": "upsert", "video_id": video_id, "uri": uri(path), "metadata": metadata}
    return video_id.encode(), json.dumps(body).encode()


def delete_msg(video_id: str) -> tuple[bytes, bytes]:
    return video_id.encode(), json.dumps({"op": "delete", "video_id": video_id}).encode()


def ensure_topic(bootstrap: str, *topics: str) -> None:
    from vidsearch.broker import ensure_topics

    ensure_topics(bootstrap, topics, 4)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """partition -> end offset, found by reading the partition to its end.

    Not ListOffsets: Tansu answers it with the last record batch's base offset + 1,
    which is short of the end when a producer batched several records.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = {tp.partition: 0 for tp in partitions}
        while True:
            batch = consumer.poll(timeout_ms=1000)
            if not batch:
                return ends
            for tp, records in batch.items():
                ends[tp.partition] = max(ends[tp.partition], records[-1].offset + 1)
    finally:
        consumer.close()


def group_lag(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """partition -> (committed offset or None, end offset)."""
    from kafka import KafkaConsumer, TopicPartition

    ends = end_offsets(bootstrap, topic)
    # A consumer that never subscribes does not join the group; it only reads the
    # group's committed offsets.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return {p: (consumer.committed(TopicPartition(topic, p)), end) for p, end in ends.items()}
    finally:
        consumer.close(autocommit=False)


def fully_committed(bootstrap: str, group: str, topic: str) -> bool:
    """Every partition with messages has committed offset == end offset."""
    return all(end == 0 or committed == end for committed, end in group_lag(bootstrap, group, topic).values())


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """Read ``expected`` JSON records from the start of ``topic`` (no group)."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(json.loads(r.value) for r in records)
        # One more short poll: more than expected would be a bug the caller should see.
        for records in consumer.poll(timeout_ms=300).values():
            out.extend(json.loads(r.value) for r in records)
        return out
    finally:
        consumer.close()


def stored_ids(store: Any, collection: str) -> list[str]:
    return [video.video_id for page in store.scroll(collection, batch_size=256) for video in page]


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory) -> Path:
    # Empty: load_serving_model falls back to the deterministic base model of the preset.
    return _once("model_registry", lambda: tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def encoder_pool(ray_local, broker, model_registry, video_root, tmp_path_factory):
    """One FrameEncoder actor (tiny model, CPU) shared by the session's in-process workers."""
    from vidsearch.services.ingest.encoder import EncoderPool

    def make() -> EncoderPool:
        settings = make_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("unused"),
                                 video_root=video_root, registry=model_registry)
        return EncoderPool(settings)

    pool = _once("encoder_pool", make)
    yield pool
    pool.close()  # idempotent: the first module's teardown at session end stops it


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ingest-store")


@pytest.fixture
def settings_for(broker, store_path, video_root, model_registry):
    """Factory: settings for this test (own topic, DLQ, group, alias)."""

    def make(**overrides: Any) -> Settings:
        kwargs = {"bootstrap": broker.bootstrap, "store_path": store_path, "video_root": video_root,
                  "registry": model_registry, **overrides}
        return make_settings(**kwargs)

    return make


# ----------------------------------------------------------------------------- more helpers
# (added for the failure, crash, producer and metrics tests; the helpers above keep
# their signatures because the query tests import them)

def free_port() -> int:
    """A free loopback TCP port (the kernel picks; nothing here uses fixed ports)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passes (False)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def produce_to(bootstrap: str, topic: str,
               messages: list[tuple[bytes | None, bytes | None, int | None]]) -> None:
    """Like :func:`produce`, with an explicit partition per message (None = by key)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=key, value=value, partition=partition)
                   for key, value, partition in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close(timeout=5)


def read_records(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list[Any]:
    """Read ``expected`` raw ConsumerRecords (key, value, partition, offset) from the start
    of ``topic``, in (partition, offset) order; any extra record is returned too."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        out: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
        for records in consumer.poll(timeout_ms=300).values():
            out.extend(records)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """partition -> committed offset of ``group`` (0 where nothing is committed)."""
    return {p: committed or 0 for p, (committed, _end) in group_lag(bootstrap, group, topic).items()}


def count_points(store: Any, collection: str) -> int:
    """Points in ``collection``, for polling: 0 while the collection does not exist yet
    or the store does not answer (a cold store actor can take longer than a short
    store timeout to start)."""
    from vidsearch.store import CollectionNotFound, StoreUnavailable

    try:
        return store.count(collection)
    except (CollectionNotFound, StoreUnavailable):
        return 0


def kill_after_first_point(proc: "WorkerProcess", store: Any, collection: str, timeout_s: float) -> None:
    """SIGKILL the worker subprocess as soon as its first point is in ``collection``:
    mid-way through its work, with nothing flushed or committed on the way out."""
    import signal

    try:
        started = wait_for(lambda: count_points(store, collection) > 0 or not proc.running, timeout_s)
        assert started and proc.running, proc.log_tail()
        proc.signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()


class WorkerProcess:
    """``vidsearch ingest-worker`` as a real subprocess.

    Settings travel in a YAML file (VIDSEARCH_CONFIG). The embedded store is a named
    detached actor of the test's Ray, so the subprocess joins that Ray (RAY_ADDRESS)
    instead of starting its own: otherwise it would open a second store actor on the
    same directory, which the file lock forbids.
    """

    def __init__(self, settings: Settings, workdir: Path, name: str = "worker") -> None:
        import os
        import subprocess
        import sys

        import ray
        import yaml

        self.config = workdir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ, VIDSEARCH_CONFIG=str(self.config),
                   RAY_ADDRESS=ray.get_runtime_context().gcs_address)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vidsearch.cli", "--log-level", "INFO", "ingest-worker"],
                env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL (if still running) and reap; for cleanup."""
        if self.running:
            self.proc.kill()
        self.proc.wait(30)


def run_to_end(worker: Any, bootstrap: str, topic: str, timeout_s: float) -> bool:
    """Step ``worker`` until it owns every partition of ``topic``, has nothing in flight
    and has committed each partition up to its current end (False on timeout)."""
    ends = end_offsets(bootstrap, topic)

    def caught_up(w: Any) -> bool:
        if w.inflight_batches or len(w.assignment) != len(ends):
            return False
        committed = w.committed()
        return all((committed.get((topic, p)) or 0) == end for p, end in ends.items())

    return worker.run_until(caught_up, timeout_s)


def topic_is_empty(bootstrap: str, topic: str) -> bool:
    """No partition of ``topic`` holds a record (one ListOffsets round trip).

    ListOffsets may fall short of the true end on Tansu (see :func:`end_offsets`), but
    it is above zero as soon as a partition holds any record, which is all this asks.
    """
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        assert partitions, f"topic {topic!r} does not exist"
        return not any(consumer.end_offsets(partitions).values())
    finally:
        consumer.close()


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics on a local port once: (sample name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


@contextlib.contextmanager
def store_held_down(settings: Settings) -> Iterator[Any]:
    """A real outage of the embedded store at ``settings.store.path``.

    The store actor is stopped and this process holds Qdrant local mode's exclusive
    file lock, so every store actor a worker starts dies while opening the directory
    (StoreUnavailable) until the block exits. Yields the lock-holding QdrantClient,
    which sees the store's true content meanwhile.
    """
    from qdrant_client import QdrantClient

    from vidsearch.store import shutdown_embedded_store

    shutdown_embedded_store(settings)
    client = _open_local_when_free(QdrantClient, settings.store.path, timeout_s=30.0)
    try:
        yield client
    finally:
        client.close()


def _open_local_when_free(client_class: Any, path: str, timeout_s: float) -> Any:
    """Open local mode at ``path``, waiting while a stopped actor's process still holds
    the lock (it can outlive the actor by a moment)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client_class(path=path)
        except RuntimeError as exc:
            if "already accessed" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_vidsearch(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                  timeout_s: float = 120.0) -> Any:
    """Run the installed ``vidsearch`` console script (what a user runs) to completion.

    The environment is this process's minus every vidsearch / endpoint setting, plus
    ``env``, so a developer's own configuration never leaks in.
    """
    import os
    import subprocess
    import sys

    script = Path(sys.executable).with_name("vidsearch")
    assert script.exists(), f"{script} is missing: run `make install`"
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("VIDSEARCH_") and k not in ("KAFKA_BOOTSTRAP", "QDRANT_URL", "RAY_ADDRESS")}
    return subprocess.run([str(script), "--log-level", "WARNING", *args], env={**clean, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s)


def nested_metadata(levels: int) -> dict:
    """A metadata object nested ``levels`` deep (the object itself is level 1)."""
    top: dict = {}
    cur = top
    for _ in range(levels - 1):
        cur["a"] = {}
        cur = cur["a"]
    return top


def run_until_settled(worker: Any, upserts: int, dlq: int, timeout_s: float) -> bool:
    """Step ``worker`` until it stored ``upserts`` videos, dead-lettered ``dlq`` messages
    and has nothing in flight (False on timeout)."""
    return worker.run_until(
        lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= upserts
        and w.metrics.total("vidsearch_ingest_dlq_total") >= dlq and w.inflight_batches == 0,
        timeout_s)
