"""Helpers and fixtures for the ingest tests (imported by tests/test_ingest_*.py).

The expensive pieces are shared: one encoder actor (tiny model) for the in-process
workers of the session, one embedded store actor per module (tests isolate
themselves with their own alias, hence their own collection), and one directory
of real mp4 files. Each test uses its own topic, DLQ topic and consumer group.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def video_root(tmp_path_factory) -> Path:
    """NUM_VIDEOS real mp4 files clip-000.mp4 ... plus a few bad files."""
    root = tmp_path_factory.mktemp("ingest-videos")
    for i in range(NUM_VIDEOS):
        write_clip(root / f"clip-{i:03d}.mp4", seed=i)
    (root / "garbage.mp4").write_bytes(b"this is not a video at all" * 40)
    write_clip(root / "big.mp4", seed=99, frames=4, size=(480, 640))  # over max_pixels
    return root


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
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def encoder_pool(ray_local, broker, model_registry, video_root, tmp_path_factory):
    """One FrameEncoder actor (tiny model, CPU) shared by the session's in-process workers."""
    from vidsearch.services.ingest.encoder import EncoderPool

    settings = make_settings(bootstrap=broker.bootstrap, store_path=tmp_path_factory.mktemp("unused"),
                             video_root=video_root, registry=model_registry)
    pool = EncoderPool(settings)
    yield pool
    pool.close()


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
