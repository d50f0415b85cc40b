"""What the slow model's own view costs: bytes per point, frame-tower throughput with and
without region tokens, upsert rate into the embedded store, and the re-ranker's cost per
candidate against the old cross-encoder.

    python benchmarks/regions.py [--quick]

For each preset the spatial scorer is configured in (``vit-b-32``: 3x3 cells of 512-d per
frame; ``synth-resnet-spatial``: 2x2 of 64-d), it measures, in one run on this machine:

- bytes per point of the stored vectors (video vector, frames, region tokens) per codec,
  against the 64 KiB budget for the production preset;
- frames/s of the frame tower with ``encode_frames`` and with ``encode_frames_and_regions``
  (same pass; the ratio is what ingest pays for the regions);
- points/s of upserts into Qdrant local mode with and without region tokens;
- the scorer's time and FLOPs per candidate at K=20, spatial against a cross-encoder of the
  same width over the same frames (``torch.utils.flop_counter``).

Results go to docs/benchmarks/regions.{md,json,png}. Times are CPU times on this machine:
compare them as ratios.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import CACHE_DIR, DOCS_DIR, command_line, isolate_environment, machine_facts, md_table, write_text

BUDGET_BYTES = 64 * 1024  # the bound on the extra storage per point, production preset
CODEC_BYTES = {"uint8": 1, "float16": 2, "float32": 4}


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def frame_throughput(model, batch: int, repeats: int) -> dict[str, float]:
    size = model.image_size if isinstance(model.image_size, int) else max(model.image_size)
    pixels = torch.rand(batch, 3, size, size)
    with torch.inference_mode():
        plain = median_time(lambda: model.encode_frames(pixels), repeats)
        both = median_time(lambda: model.encode_frames_and_regions(pixels), repeats)
    return {"frames_per_s": batch / plain, "frames_per_s_with_regions": batch / both, "ratio": plain / both}


def scorer_cost(model, k: int, repeats: int) -> dict[str, float]:
    """Time and FLOPs per candidate of the model's scorer at K candidates."""
    from torch.utils.flop_counter import FlopCounterMode

    t = model.config.num_frames
    frames = torch.nn.functional.normalize(torch.randn(k, t, model.embed_dim), dim=-1)
    mask = torch.ones(k, t, dtype=torch.bool)
    regions = (torch.nn.functional.normalize(torch.randn(k, t, model.region_cells, model.region_width), dim=-1)
               if model.uses_regions else None)
    text = model.encode_scorer_text(["first a small red square moves left, then a big blue circle grows"])
    index = torch.zeros(k, dtype=torch.long)
    with torch.inference_mode():
        def score() -> None:
            model.score_pairs(text.select(index), frames, mask, regions=regions)
        seconds = median_time(score, repeats)
        counter = FlopCounterMode(display=False)
        with counter:
            score()
    return {"ms_per_candidate": 1000.0 * seconds / k, "mflops_per_candidate": counter.get_total_flops() / k / 1e6,
            "tokens": 1 + text.mask.shape[1] + t + t * model.region_cells}


def bytes_per_point(model, codec: str) -> dict[str, int]:
    t, d = model.config.num_frames, model.embed_dim
    regions = t * model.region_cells * model.region_width * CODEC_BYTES[codec] if model.uses_regions else 0
    return {"video": 4 * d, "frames": 4 * t * d, "regions": regions}


def upsert_rate(model, points: int, with_regions: bool) -> float:
    """Points/s into a fresh Qdrant local-mode store (one client in this process)."""
    from qdrant_client import QdrantClient

    from vidsearch.config import StoreSettings
    from vidsearch.store import QdrantStore
    from vidsearch.store_schema import VideoPoint

    rng = np.random.default_rng(0)
    t, d = model.config.num_frames, model.embed_dim

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    batch = [VideoPoint(f"v{i}", unit(d), unit(t, d), {"video_id": f"v{i}"},
                        regions=unit(t, model.region_cells, model.region_width) if with_regions else None)
             for i in range(points)]
    root = Path(tempfile.mkdtemp(dir=CACHE_DIR))
    try:
        store = QdrantStore(QdrantClient(path=str(root)), StoreSettings(path=str(root)))
        store.ensure_collection("videos__bench", d, d, model.region_width if with_regions else None)
        started = time.perf_counter()
        for i in range(0, points, 64):
            store.upsert("videos__bench", batch[i:i + 64])
        rate = points / (time.perf_counter() - started)
        store.close()
        return rate
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _upsert_rates(model, points: int) -> dict[str, float]:
    upsert_rate(model, min(points, 128), True)  # warm-up: the first local-mode store in a process is slower
    return {"without": upsert_rate(model, points, False), "with": upsert_rate(model, points, True)}


def cross_twin(model):
    """The same model with the old cross-encoder scorer (same width, layers, heads)."""
    from dataclasses import replace

    from vidsearch.models import build_model

    scorer = replace(model.config.scorer, kind="cross", grid=0, region_width=None, own_text=False)
    return build_model(replace(model.config, scorer=scorer), device="cpu", seed=0)


def measure(preset: str, quick: bool) -> dict:
    from vidsearch.models import build_model

    model = build_model(preset, device="cpu", seed=0)
    repeats = 3 if quick else 10
    batch = 16 if quick else 48
    points = 200 if quick else 1000
    spatial, cross = scorer_cost(model, 20, repeats), scorer_cost(cross_twin(model), 20, repeats)
    out = {"preset": preset, "grid": model.config.scorer.grid, "region_width": model.region_width,
           "num_frames": model.config.num_frames, "embed_dim": model.embed_dim,
           "bytes": {codec: bytes_per_point(model, codec) for codec in CODEC_BYTES},
           "throughput": frame_throughput(model, batch, repeats),
           "upsert_points_per_s": _upsert_rates(model, points),
           "scorer": {"spatial": spatial, "cross": cross}}
    print(f"regions: {preset} done", flush=True)
    return out


def write_results(out_dir: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facts = machine_facts()
    lines = ["# The slow model's own view: region tokens", "",
             f"Command `{command_line()}`. Machine: {facts.get('cpu_model', '?')}, {facts.get('cpu_count', '?')} "
             "cores; times are CPU times in-process: compare them as ratios.", "",
             "Each point stores, beside its video vector and per-frame vectors, `grid x grid` region tokens per "
             "frame (the frame tower's spatial map, pooled) in a `regions` multivector outside any ANN index. "
             "A Qdrant server stores them in the codec's datatype; Qdrant local mode keeps every vector as "
             "float32 whatever the datatype (4 bytes a value).", "",
             "## Bytes per point", ""]
    rows = []
    for r in results:
        for codec, b in r["bytes"].items():
            rows.append([r["preset"], f"{r['grid']}x{r['grid']} x {r['region_width']}-d x {r['num_frames']} frames",
                         codec, f"{b['video'] + b['frames']:,}", f"{b['regions']:,}",
                         "yes" if b["regions"] <= BUDGET_BYTES else "**no**"])
    lines += md_table(["preset", "regions", "codec", "video + frames (B)", "regions (B)", "regions <= 64 KiB"], rows)
    lines += ["", "## Ingest and store", ""]
    lines += md_table(["preset", "frame tower frames/s", "with regions", "ratio", "upserts/s (local mode)",
                       "with regions", "ratio"],
                      [[r["preset"], f"{r['throughput']['frames_per_s']:.1f}",
                        f"{r['throughput']['frames_per_s_with_regions']:.1f}", f"{r['throughput']['ratio']:.2f}",
                        f"{r['upsert_points_per_s']['without']:.0f}", f"{r['upsert_points_per_s']['with']:.0f}",
                        f"{r['upsert_points_per_s']['with'] / max(r['upsert_points_per_s']['without'], 1e-9):.2f}"]
                       for r in results])
    lines += ["", "## The slow model against the old cross-encoder, per candidate (K = 20)", ""]
    lines += md_table(["preset", "scorer", "tokens per pair", "ms per candidate", "MFLOPs per candidate"],
                      [[r["preset"], name, str(c["tokens"]), f"{c['ms_per_candidate']:.3f}",
                        f"{c['mflops_per_candidate']:.2f}"]
                       for r in results for name, c in r["scorer"].items()])
    lines += ["", "![costs](regions.png)", ""]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [r["preset"] for r in results]
    axes[0].bar(names, [r["bytes"]["uint8"]["regions"] / 1024 for r in results], label="regions (uint8)")
    axes[0].axhline(BUDGET_BYTES / 1024, color="red", linestyle="--", label="64 KiB")
    axes[0].set_ylabel("KiB per point")
    axes[0].legend(fontsize=7)
    x = np.arange(len(results))
    axes[1].bar(x - 0.2, [r["scorer"]["cross"]["ms_per_candidate"] for r in results], width=0.4, label="cross")
    axes[1].bar(x + 0.2, [r["scorer"]["spatial"]["ms_per_candidate"] for r in results], width=0.4, label="spatial")
    axes[1].set_xticks(x, names)
    axes[1].set_ylabel("ms per candidate (CPU)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "regions.png", dpi=90)
    plt.close(fig)
    write_text(out_dir / "regions.md", lines)
    (out_dir / "regions.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


def main() -> int:
    isolate_environment()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, results under .bench/ only")
    parser.add_argument("--presets", default="synth-resnet-spatial,vit-b-32")
    args = parser.parse_args()
    torch.set_num_threads(2)
    CACHE_DIR.mkdir(exist_ok=True)
    results = [measure(p, args.quick) for p in args.presets.split(",")]
    out_dir = CACHE_DIR if args.quick else DOCS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(out_dir, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
