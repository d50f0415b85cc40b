"""`make demo` (the README's first command) end to end, with --once, the shipped trained
model and a handful of videos: synth -> local stack -> Kafka -> worker -> searches. Run
twice on the same data directory, because a second `make demo` must work too. The venv
is this test's own, so make's install step is a no-op here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from query_support import free_port

from vidsearch.models.shipped import shipped_version

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
N = 5


def run_demo(data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIDSEARCH_SERVE__GRPC_PORT": str(free_port()),
           "VIDSEARCH_SERVE__HTTP_PORT": str(free_port()),
           # A small local Ray next to the test session's own.
           "VIDSEARCH_RAY__NUM_CPUS": "4"}
    args = f"--once --n {N} --data-dir {data_dir}"
    return subprocess.run(["make", "-s", "-C", str(ROOT), "demo", f"VENV={VENV}", f"DEMO_ARGS={args}"],
                          capture_output=True, text=True, timeout=480, env=env)


def check_output(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert f"==> published {N} upsert messages" in out
    assert f"==> all {N} videos searchable" in out
    # Three caption queries and one filtered query, each a table with a header row.
    assert out.count("rank  video id") == 4, out
    # Served by the shipped trained model, and it finds the captioned videos.
    assert out.count(f"re-ranked; model {shipped_version()}") == 4, out
    assert out.count("the video this caption describes: #1)") >= 2, out
    assert "with --filter tags=" in out
    # The search page is served too, and its API answered the first caption.
    assert "==> search page: http://127.0.0.1:" in out and "its API found 1 result" in out, out
    assert "the video this caption describes" in out
    assert "==> done (--once): stopping the stack" in out


def test_demo_once_runs_end_to_end_and_again(tmp_path):
    data_dir = tmp_path / "demo"
    first = run_demo(data_dir)
    check_output(first)
    assert (data_dir / "synth" / "manifest.jsonl").exists() and (data_dir / "ingest-worker.log").exists()
    second = run_demo(data_dir)
    check_output(second)
