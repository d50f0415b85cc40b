"""benchmarks/faults.py at its smallest, so the harness cannot rot: one real `vidsearch up`
(tiny preset), a two-video baseline with a bad message for the DLQ, then the store
actor SIGKILLed while three videos are ingested and two gRPC clients search; the
report files. Checks what the run counted, never how fast it was. Plus the load
generator's window arithmetic and version check, without a stack."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "faults.py"
sys.path.insert(0, str(REPO / "benchmarks"))


def test_windows_count_outcomes_by_send_time_and_ratios_compare_them():
    import search_load
    from search_load import Sample

    samples = [Sample(t=0.5, latency_s=0.010, code="OK", reranked=True),
               Sample(t=1.5, latency_s=0.020, code="OK", reranked=True),
               Sample(t=2.5, latency_s=0.040, code="OK", reranked=False, skipped="circuit_open"),
               Sample(t=3.5, latency_s=1.000, code="UNAVAILABLE"),
               Sample(t=4.5, latency_s=0.010, code="OK", reranked=True, mixed=True)]
    ph = search_load.phases(samples, (0.0, 2.0), (2.0, 4.0), (4.0, 6.0))
    before, during, after = ph["before"], ph["during"], ph["after"]
    assert (before.sent, before.ok, before.failed, before.degraded) == (2, 2, 0, 0)
    assert (during.sent, during.ok, during.failed, during.degraded) == (2, 1, 1, 1)
    assert during.codes == {"OK": 1, "UNAVAILABLE": 1} and during.skipped == {"circuit_open": 1}
    assert after.mixed == 1
    # Latency is that of answered requests only; answers/s counts answers.
    assert during.p99_ms == pytest.approx(40.0) and during.qps == pytest.approx(0.5)
    assert ph["qps_during_before"] == pytest.approx(0.5)
    assert search_load.ratio(1.0, 0.0) != search_load.ratio(1.0, 0.0)  # NaN, not a division error


def test_a_response_naming_two_versions_is_mixed():
    from google.protobuf import struct_pb2

    import search_load
    from vidsearch.v1 import search_pb2

    def result(version: str) -> search_pb2.SearchResult:
        payload = struct_pb2.Struct()
        payload.update({"model_version": version})
        return search_pb2.SearchResult(video_id="a", payload=payload)

    same = search_pb2.SearchResponse(model_version="v2", index="videos__v2", results=[result("v2")])
    mixed = search_pb2.SearchResponse(model_version="v2", index="videos__v2", results=[result("v1"), result("v2")])
    assert search_load.versions_named(same) == {"v2"}
    assert search_load.versions_named(mixed) == {"v1", "v2"}


@pytest.mark.timeout(1200)
def test_faults_benchmark_smallest_run_injects_the_store_fault_and_writes_its_report(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "store", "--baseline", "2", "--store-videos", "3",
         "--loop-videos", "1", "--restart-videos", "1", "--window-s", "2", "--clients", "2", "--rate", "2",
         "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "faults.json").read_text())
    assert data["errors"] == {}
    assert data["baseline"]["videos"] == 2 and data["baseline"]["dlq"] == 2 and data["baseline"]["missing"] == 0
    store = data["faults"]["store"]
    assert store["videos"] == 3 and store["killed"] and store["new_actor"] != store["killed"]
    assert store["sent"] > 0 and store["missing_at_end"] == 0
    assert set(store["windows"]) >= {"before", "during", "after", "p99_during_before", "qps_after_before"}
    assert isinstance(store["target"], bool) and set(store["checks"]) == {
        "0 acknowledged writes lost", "searches fail with UNAVAILABLE only (never INTERNAL)",
        "searches answer again", "every video ingested in the end"}
    md = (tmp_path / "faults.md").read_text()
    assert "store actor SIGKILL during ingest and search" in md and "not run (--only)" in md
    assert (tmp_path / "faults.png").stat().st_size > 0


def test_the_training_fault_row_and_details():
    """How faults.py reports the training fault (benchmarks/faults_training.py's result, as it
    writes it); the runs themselves are tests/test_trainer_fault_tolerance.py's."""
    import common
    import faults_report

    result = {"killed": True, "kill": {"stage": "teacher", "after_steps": 3, "rank": 1}, "workers": 2,
              "killed_pid": 4242, "restores": [{"source": "ray", "checkpoint": "/x", "ray_steps": 6,
                                                "run_dir_steps": 6}],
              "resumed": True, "finished": True, "recover_s": 12.5, "tensors": 139, "tensors_differ": [],
              "n_differ": 0, "weights_equal": True, "losses_equal": True, "clean_s": 36.0, "killed_s": 54.0,
              "steps": {"backbone": 4, "teacher": 6, "distill": 2}, "sent": None, "failed": 0, "degraded": None,
              "lost": None, "duplicated": None,
              "checks": {"resumed by itself": True, "weights equal to an uninterrupted run": True}, "target": True}
    rows = faults_report.table_rows({"faults": {"training": result}, "errors": {}})
    row = next(r for r in rows if r[0].startswith("a training worker SIGKILLed mid-stage"))
    assert row[3] == "0" and row[7] == "12.5" and row[-1] == common.verdict(True)
    text = "\n".join(faults_report.details("training", result, {}))
    assert "rank 1 of 2 (pid 4242)" in text and "checkpoint used: Ray Train's, 6 steps in" in text and "139 tensors, 0 differ" in text
    assert "resumed by itself: yes" in text
