"""Permanent failures: every bad message lands in the DLQ (original bytes, error class,
reason, source position), is committed, and the worker keeps consuming behind it."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import av
import numpy as np
import pytest

from vidsearch.messages import decode_dlq_bytes
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store
from vidsearch.video_writer import write_video

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, fully_committed, group_lag, model_registry, produce_to,
    read_records, run_until_settled, settings_for, store_path, stored_ids, upsert_msg, uri, video_root,
    write_clip,
)

TIMEOUT_S = 120
MAX_BYTES = 16_000
MAX_DURATION_S = 2.0
GOOD = [f"good-{i}" for i in range(4)]


@dataclass(frozen=True)
class Case:
    name: str
    key: bytes | None
    value: bytes | None
    error_class: str
    reason: str  # a fragment the DLQ reason must contain


def _audio_only(path: Path) -> Path:
    """A real mp4 with one AAC stream and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        silence.sample_rate = 8000
        for i in range(4):
            silence.pts = i * 1024
            for packet in stream.encode(silence):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    """(allowed root with good and bad files, a sibling directory outside it)."""
    base = tmp_path_factory.mktemp("dlq")
    root, outside = base / "allowed", base / "outside"
    root.mkdir()
    outside.mkdir()
    for i, video_id in enumerate(GOOD):
        write_clip(root / f"{video_id}.mp4", seed=100 + i)
    write_clip(outside / "secret.mp4", seed=200)
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "garbage.mp4").write_bytes(b"this is not a video at all" * 40)
    (root / "empty.mp4").write_bytes(b"")
    # Flat colour compresses to a few KB, so only the one limit under test is crossed.
    write_video(root / "wide.mp4", np.full((2, 480, 640, 3), 90, np.uint8), fps=8.0)
    write_video(root / "long.mp4", np.full((40, 32, 48, 3), 90, np.uint8), fps=8.0)
    noise = np.random.default_rng(0).integers(0, 255, (8, 64, 96, 3)).astype(np.uint8)
    write_video(root / "heavy.mp4", noise, fps=8.0)
    _audio_only(root / "sound.mp4")
    assert os.path.getsize(root / "heavy.mp4") > MAX_BYTES
    assert all(os.path.getsize(root / f"{v}.mp4") < MAX_BYTES for v in GOOD)
    assert all(os.path.getsize(root / f) < MAX_BYTES for f in ("wide.mp4", "long.mp4", "sound.mp4"))
    return root, outside


def _upsert(video_id: str, location: str, **extra: object) -> tuple[bytes, bytes]:
    body = {"op": "upsert", "video_id": video_id, "uri": location, "metadata": {}, **extra}
    return video_id.encode(), json.dumps(body).encode()


def _cases(root: Path) -> list[Case]:
    def upsert_case(name: str, location: str, error_class: str, reason: str, **extra: object) -> Case:
        key, value = _upsert(name, location, **extra)
        return Case(name, key, value, error_class, reason)

    missing_id = json.dumps({"op": "upsert", "uri": uri(root / "good-0.mp4")}).encode()
    return [
        Case("bad-json", b"bad-json", b'{"op": "upsert", "video_id": ', "bad_json", "not valid JSON"),
        Case("not-utf8", b"not-utf8", b"\xff\xfe\x00garbage", "bad_json", "not UTF-8"),
        Case("array", b"array", b"[1, 2, 3]", "bad_message", "must be a JSON object, got array"),
        Case("string", b"string", b'"upsert"', "bad_message", "must be a JSON object, got string"),
        Case("unknown-op", b"unknown-op", json.dumps({"op": "explode", "video_id": "unknown-op"}).encode(),
             "unknown_op", "unknown op 'explode'"),
        Case("missing-id", None, missing_id, "bad_message", "missing field 'video_id'"),
        Case("empty-id", b"empty-id", json.dumps({"op": "delete", "video_id": " "}).encode(), "bad_message", "empty"),
        Case("tombstone", b"tombstone", None, "bad_message", "tombstone"),
        Case("key-mismatch", b"other", _upsert("key-mismatch", uri(root / "good-0.mp4"))[1], "bad_message",
             "does not match video_id"),
        upsert_case("meta-list", uri(root / "good-0.mp4"), "bad_message", "metadata must be an object",
                    metadata=["a"]),
        upsert_case("https", "https://example.com/videos/a.mp4", "not_allowed", "allowed_schemes"),
        upsert_case("ftp", "ftp://example.com/a.mp4", "unsupported_uri", "unsupported scheme 'ftp'"),
        upsert_case("etc", "file:///etc/hostname", "not_allowed", "outside the allowed prefixes"),
        upsert_case("traversal", f"file://{root}/../outside/secret.mp4", "not_allowed",
                    "outside the allowed prefixes"),
        upsert_case("symlink", uri(root) + "/escape.mp4", "not_allowed", "outside the allowed prefixes"),
        upsert_case("missing", uri(root / "nope.mp4"), "not_found", "no file at"),
        upsert_case("garbage", uri(root / "garbage.mp4"), "undecodable", "garbage.mp4"),
        upsert_case("empty", uri(root / "empty.mp4"), "undecodable", "empty file"),
        upsert_case("sound", uri(root / "sound.mp4"), "no_video_stream", "no video stream"),
        upsert_case("wide", uri(root / "wide.mp4"), "too_large", "max_pixels"),
        upsert_case("long", uri(root / "long.mp4"), "too_large", "max_duration_s"),
        upsert_case("heavy", uri(root / "heavy.mp4"), "too_large", "max_bytes"),
    ]


def test_every_permanent_failure_goes_to_the_dlq_and_good_messages_behind_it_are_ingested(
        settings_for, encoder_pool, broker, roots):
    root, _outside = roots
    settings = settings_for(video_root=root)
    settings.decode.max_bytes = MAX_BYTES
    settings.decode.max_duration_s = MAX_DURATION_S
    topic, dlq, group = settings.broker.ingest_topic, settings.broker.dlq_topic, settings.broker.consumer_group
    bootstrap = broker.bootstrap
    ensure_topic(bootstrap, topic)

    cases = _cases(root)
    # Bad messages round-robin over the partitions, then a good one at the end of each
    # partition: ingesting the good ones proves that nothing stalled behind a bad one.
    messages = [(c.key, c.value, i % 4) for i, c in enumerate(cases)]
    messages += [(*upsert_msg(v, root / f"{v}.mp4"), p) for p, v in enumerate(GOOD)]
    produce_to(bootstrap, topic, messages)
    sources = read_records(bootstrap, topic, len(messages))
    assert len(sources) == len(messages)
    by_value = {(r.key, r.value): r for r in sources}

    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        done = run_until_settled(worker, upserts=len(GOOD), dlq=len(cases), timeout_s=TIMEOUT_S)
        assert done, worker.metrics.snapshot()
        collection = worker.collection
    finally:
        worker.close()

    dead = read_records(bootstrap, dlq, len(cases))
    assert len(dead) == len(cases)  # each bad message exactly once, nothing else
    by_name = {}
    for record in dead:
        body = json.loads(record.value)
        original_value = decode_dlq_bytes(body["value"])
        original_key = decode_dlq_bytes(body["key"])
        assert record.key == original_key  # the DLQ record keeps the original key
        source = by_value[(original_key, original_value)]
        assert body["source"] == {"topic": topic, "partition": source.partition, "offset": source.offset}
        failed_at = datetime.fromisoformat(body["failed_at"])
        assert body["failed_at"].endswith("Z") and failed_at.utcoffset() is not None
        assert abs((datetime.now(timezone.utc) - failed_at).total_seconds()) < 3600
        assert set(body) == {"error_class", "reason", "value", "key", "source", "failed_at"}
        match = [c for c in cases if (c.key, c.value) == (original_key, original_value)]
        assert len(match) == 1
        by_name[match[0].name] = body

    assert sorted(by_name) == sorted(c.name for c in cases)
    for case in cases:
        body = by_name[case.name]
        assert body["error_class"] == case.error_class, (case.name, body)
        assert case.reason in body["reason"], (case.name, body["reason"])
    # Undecodable bytes come back byte for byte (base64), readable ones as text.
    assert by_name["not-utf8"]["value"]["encoding"] == "base64"
    bad_json = b'{"op": "upsert", "video_id": '
    assert by_name["bad-json"]["value"] == {"encoding": "utf-8", "data": bad_json.decode(), "size": len(bad_json),
                                            "sha256": hashlib.sha256(bad_json).hexdigest(), "truncated": False,
                                            "redacted": False}
    assert by_name["tombstone"]["value"]["data"] is None and by_name["tombstone"]["value"]["encoding"] is None
    assert by_name["missing-id"]["key"]["data"] is None
    # The secret file outside the root never appears in a reason beyond its uri.
    assert "secret" not in by_name["symlink"]["reason"]

    expected_classes: dict[str, int] = {}
    for case in cases:
        expected_classes[case.error_class] = expected_classes.get(case.error_class, 0) + 1
    for error_class, count in expected_classes.items():
        assert worker.metrics.value("vidsearch_ingest_dlq_total", error_class=error_class) == count, error_class
    assert worker.metrics.total("vidsearch_ingest_retries_total") == 0  # permanent: never retried

    with open_store(settings) as store:
        assert sorted(stored_ids(store, collection)) == GOOD
    assert fully_committed(bootstrap, group, topic), group_lag(bootstrap, group, topic)
