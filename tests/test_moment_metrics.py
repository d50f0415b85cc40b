"""moment_metrics against values worked out by hand."""
from __future__ import annotations

import math

import pytest

from vidsearch.retrieval_metrics import in_span, moment_metrics


def test_hand_computed_example():
    # 4 queries on videos of 100 s and 50 s:
    #  q0: right video first, moment 12 s in [10, 20)      -> hit, inside
    #  q1: right video first, moment 30 s outside [40, 50) -> hit, outside
    #  q2: right video at rank 3, moment 5 s in [0, 10)    -> found, inside, not a hit
    #  q3: right video not returned                        -> nothing
    out = moment_metrics([1, 1, 3, None], [12.0, 30.0, 5.0, None],
                         [(10.0, 20.0), (40.0, 50.0), (0.0, 10.0), (20.0, 25.0)], [100.0, 100.0, 50.0, 50.0])
    assert out["moment@1"] == pytest.approx(50.0)  # 1 of 2 hits
    assert out["moment_all"] == pytest.approx(25.0)  # 1 of 4 queries
    assert out["moment_found"] == pytest.approx(100.0 * 2 / 3)  # q0 and q2 of 3 found
    # chance: mean of 10/100, 10/100, 10/50, 5/50 = (0.1 + 0.1 + 0.2 + 0.1) / 4
    assert out["chance"] == pytest.approx(12.5)
    assert (out["hits@1"], out["found"], out["queries"]) == (2.0, 3.0, 4.0)


def test_the_span_is_closed_at_the_start_and_open_at_the_end():
    assert in_span(10.0, 10.0, 20.0) and in_span(19.99, 10.0, 20.0)
    assert not in_span(20.0, 10.0, 20.0) and not in_span(9.99, 10.0, 20.0)
    assert in_span(9.99995, 10.0, 20.0)  # float32 timestamps a hair before the start
    out = moment_metrics([1, 1], [20.0, 10.0], [(10.0, 20.0), (10.0, 20.0)], [40.0, 40.0])
    assert out["moment@1"] == pytest.approx(50.0) and out["chance"] == pytest.approx(25.0)


def test_no_hit_gives_nan_rates_not_zero_division():
    out = moment_metrics([2, 0], [3.0, None], [(0.0, 5.0), (0.0, 5.0)], [10.0, 10.0])
    assert math.isnan(out["moment@1"]) and out["moment_all"] == 0.0
    assert out["moment_found"] == pytest.approx(100.0)  # q0's right video, rank 2, moment inside


def test_a_span_past_the_video_end_counts_only_up_to_the_end_for_chance():
    out = moment_metrics([None], [None], [(90.0, 120.0)], [100.0])
    assert out["chance"] == pytest.approx(10.0) and math.isnan(out["moment_found"])


@pytest.mark.parametrize("args", [
    ([], [], [], []),
    ([1], [1.0, 2.0], [(0.0, 1.0)], [5.0]),
    ([1], [1.0], [(2.0, 1.0)], [5.0]),
    ([1], [1.0], [(0.0, 1.0)], [0.0]),
])
def test_bad_input_raises_value_error(args):
    with pytest.raises(ValueError):
        moment_metrics(*args)
