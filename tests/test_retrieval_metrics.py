"""Retrieval metrics against examples worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsearch import retrieval_metrics as rm_module
from vidsearch.retrieval_metrics import (ranks, retrieval_metrics, summarize_ranks,
                                         video_to_text_metrics, video_to_text_ranks)

# 4 texts x 4 videos, one caption per video (text i -> video i).
SIM_4x4 = np.array([
    [0.9, 0.1, 0.2, 0.3],  # true 0.9, nothing higher          -> rank 1
    [0.8, 0.7, 0.1, 0.0],  # true 0.7, above it: 0.8            -> rank 2
    [0.5, 0.6, 0.4, 0.1],  # true 0.4, above it: 0.5, 0.6       -> rank 3
    [0.9, 0.8, 0.7, 0.1],  # true 0.1, above it: 0.9, 0.8, 0.7  -> rank 4
])


def test_text_to_video_ranks_by_hand():
    assert ranks(SIM_4x4, [0, 1, 2, 3]).tolist() == [1, 2, 3, 4]


def test_metrics_by_hand():
    m = retrieval_metrics(SIM_4x4, np.arange(4))
    # ranks [1, 2, 3, 4]: R@1 = 1/4, R@5 = R@10 = 4/4; median of 1..4 = 2.5; mean = 2.5
    assert m == {"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.5, "MnR": 2.5}


def test_recall_at_5_and_10_by_hand():
    # 3 texts over 12 videos. Row i holds scores 0..11 shuffled so the true video has a chosen
    # rank: the true video's score s means 11 - s videos score higher -> rank 12 - s.
    sim = np.tile(np.arange(12, dtype=np.float32), (3, 1))
    t2v = np.array([11, 7, 0])  # scores 11, 7, 0 -> ranks 1, 5, 12
    assert ranks(sim, t2v).tolist() == [1, 5, 12]
    m = retrieval_metrics(sim, t2v)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == pytest.approx(200 / 3)   # ranks 1 and 5
    assert m["R@10"] == pytest.approx(200 / 3)  # 12 is still out
    assert (m["MdR"], m["MnR"]) == (5.0, 6.0)   # median of (1, 5, 12), mean 18 / 3


def test_multi_caption_per_video_by_hand():
    # 5 captions of 3 videos: captions 0, 1 -> video 0; 2, 3 -> video 1; 4 -> video 2.
    sim = np.array([
        [0.9, 0.2, 0.1],  # t0 (v0): 0.9 best               -> rank 1
        [0.3, 0.5, 0.4],  # t1 (v0): 0.5 and 0.4 above 0.3  -> rank 3
        [0.1, 0.8, 0.2],  # t2 (v1): best                   -> rank 1
        [0.6, 0.5, 0.1],  # t3 (v1): 0.6 above              -> rank 2
        [0.2, 0.3, 0.7],  # t4 (v2): best                   -> rank 1
    ])
    t2v = [0, 0, 1, 1, 2]
    assert ranks(sim, t2v).tolist() == [1, 3, 1, 2, 1]
    m = retrieval_metrics(sim, t2v)
    assert m["R@1"] == pytest.approx(60.0) and m["R@5"] == 100.0
    assert (m["MdR"], m["MnR"]) == (1.0, pytest.approx(8 / 5))
    # Video -> text, per column, counting only other videos' captions above the best own one:
    # v0: own best 0.9 (t0); foreign column values 0.1, 0.6, 0.2 -> none above    -> rank 1
    # v1: own best 0.8 (t2); foreign 0.2, 0.5, 0.3 -> none above                   -> rank 1
    # v2: own best 0.7 (t4); foreign 0.1, 0.4, 0.2, 0.1 -> none above               -> rank 1
    assert video_to_text_ranks(sim, t2v).tolist() == [1, 1, 1]


def test_video_to_text_by_hand():
    # 3 captions, 3 videos (caption i -> video i). Columns read top to bottom:
    sim = np.array([
        [0.2, 0.9, 0.3],
        [0.5, 0.4, 0.1],
        [0.6, 0.8, 0.0],
    ])
    # v0: own 0.2; foreign 0.5, 0.6 above -> rank 3
    # v1: own 0.4; foreign 0.9, 0.8 above -> rank 3
    # v2: own 0.0; foreign 0.3, 0.1 above -> rank 3
    assert video_to_text_ranks(sim, [0, 1, 2]).tolist() == [3, 3, 3]
    # text -> video on the same matrix: t0 true 0.2 < 0.9, 0.3 -> 3; t1 0.4 < 0.5 -> 2;
    # t2 0.0 is the lowest -> 3
    assert ranks(sim, [0, 1, 2]).tolist() == [3, 2, 3]
    m = video_to_text_metrics(sim, [0, 1, 2])
    assert m == {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 3.0}


def test_video_to_text_own_captions_never_count_against_it():
    # v0 has two captions scoring 0.5 and 0.7; one foreign caption scores 0.6.
    sim = np.array([[0.5, 0.0], [0.7, 0.0], [0.6, 0.9]])
    # best own 0.7 > foreign 0.6 -> rank 1 (t0 at 0.5 is v0's own and is ignored); v1 -> 1
    assert video_to_text_ranks(sim, [0, 0, 1]).tolist() == [1, 1]


def test_ties_are_pessimistic():
    sim = np.array([
        [0.5, 0.5, 0.5],  # true v0 ties with both others -> rank 3
        [0.7, 0.7, 0.1],  # true v1 ties with v0          -> rank 2
        [0.2, 0.3, 0.4],  # no tie                        -> rank 1
    ])
    assert ranks(sim, [0, 1, 2]).tolist() == [3, 2, 1]
    # A constant similarity matrix is a useless model; it must not score R@1 = 100.
    flat = np.zeros((4, 4))
    assert ranks(flat, np.arange(4)).tolist() == [4, 4, 4, 4]
    assert retrieval_metrics(flat, np.arange(4))["R@1"] == 0.0
    # video->text, by column: v0 own 0.5 (t0), foreign 0.7 above, 0.2 below -> rank 2;
    # v1 own 0.7 (t1), foreign 0.5 and 0.3 below -> rank 1;
    # v2 own 0.4 (t2), foreign 0.5 above, 0.1 below -> rank 2
    assert video_to_text_ranks(sim, [0, 1, 2]).tolist() == [2, 1, 2]
    # Column 0 below: v0 own 0.6 (t0) ties foreign t1's 0.6 -> counted above -> rank 2.
    tied = np.array([[0.6, 0.1], [0.6, 0.9]])
    assert video_to_text_ranks(tied, [0, 1]).tolist() == [2, 1]
    # Every video ties with every foreign caption: 3 foreign captions above -> rank 4.
    assert video_to_text_ranks(flat, np.arange(4)).tolist() == [4, 4, 4, 4]


def test_distractor_videos_without_captions():
    # Video 2 has no caption: fine for text->video (it is a distractor) ...
    sim = np.array([[0.9, 0.1, 0.95], [0.1, 0.8, 0.2]])
    assert ranks(sim, [0, 1]).tolist() == [2, 1]
    # ... but video->text is undefined for it.
    with pytest.raises(ValueError, match=r"1 video\(s\) have none \(e.g. \[2\]\)"):
        video_to_text_ranks(sim, [0, 1])


def test_custom_ks_and_summary():
    m = summarize_ranks(np.array([1, 2, 3, 50]), ks=(1, 2, 50))
    # rank <= 1: 1/4; <= 2: 2/4; <= 50: 4/4; median (2 + 3) / 2; mean 56 / 4
    assert m == {"R@1": 25.0, "R@2": 50.0, "R@50": 100.0, "MdR": 2.5, "MnR": 14.0}


def test_torch_inputs_including_bfloat16():
    sim = torch.tensor(SIM_4x4, dtype=torch.bfloat16)
    assert ranks(sim, torch.arange(4)).tolist() == [1, 2, 3, 4]


def test_integer_scores_and_infinities():
    sim = np.array([[3, 5], [1, 2]])  # t0 true 3 < 5 -> 2; t1 true 2 -> 1
    assert ranks(sim, [0, 1]).tolist() == [2, 1]
    masked = np.array([[-np.inf, 0.0], [np.inf, 1.0]])  # t0 masked true video -> 2; t1 -> 2
    assert ranks(masked, [0, 1]).tolist() == [2, 2]


def test_chunked_computation_matches_whole(monkeypatch):
    rng = np.random.default_rng(0)
    sim = rng.standard_normal((37, 11)).round(1)  # rounding creates plenty of ties
    t2v = np.concatenate([np.arange(11), rng.integers(0, 11, 26)])
    whole_t2v, whole_v2t = ranks(sim, t2v), video_to_text_ranks(sim, t2v)
    # Brute force, straight from the definitions.
    expected = [int((sim[i] >= sim[i, t2v[i]]).sum()) for i in range(37)]
    assert whole_t2v.tolist() == expected
    expected_v2t = []
    for v in range(11):
        own = t2v == v
        best = sim[own, v].max()
        expected_v2t.append(1 + int((sim[~own, v] >= best).sum()))
    assert whole_v2t.tolist() == expected_v2t
    monkeypatch.setattr(rm_module, "_CHUNK_CELLS", 25)  # 2 rows of 11 per chunk
    assert ranks(sim, t2v).tolist() == whole_t2v.tolist()
    assert video_to_text_ranks(sim, t2v).tolist() == whole_v2t.tolist()


# ---- bad inputs -----------------------------------------------------------------------------
@pytest.mark.parametrize("sim, t2v, message", [
    (np.zeros(3), [0, 1, 2], "sim must be 2-D"),
    (np.zeros((2, 2, 2)), [0, 1], "sim must be 2-D"),
    (np.zeros((0, 3)), [], "at least one text and one video"),
    (np.zeros((2, 0)), [0, 0], "at least one text and one video"),
    (np.array([["a", "b"]]), [0], "must hold real numbers"),
    (np.ones((1, 2), dtype=bool), [0], "must hold real numbers"),
    (np.ones((1, 2), dtype=complex), [0], "must hold real numbers"),
    (np.array([[0.1, np.nan], [0.2, 0.3]]), [0, 1], r"sim contains NaN \(rows \[0\]\)"),
    (np.zeros((3, 2)), [0, 1], r"one entry per text \(3\), got shape \(2,\)"),
    (np.zeros((2, 2)), [[0, 1]], "must be 1-D"),
    (np.zeros((2, 2)), [0.0, 1.0], "integer video indices"),
    (np.zeros((2, 2)), [True, False], "integer video indices"),
    (np.zeros((2, 2)), [0, 2], r"text_to_video\[1\] = 2 is not a video index in \[0, 2\)"),
    (np.zeros((2, 2)), [-1, 0], r"text_to_video\[0\] = -1"),
    ([[0.1, 0.2], [0.3]], [0, 1], "sim is not array-like|sim must"),
])
def test_bad_inputs(sim, t2v, message):
    for fn in (ranks, video_to_text_ranks, retrieval_metrics, video_to_text_metrics):
        with pytest.raises(ValueError, match=message):
            fn(sim, t2v)


@pytest.mark.parametrize("rank_values, ks, message", [
    ([], (1,), "non-empty 1-D"),
    ([[1, 2]], (1,), "non-empty 1-D"),
    ([0, 1], (1,), "integers >= 1"),
    ([1.5], (1,), "integers >= 1"),
    ([1, 2], (0,), "ks must be positive integers"),
    ([1, 2], (1.5,), "ks must be positive integers"),
    ([1, 2], (True,), "ks must be positive integers"),
    ([1, 2], "15", "ks must be positive integers"),
])
def test_bad_summary_inputs(rank_values, ks, message):
    with pytest.raises(ValueError, match=message):
        summarize_ranks(rank_values, ks)


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval_brackets_the_metric_and_is_reproducible():
    from vidsearch.retrieval_metrics import bootstrap_interval

    rank_values = np.array([1] * 80 + [2] * 15 + [7] * 5)  # R@1 80, R@5 95
    low, high = bootstrap_interval(rank_values, "R@1", samples=2000, seed=3)
    assert low < 80.0 < high
    # Binomial standard error sqrt(.8 * .2 / 100) = 4 points: a 95% interval spans about +-8.
    assert 10.0 < high - low < 22.0
    assert bootstrap_interval(rank_values, "R@1", samples=2000, seed=3) == (low, high)
    assert bootstrap_interval(np.ones(50, dtype=np.int64), "R@1") == (100.0, 100.0)
    assert bootstrap_interval(rank_values, "R@10") == (100.0, 100.0)
    md_low, md_high = bootstrap_interval(rank_values, "MdR")
    assert md_low == md_high == 1.0


def test_bootstrap_paired_difference_is_exact_when_systems_differ_by_a_constant():
    from vidsearch.retrieval_metrics import bootstrap_interval, bootstrap_metric

    rng = np.random.default_rng(0)
    base = rng.integers(1, 6, size=200)
    better = np.maximum(base - 1, 1)
    diffs = bootstrap_metric(better, "R@1", samples=500, seed=1, baseline=base)
    assert diffs.shape == (500,) and (diffs >= 0).all()
    # Same resample for both: MnR moves by exactly the share of ranks that could drop.
    mnr = bootstrap_metric(better, "MnR", samples=300, seed=1, baseline=base)
    assert (mnr <= 0).all() and (mnr >= -1.0).all()
    assert bootstrap_interval(base, "R@1", baseline=base) == (0.0, 0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank_values": np.array([], dtype=np.int64)}, "non-empty"),
    ({"metric": "P@1"}, "no bootstrap"),
    ({"metric": "R@0"}, "no bootstrap"),
    ({"baseline": np.ones(3, dtype=np.int64)}, "does not match"),
    ({"level": 1.0}, "level"),
    ({"samples": 0}, "samples"),
])
def test_bootstrap_bad_inputs(kwargs, message):
    from vidsearch.retrieval_metrics import bootstrap_interval

    args = {"rank_values": np.ones(5, dtype=np.int64), "metric": "R@1", **kwargs}
    with pytest.raises(ValueError, match=message):
        bootstrap_interval(**args)
