"""`vidsearch demo --once` end to end in a subprocess (what `make demo` runs), with the tiny
preset and a handful of videos: synth -> local stack -> Kafka -> worker -> searches.
Run twice on the same data directory, because a second `make demo` must work too."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from query_support import free_port

VIDSEARCH = Path(sys.executable).with_name("vidsearch")
N = 5


def run_demo(data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDSEARCH_SERVE__GRPC_PORT": str(free_port()),
           # A small local Ray next to the test session's own.
           "VIDSEARCH_RAY__NUM_CPUS": "4"}
    return subprocess.run([str(VIDSEARCH), "demo", "--once", "--n", str(N), "--preset", "tiny",
                           "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=480, env=env,
                          cwd=data_dir.parent)


def check_output(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert f"==> published {N} upsert messages" in out
    assert f"==> all {N} videos searchable" in out
    # Three caption queries and one filtered query, each a table with a header row.
    assert out.count("rank  video id") == 4, out
    assert out.count("re-ranked; model base-") == 4, out
    assert "with --filter tags=" in out
    assert "the video this caption describes" in out
    assert "==> done (--once): stopping the stack" in out


def test_demo_once_runs_end_to_end_and_again(tmp_path):
    data_dir = tmp_path / "demo"
    first = run_demo(data_dir)
    check_output(first)
    assert (data_dir / "synth" / "manifest.jsonl").exists() and (data_dir / "ingest-worker.log").exists()
    second = run_demo(data_dir)
    check_output(second)
