"""Text-video retrieval metrics as reported by CLIP4Clip / TeachCLIP: R@1, R@5, R@10 (in
percent), MdR (median rank) and MnR (mean rank).

Input is a similarity matrix ``sim[n_texts, n_videos]`` (higher = more similar) and
``text_to_video[n_texts]``, the column of each caption's ground-truth video. Several captions
may share one video, and videos with no caption may act as distractors (text->video only).

Tie rule (pessimistic): an item that scores *exactly the same* as the ground truth counts as
ranked above it. A degenerate model that gives every video the same score therefore gets the
worst rank, not rank 1; optimistic tie-breaking would reward it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["ranks", "video_to_text_ranks", "summarize_ranks", "retrieval_metrics",
           "video_to_text_metrics", "bootstrap_metric", "bootstrap_interval", "moment_metrics", "in_span",
           "DEFAULT_KS", "MOMENT_TOLERANCE_S"]

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Manifest spans are rounded to 0.1 ms and decoded timestamps are float32: a frame shown
# exactly at an event's start must not fall out of it by rounding.
MOMENT_TOLERANCE_S = 1e-4
# Rows compared at once: bounds the temporary boolean matrix to about 16 M cells.
_CHUNK_CELLS = 1 << 24


def _as_array(x: Any, what: str) -> np.ndarray:
    # torch tensors (any device/dtype, e.g. bf16 on CUDA) without importing torch here.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not array-like: {exc}") from None


def _validate(sim: Any, text_to_video: Any) -> tuple[np.ndarray, np.ndarray]:
    sim = _as_array(sim, "sim")
    t2v = _as_array(text_to_video, "text_to_video")
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_texts, n_videos], got shape {sim.shape}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must have at least one text and one video, got shape {sim.shape}")
    if sim.dtype == bool or not (np.issubdtype(sim.dtype, np.floating) or np.issubdtype(sim.dtype, np.integer)):
        raise ValueError(f"sim must hold real numbers, got dtype {sim.dtype}")
    if np.issubdtype(sim.dtype, np.floating) and np.isnan(sim).any():
        # NaN compares false with everything, which would silently yield rank 1.
        rows = np.unique(np.nonzero(np.isnan(sim))[0])
        raise ValueError(f"sim contains NaN (rows {rows[:5].tolist()}{' ...' if rows.size > 5 else ''})")
    if t2v.ndim != 1 or t2v.shape[0] != sim.shape[0]:
        raise ValueError(f"text_to_video must be 1-D with one entry per text ({sim.shape[0]}), "
                         f"got shape {t2v.shape}")
    if t2v.dtype == bool or not np.issubdtype(t2v.dtype, np.integer):
        raise ValueError(f"text_to_video must hold integer video indices, got dtype {t2v.dtype}")
    bad = np.nonzero((t2v < 0) | (t2v >= sim.shape[1]))[0]
    if bad.size:
        raise ValueError(f"text_to_video[{bad[0]}] = {t2v[bad[0]]} is not a video index in "
                         f"[0, {sim.shape[1]})")
    return sim, t2v.astype(np.int64)


def _row_chunks(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_CELLS // n_cols)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def ranks(sim: Any, text_to_video: Any) -> np.ndarray:
    """Text->video rank (1 = best) of each caption's ground-truth video, ties pessimistic:
    rank = number of videos scoring >= the true video (the true video included)."""
    sim, t2v = _validate(sim, text_to_video)
    n_texts, n_videos = sim.shape
    out = np.empty(n_texts, dtype=np.int64)
    for start, stop in _row_chunks(n_texts, n_videos):
        block = sim[start:stop]
        true_scores = block[np.arange(stop - start), t2v[start:stop]]
        out[start:stop] = (block >= true_scores[:, None]).sum(axis=1)
    return out


def video_to_text_ranks(sim: Any, text_to_video: Any) -> np.ndarray:
    """Video->text rank of each video (index order): the rank of its best-scoring caption
    among all captions, where only *other* videos' captions can rank above it; ties with
    those count against the video (pessimistic). Every video needs at least one caption."""
    sim, t2v = _validate(sim, text_to_video)
    n_texts, n_videos = sim.shape
    counts = np.bincount(t2v, minlength=n_videos)
    if (counts == 0).any():
        missing = np.nonzero(counts == 0)[0]
        raise ValueError(f"video->text needs a caption for every video; {missing.size} video(s) "
                         f"have none (e.g. {missing[:5].tolist()})")
    # The best caption score of every video, then count foreign captions at or above it.
    best = np.full(n_videos, -np.inf)
    np.maximum.at(best, t2v, sim[np.arange(n_texts), t2v].astype(np.float64))
    above = np.zeros(n_videos, dtype=np.int64)
    for start, stop in _row_chunks(n_texts, n_videos):
        block = sim[start:stop] >= best[None, :]
        block[np.arange(stop - start), t2v[start:stop]] = False  # a video's own captions
        above += block.sum(axis=0)
    return above + 1


def summarize_ranks(rank_values: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"R@k": percent with rank <= k for each k, "MdR": median rank, "MnR": mean rank}."""
    r = _as_array(rank_values, "ranks")
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer) or r.dtype == bool or (r < 1).any():
        raise ValueError("ranks must be integers >= 1")
    if isinstance(ks, (str, bytes)) or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    metrics = {f"R@{int(k)}": float(100.0 * np.mean(r <= k)) for k in ks}
    metrics["MdR"] = float(np.median(r))
    metrics["MnR"] = float(np.mean(r))
    return metrics


def retrieval_metrics(sim: Any, text_to_video: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Text->video R@k (percent), MdR and MnR over every caption."""
    return summarize_ranks(ranks(sim, text_to_video), ks)


def video_to_text_metrics(sim: Any, text_to_video: Any, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Video->text R@k (percent), MdR and MnR over every video (see video_to_text_ranks)."""
    return summarize_ranks(video_to_text_ranks(sim, text_to_video), ks)


def _rank_statistic(picked: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` of each row of resampled ranks [S, n]."""
    if metric.startswith("R@") and metric[2:].isdigit() and int(metric[2:]) >= 1:
        return 100.0 * (picked <= int(metric[2:])).mean(axis=1)
    if metric == "MdR":
        return np.median(picked, axis=1)
    if metric == "MnR":
        return picked.mean(axis=1)
    raise ValueError(f"no bootstrap for metric {metric!r} (R@k, MdR or MnR)")


def bootstrap_metric(rank_values: Any, metric: str, samples: int = 1000, seed: int = 0,
                     baseline: Any = None) -> np.ndarray:
    """``metric`` (R@k in percent, MdR or MnR) on each of ``samples`` bootstrap resamples of
    the queries: float64[samples].

    With ``baseline`` (the ranks of another system on the same queries, in the same
    order), each value is ``metric(rank_values) - metric(baseline)`` on the *same*
    resample: a paired difference, far tighter than two independent intervals, since
    both systems see the same easy and hard queries.
    """
    values = _as_array(rank_values, "ranks")
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {values.shape}")
    other = None if baseline is None else _as_array(baseline, "baseline")
    if other is not None and other.shape != values.shape:
        raise ValueError(f"baseline: shape {other.shape} does not match ranks {values.shape}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, samples, 200):  # bounded memory: 200 x n indices at a time
        index = rng.integers(0, values.size, size=(min(200, samples - start), values.size))
        stat = _rank_statistic(values[index], metric)
        out.append(stat if other is None else stat - _rank_statistic(other[index], metric))
    return np.concatenate(out)


def bootstrap_interval(rank_values: Any, metric: str = "R@1", samples: int = 1000, seed: int = 0,
                       level: float = 0.95, baseline: Any = None) -> tuple[float, float]:
    """Percentile bootstrap interval (``level``, e.g. 95%) of ``metric`` over resampled
    queries, or of its paired difference against ``baseline`` (see :func:`bootstrap_metric`).
    Fixed ``seed``: the same ranks always give the same interval."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    stats = bootstrap_metric(rank_values, metric, samples, seed, baseline)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(low), float(high)


def in_span(moment_s: float, start_s: float, end_s: float) -> bool:
    """Whether a frame time lies in the event span ``[start_s, end_s)``: the frame at
    ``end_s`` is the first one after the event (within :data:`MOMENT_TOLERANCE_S`)."""
    return start_s - MOMENT_TOLERANCE_S <= moment_s < end_s - MOMENT_TOLERANCE_S


def moment_metrics(rank_values: Sequence[int | None], moments: Sequence[float | None],
                   spans: Sequence[tuple[float, float]], durations: Sequence[float]) -> dict[str, float]:
    """Moment accuracy of event-caption queries on long videos, in percent.

    Per query: ``rank_values[i]`` is the rank of the right video in the results (1 =
    first; None or 0 when it was not returned), ``moments[i]`` the ``best_moment_seconds``
    reported for it (None when not returned), ``spans[i]`` the event's (start_s, end_s)
    and ``durations[i]`` its video's length.

    - ``moment@1``: of the queries whose first result is the right video, the share
      whose moment lies in the span (NaN when there is none);
    - ``moment_all``: of all queries, the share with the right video first *and* its
      moment in the span (``R@1 x moment@1``);
    - ``moment_found``: of the queries whose right video was returned at any rank, the
      share whose moment lies in the span (NaN when none was returned);
    - ``chance``: the mean of span length / duration, what a moment drawn uniformly
      over the video would score;
    - ``hits@1``, ``found`` and ``queries``: the counts behind them.
    """
    n = len(spans)
    if not (len(rank_values) == len(moments) == len(durations) == n) or n == 0:
        raise ValueError(f"moment_metrics needs one rank, moment, span and duration per query "
                         f"(got {len(rank_values)}, {len(moments)}, {n}, {len(durations)})")
    first, found, inside_first, inside_found, chance = 0, 0, 0, 0, 0.0
    for rank, moment, (start, end), duration in zip(rank_values, moments, spans, durations):
        if not (duration > 0 and 0 <= start <= end):
            raise ValueError(f"bad span ({start}, {end}) for a video of {duration} s")
        chance += min(max((min(end, duration) - start) / duration, 0.0), 1.0)
        if not rank or moment is None:
            continue
        hit = in_span(float(moment), float(start), float(end))
        found += 1
        inside_found += hit
        if rank == 1:
            first += 1
            inside_first += hit
    return {"moment@1": 100.0 * inside_first / first if first else float("nan"),
            "moment_all": 100.0 * inside_first / n,
            "moment_found": 100.0 * inside_found / found if found else float("nan"),
            "chance": 100.0 * chance / n, "hits@1": float(first), "found": float(found), "queries": float(n)}
