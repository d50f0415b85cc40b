"""Long videos for the quality benchmark: does an event's caption find its video, and
does the reported moment fall inside the event? (``quality.py --long``)

A few long synthetic videos (``vidsearch synth --long``: minutes of single events with
known times, each with its own caption) are indexed with the functions the ingest
path uses: ``decode_segments`` with the decode settings' segment windows, then the
ingest encoder (``FrameEncoder.encode``: the model's frame tower + head) per segment,
one point per segment. Each event caption is searched the way the query service
answers: text vector, cosine recall over the points, the best segment per video (the
store's group-by), the reranker's scoring (``score_requests``) of each candidate
video's best segment, and ``build_results`` for fusion and the best moment. Search runs
in-process (no Serve, no store server): what is measured is quality, not latency.

The same videos are also indexed as one point each (segments off: the whole video
in ``num_frames`` frames), the baseline segments are meant to beat.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LONG_SET = {"n": 6, "seed": 11, "seconds": 180.0, "fps": 8.0, "size": 64}
SECTION_MARK = "<!-- long-videos -->"


@dataclass
class Point:
    """One indexed segment (or a whole video when segments are off)."""

    video_id: str
    segment: int
    start_s: float
    end_s: float
    vector: np.ndarray  # float32[D], L2-normalised
    frames: np.ndarray  # float32[T, D]
    timestamps: list[float]
    regions: np.ndarray | None = None  # float32[T, G, W] when the version's scorer reads region tokens


def long_dataset(root: Path) -> Path:
    from vidsearch.synth_long import generate_long_dataset

    if not (root / "manifest.jsonl").is_file():
        generate_long_dataset(root, LONG_SET["n"], LONG_SET["seed"], size=LONG_SET["size"], fps=LONG_SET["fps"],
                              seconds=LONG_SET["seconds"], workers=2, overwrite=True, progress=False)
    return root / "manifest.jsonl"


def index_points(encoder: Any, decode: Any, records: list) -> list[Point]:
    """Decode every record's segment windows in one pass each, encode each window
    (``encode_segments``: each distinct frame once, the head per window)."""
    from vidsearch.services.ingest.encoder import frames_per_video
    from vidsearch.video import decode_segments

    info = encoder.info()
    points: list[Point] = []
    for record in records:
        decoded = decode_segments(record.uri, decode, num_frames=frames_per_video(decode, info),
                                  resize_to=info.image_size)
        [(vectors, frames, regions)] = encoder.encode_segments(decoded.frames, windows=[decoded.frame_index])
        for window, index, vector in zip(decoded.windows, decoded.frame_index, vectors):
            points.append(Point(record.video_id, window.index, window.start_s, window.end_s,
                                vector / max(float(np.linalg.norm(vector)), 1e-12), frames[list(index)],
                                [float(decoded.timestamps[i]) for i in index],
                                None if regions is None else regions[list(index)]))
    return points


def search(model: Any, version: str, points: list[Point], query: str, *, recall_k: int, group_size: int,
           top_k: int, beta: float, rerank: bool) -> list[Any]:
    """SearchResults for ``query`` as the service builds them: groups of each video's best
    ``group_size`` segments by recall (the store's group-by), the reranker scoring every
    row, ``build_results`` keeping each video's best segment."""
    import torch

    from vidsearch.services.query.response import build_results, pad_groups
    from vidsearch.services.reranker.scoring import RerankRequest, score_requests
    from vidsearch.store_schema import Hit

    with torch.inference_mode():
        text = model.encode_text([query])[0].float().cpu().numpy()
    scores = np.stack([p.vector for p in points]) @ text
    counts = Counter(p.video_id for p in points)
    groups: dict[str, list[Any]] = {}
    for index in np.argsort(-scores, kind="stable"):
        point = points[index]
        if len(groups.get(point.video_id, [])) < group_size:
            payload = {"video_id": point.video_id, "frame_timestamps": point.timestamps, "segment": point.segment,
                       "segment_count": counts[point.video_id], "start_s": point.start_s, "end_s": point.end_s}
            groups.setdefault(point.video_id, []).append(Hit(point.video_id, float(scores[index]), payload,
                                                             point.frames, regions=point.regions))
    candidates = pad_groups(list(groups.values())[:recall_k])
    rerank_scores = relevance = None
    if rerank:
        [(rerank_scores, relevance)] = score_requests(
            model, [RerankRequest(query, candidates.frames, candidates.mask, version, regions=candidates.regions)])
    return build_results(candidates, text, top_k, beta, rerank_scores, relevance,
                         max_payload_bytes=1 << 20, max_response_bytes=1 << 24)


def evaluate(model: Any, version: str, points: list[Point], records: list, *, beta: float, rerank: bool,
             group_size: int, recall_k: int = 50, top_k: int = 10) -> dict[str, float]:
    from vidsearch.retrieval_metrics import in_span, moment_metrics, summarize_ranks

    ranks, moments, spans, durations = [], [], [], []
    segment_hits, misses, same_colour = 0, 0, 0
    started = time.perf_counter()
    for record in records:
        for event in record.events:
            results = search(model, version, points, event["caption"], recall_k=recall_k,
                             group_size=group_size, top_k=top_k, beta=beta, rerank=rerank)
            ids = [r.video_id for r in results]
            rank = ids.index(record.video_id) + 1 if record.video_id in ids else None
            ranks.append(rank if rank is not None else len(records) + 1)  # not returned: past the last
            moments.append(results[rank - 1].best_moment_seconds if rank is not None else None)
            spans.append((float(event["start_s"]), float(event["end_s"])))
            durations.append(float(record.metadata["duration"]))
            if rank is None:
                continue
            # Why a moment misses: the returned segment does not hold the event, or it
            # does and the best frame is another event's (of the same colour?).
            hit = results[rank - 1]
            segment_hits += hit.segment_start_s < event["end_s"] and event["start_s"] < hit.segment_end_s
            if not in_span(hit.best_moment_seconds, *spans[-1]):
                misses += 1
                shown = [e for e in record.events if in_span(hit.best_moment_seconds, e["start_s"], e["end_s"])]
                same_colour += bool(shown) and shown[0]["colour"] == event["colour"]
    out = {**summarize_ranks(np.asarray(ranks), ks=(1, 5)),
           **moment_metrics(ranks, moments, spans, durations)}
    found = out["found"]
    out["segment_holds_event"] = 100.0 * segment_hits / found if found else float("nan")
    out["misses_same_colour"] = 100.0 * same_colour / misses if misses else float("nan")
    out["ms_per_query"] = 1000.0 * (time.perf_counter() - started) / len(ranks)
    return out


def run_long(registry_root: str, settings: Any, cache_dir: Path) -> dict[str, Any]:
    """Index the long set with segments on and off, search every event caption; results by row."""
    from vidsearch.config import ModelSettings
    from vidsearch.services.ingest.encoder import FrameEncoder
    from vidsearch.synth import load_manifest

    manifest = long_dataset(cache_dir / "quality-long-{n}x{seconds:g}s-s{seed}".format(**LONG_SET))
    records = load_manifest(manifest)
    root = str(manifest.parent.resolve())
    model_settings = ModelSettings(registry_root=registry_root, device="cpu", use_shipped=False)
    settings = settings.model_copy(update={"model": model_settings})
    encoder = FrameEncoder(settings)  # the ingest actor's class, in-process
    model, version = encoder.model, encoder.version
    segmented = settings.decode.model_copy(update={"allowed_prefixes": [root]})
    # Segments off: one window longer than any video, i.e. decode_video's frames.
    whole = segmented.model_copy(update={"segment_s": segmented.max_duration_s, "segment_overlap_s": 0.0})
    beta = settings.serve.beta
    rows: dict[str, dict[str, float]] = {}
    for label, decode in ((f"segments ({segmented.segment_s:g} s, {segmented.segment_overlap_s:g} s overlap)",
                           segmented), ("whole video (segments off)", whole)):
        started = time.perf_counter()
        points = index_points(encoder, decode, records)
        index_s = time.perf_counter() - started
        for rerank in (True, False):
            row = evaluate(model, version, points, records, beta=beta, rerank=rerank,
                           group_size=settings.serve.rerank_segments)
            row.update(points=float(len(points)), index_s=index_s)
            rows[f"{label}, {'recall + rerank' if rerank else 'recall only'}"] = row
        print(f"quality --long: {label}: {len(points)} points", flush=True)
    return {"version": version, "set": {**LONG_SET, "events": sum(len(r.events) for r in records)},
            "segment_s": segmented.segment_s, "overlap_s": segmented.segment_overlap_s, "rows": rows}


def section_lines(long: dict[str, Any], md_table: Any, command: str) -> list[str]:
    """The "Long videos" section of quality.md (between SECTION_MARK lines)."""
    s = long["set"]
    lines = [SECTION_MARK, "## Long videos (moments)", "",
             f"{s['n']} videos of {s['seconds']:g} s ({s['size']} px, {s['fps']:g} fps, `vidsearch synth --long "
             f"--seed {s['seed']}`), {s['events']} events of 5-12 s, each with its own caption; every caption "
             f"is one query, whose right answer is its video and whose moment must lie in the event's span. "
             f"Model `{long['version']}`. Indexed with `decode_segments` and the ingest encoder (one point per "
             "segment), searched in-process the way the service answers (best segment per video, reranker "
             "scoring of its best `serve.rerank_segments` segments, `build_results`). `moment@1`: of the queries whose first result is "
             "the right video, % whose best moment is inside the event; `moment_all`: % of all queries with "
             "both; `moment_found`: the same over every query whose video was returned at any rank; `chance`: mean "
             "event length / video length, what a moment drawn at random would score. Why moments miss: "
             "`segment_holds_event`: % of returned videos whose returned segment overlaps the event; "
             "`misses_same_colour`: % of missed moments that lie in another event of the same colour "
             "(the model tells colours apart, hardly shapes or sizes: see twins by relation above).",
             ""]
    columns = ("R@1", "R@5", "moment@1", "moment_all", "moment_found", "chance", "segment_holds_event",
               "misses_same_colour", "points", "ms_per_query")
    lines += md_table(["", *columns], [[label] + [f"{row[c]:.1f}" for c in columns]
                                        for label, row in long["rows"].items()])
    return lines + ["", f"With {s['n']} videos a random ranking has R@1 {100 / s['n']:.1f}. Section written by "
                        f"`{command}`; search times are in-process on this CPU.", "", SECTION_MARK]


def splice_section(text: str, section: list[str]) -> str:
    """``text`` with its long-videos section replaced by ``section`` (appended when absent)."""
    block = "\n".join(section)
    if text.count(SECTION_MARK) >= 2:
        head, _, rest = text.partition(SECTION_MARK)
        _, _, tail = rest.partition(SECTION_MARK)
        return head + block + tail
    return text.rstrip() + "\n\n" + block + "\n"
