"""`vidsearch dlq`: list the dead-letter topic with filters, and replay once the cause
is fixed (a real subprocess against the real broker; the records are the worker's)."""
from __future__ import annotations

import json

import pytest

from vidsearch.dlq import dlq_record
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.store import open_store

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, model_registry, produce_to, read_records, run_vidsearch, settings_for, store_path,
    stored_ids, topic_is_empty, unique, upsert_msg, uri, video_root,
)

TIMEOUT_S = 120


def _msg(video_id: str, location: str) -> bytes:
    return json.dumps({"op": "upsert", "video_id": video_id, "uri": location, "metadata": {}}).encode()


@pytest.fixture
def topics(broker):
    ingest, dlq = unique("ingest"), unique("dlq")
    ensure_topic(broker.bootstrap, ingest, dlq)
    return ingest, dlq


def _dlq(broker, topics, *args: str):
    ingest, dlq = topics
    return run_vidsearch(["dlq", *args], env={"KAFKA_BOOTSTRAP": broker.bootstrap,
                                              "VIDSEARCH_BROKER__INGEST_TOPIC": ingest,
                                              "VIDSEARCH_BROKER__DLQ_TOPIC": dlq})


def test_list_filters_and_replay_skips_what_it_cannot_replay_faithfully(broker, topics):
    ingest, dlq = topics
    originals = {
        "a": (_msg("a", "file:///data/a.mp4"), "not_allowed", "outside the allowed prefixes", 1, 65_536),
        "b": (_msg("b", "https://u:hunter2@h.example/b.mp4?sig=x"), "not_allowed", "scheme 'https'", 2, 65_536),
        "c": (b"\x01" * 100_000, "bad_json", "value is not valid JSON", 1, 65_536),
        "d": (_msg("d", "file:///data/d.mp4"), "not_allowed", "outside the allowed prefixes", 3, 10),  # cut short
        "e": (_msg("e", "file:///data/e.mp4"), "not_allowed", "outside the allowed prefixes", 1, 65_536),
    }
    records = [(key.encode(), dlq_record(value, key.encode(), ingest, partition, 10 + i, error_class, reason,
                                         keep_bytes=keep), None)
               for i, (key, (value, error_class, reason, partition, keep)) in enumerate(originals.items())]
    produce_to(broker.bootstrap, dlq, records)

    listed = _dlq(broker, topics)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 5 and listed.stderr.strip().endswith("5 record(s)")
    line_a = next(line for line in lines if "  a  " in line or " a " in line)
    assert "not_allowed" in line_a and f"{ingest}[1]@10" in line_a and "outside the allowed prefixes" in line_a

    def keys(*args: str) -> list[str]:
        done = _dlq(broker, topics, "--json", *args)
        assert done.returncode == 0, done.stderr
        return sorted(json.loads(line)["key"]["data"] for line in done.stdout.splitlines())

    assert keys("--error-class", "not_allowed") == ["a", "b", "d", "e"]
    assert keys("--error-class", "bad_json", "--error-class", "not_allowed", "--partition", "1") == ["a", "c", "e"]
    assert keys("--key", "a", "--key", "e") == ["a", "e"]
    assert keys("--reason", "scheme") == ["b"]
    assert keys("--since", "1h") == ["a", "b", "c", "d", "e"]
    assert keys("--since", "2099-01-01T00:00:00Z") == []
    assert len(keys("--limit", "2")) == 2

    assert topic_is_empty(broker.bootstrap, ingest)
    replayed = _dlq(broker, topics, "--error-class", "not_allowed", "--replay")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip().endswith(
        f"replayed 2 message(s) to {ingest}; skipped 1 (redacted: credentials were removed from its uri), "
        "1 (truncated: only the first bytes of the message were kept)"), replayed.stdout
    sent = read_records(broker.bootstrap, ingest, 2)
    assert sorted((r.key, r.value) for r in sent) == [(b"a", originals["a"][0]), (b"e", originals["e"][0])]


@pytest.mark.parametrize("args,code,fragment", [
    (["--since", "yesterday"], 2, "--since: 'yesterday' is neither"),
    (["--since", "2026-01-01T00:00:00"], 2, "needs a timezone"),
    (["--to-topic", "x"], 2, "--to-topic only applies to --replay"),
    (["--limit", "0"], 2, "--limit must be >= 1"),
])
def test_bad_options_are_one_line_errors(broker, topics, args, code, fragment):
    done = _dlq(broker, topics, *args)
    assert done.returncode == code, done.stderr
    assert done.stderr.startswith("vidsearch dlq: ") and fragment in done.stderr
    assert "\n" not in done.stderr.strip()


def test_after_fixing_the_allowlist_a_replay_gets_the_videos_ingested(settings_for, encoder_pool, broker,
                                                                      video_root, tmp_path):
    (tmp_path / "empty").mkdir()
    refused = settings_for(video_root=tmp_path / "empty")
    topic, dlq = refused.broker.ingest_topic, refused.broker.dlq_topic
    ensure_topic(broker.bootstrap, topic, dlq)
    produce_to(broker.bootstrap, topic, [(*upsert_msg(v, video_root / f"clip-0{i}.mp4"), None)
                                         for i, v in ((30, "late-1"), (31, "late-2"))])
    worker = IngestWorker(refused, pool=encoder_pool)
    try:
        assert worker.run_until(lambda w: w.metrics.total("vidsearch_ingest_dlq_total") >= 2
                                and w.inflight_batches == 0, TIMEOUT_S), worker.metrics.snapshot()
    finally:
        worker.close()

    done = _dlq(broker, (topic, dlq), "--error-class", "not_allowed", "--replay")
    assert done.returncode == 0 and f"replayed 2 message(s) to {topic}" in done.stdout, (done.stdout, done.stderr)

    fixed = refused.model_copy(update={"decode": refused.decode.model_copy(
        update={"allowed_prefixes": [str(video_root)]})})
    worker = IngestWorker(fixed, pool=encoder_pool)
    try:
        assert worker.run_until(lambda w: w.metrics.value("vidsearch_ingest_videos_total", op="upsert") >= 2
                                and w.inflight_batches == 0, TIMEOUT_S), worker.metrics.snapshot()
        collection = worker.collection
    finally:
        worker.close()
    with open_store(fixed) as store:
        assert sorted(stored_ids(store, collection)) == ["late-1", "late-2"]
