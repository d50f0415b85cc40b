"""benchmarks/store.py end to end at its smallest: real local-mode stores (and qdrant-edge
shards when qdrant-edge-py is installed) in their own processes, a reopen in a fresh
process, and the report files. Checks what the run produced, never how fast it was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "store.py"
MODES = ("no_frames", "frames", "filtered_frames")


def edge_installed() -> bool:
    from importlib import metadata

    try:
        metadata.version("qdrant-edge-py")
        return True
    except metadata.PackageNotFoundError:
        return False


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_store_benchmark_smallest_run_writes_its_report(tmp_path):
    done = run("--sizes", "30,60", "--queries", "2", "--reopen-queries", "2", "--recall-k", "10",
               "--out-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    md, png, raw = (tmp_path / f"store.{ext}" for ext in ("md", "png", "json"))
    assert png.stat().st_size > 0
    data = json.loads(raw.read_text())
    assert data["complete"] is True
    engines = ["local", "edge"] if edge_installed() else ["local"]
    assert list(data["engines"]) == engines
    for engine in engines:
        sizes = data["engines"][engine]["sizes"]
        assert sorted(sizes, key=int) == ["30", "60"], engine
        for n, row in sizes.items():
            assert row["points"] == int(n) and row["upsert_rate"] > 0 and row["disk"] > 0
            assert row["writer_memory"]["rss"] > 0
            for mode in MODES:
                assert {"p50", "p95"} <= set(row["query"][mode]) and {"p50", "p95"} <= set(row["query_cpu"][mode])
                assert len(row["query_raw"][mode]) == 2
            # A fresh process opened the copy of the store and answered.
            assert row["reopen"]["open_s"] > 0 and row["reopen"]["open_cpu_s"] > 0
            assert row["reopen"]["opened"]["peak"] > 0
            assert 0.0 <= row["recall"] <= 1.0
            if engine == "edge":
                assert set(row["search_variants"]) == {"hnsw_ef=128", "hnsw_ef=512", "exact"}
                # Brute force on the edge shard finds what the numpy search finds.
                assert row["search_variants"]["exact"]["recall"] == 1.0
    # Local mode searches exactly, so it must agree with the benchmark's numpy search.
    assert all(row["recall"] == 1.0 for row in data["engines"]["local"]["sizes"].values())

    text = md.read_text()
    for heading in ("## What is measured", "## Machine", "## Results", "## The envelope",
                    "## What qdrant-edge can and cannot do for this store"):
        assert heading in text
    assert "| local | 60 |" in text and "![store benchmark](store.png)" in text
    if edge_installed():
        assert "| edge | 60 |" in text and "### qdrant-edge against local mode" in text
        assert "### qdrant-edge: recall against cost" in text
    else:
        assert "qdrant-edge-py is not installed" in text and "qdrant-edge-py is not installed" in done.stderr

    # A cut run's JSON is enough to draw the report again.
    md.unlink()
    png.unlink()
    again = run("--report-only", "--out-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert md.read_text() == text and png.stat().st_size > 0


def test_store_benchmark_rejects_bad_sizes_in_one_line(tmp_path):
    done = run("--sizes", "ten", "--out-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--sizes must be comma-separated integers" in done.stderr
