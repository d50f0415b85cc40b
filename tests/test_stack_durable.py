"""Ingestion across a restart of the real `vidsearch up` (its durable embedded broker).

Messages are published while the stack runs without an ingest worker; the stack is stopped
and started again, with a worker, on the same store and broker data: every message is
ingested, each exactly once (the worker's own counter), and nothing lags.
"""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from query_support import free_port, write_test_clip
from test_stack_hardening import Stack
from vidsearch.stack_state import read_state

CLIPS = 4


def status(stack: Stack) -> dict:
    result = stack.run("status", "--json")
    return json.loads(result.stdout) if result.stdout.strip() else {}


def upserts_counted(metrics_port: str) -> float:
    """vidsearch_ingest_videos_total{op="upsert"} of the stack's worker (0 before its first)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(r'^vidsearch_ingest_videos_total\{op="upsert"\} ([0-9.e+]+)$', text, flags=re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.timeout(1500)
def test_messages_published_while_no_worker_runs_are_ingested_once_after_a_restart(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shared = {"VIDSEARCH_STORE__PATH": str(tmp_path / "store"), "VIDSEARCH_MODEL__REGISTRY_ROOT": str(tmp_path / "registry"),
              "VIDSEARCH_BROKER__DATA_DIR": str(tmp_path / "broker"),
              "VIDSEARCH_DECODE__ALLOWED_PREFIXES": json.dumps([str(videos)])}
    clips = [str(write_test_clip(videos / f"restart-{i}.mp4", i)) for i in range(CLIPS)]
    (tmp_path / "first").mkdir()
    first = Stack(tmp_path / "first", "--no-worker", **shared)
    try:
        first.wait_for(lambda: read_state(first.state_file), "the first stack's state file")
        published = first.run("ingest", *clips, "--no-progress")
        assert published.returncode == 0 and f"published {CLIPS} message(s)" in published.stdout, published.stderr
        before = first.wait_for(lambda: (s := status(first)) and sum(s["lag"].values()) == CLIPS and s,
                                "the published messages to show as lag", 120)
        text = first.run("status").stdout
    finally:
        assert first.stop() == 0, first.output()[-3000:]
    assert f"storage: durable ({tmp_path / 'broker'})" in before["health"]["broker"]["detail"]
    assert "storage: durable" in text and "storage: durable" in first.output()
    (tmp_path / "second").mkdir()
    metrics_port = str(free_port())
    second = Stack(tmp_path / "second", **shared, VIDSEARCH_INGEST__METRICS_PORT=metrics_port)
    try:
        second.wait_for(lambda: read_state(second.state_file), "the second stack's state file")
        after = second.wait_for(lambda: (s := status(second)) and s.get("points") == CLIPS
                                and sum(s["lag"].values()) == 0 and s, f"{CLIPS} points and no lag", 420)
        assert after["dlq_records"] == 0
        # Each message was processed once: no redelivery of what the first stack never consumed.
        assert second.wait_for(lambda: upserts_counted(metrics_port) >= CLIPS, "the worker's counter", 60)
        assert upserts_counted(metrics_port) == CLIPS
        secret = json.loads((tmp_path / "broker" / "credentials").read_text())["secret_access_key"]
        shown = second.run("status").stdout + json.dumps(after) + second.run("up", "--print-env").stdout
    finally:
        assert second.stop() == 0, second.output()[-3000:]
    for where in (shown, first.output(), second.output(), (tmp_path / "broker" / "run" / "objstore.log").read_text()):
        assert secret not in where
