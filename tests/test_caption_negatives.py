"""Counterfactual captions (text-side hard negatives): each describes a video the events do
not show, in the dataset's own wording, and is dropped as a negative for a batch video it
does describe."""
from __future__ import annotations

import numpy as np
import pytest

from vidsearch.services.trainer.stages import CaptionBank, caption_negatives
from vidsearch.synth_scenes import (
    Event, caption_key, counterfactual_caption, events_key, make_captions, plan_dataset, swap_attribute,
)

FPS = 8.0


def _specs(n: int = 60):
    return plan_dataset(n, seed=3, num_frames=24)


def test_counterfactual_captions_describe_other_videos():
    rng = np.random.default_rng(0)
    made = 0
    for spec in _specs():
        events = [e.to_dict(FPS) for e in spec.events]
        own = caption_key(spec.events)
        for _ in range(4):
            result = counterfactual_caption(rng, events)
            if result is None:
                continue
            text, key = result
            made += 1
            assert key != own, text
            assert text not in spec.captions
            assert text[0].isupper() and len(text.split()) >= 6
    assert made >= 200


def test_counterfactual_captions_change_one_attribute_or_the_order():
    rng = np.random.default_rng(5)
    kinds = {"order": 0, "one": 0}
    for spec in _specs():
        own = caption_key(spec.events)
        for _ in range(3):
            result = counterfactual_caption(rng, [e.to_dict(FPS) for e in spec.events])
            if result is None:
                continue
            key = result[1]
            if sorted(key) == sorted(own):
                kinds["order"] += 1
                assert key == tuple(reversed(own))
            else:
                kinds["one"] += 1
                assert len(key) == len(own)
                differing = [(a, b) for a, b in zip(own, key) if a != b]
                assert len(differing) == 1
    assert kinds["order"] > 10 and kinds["one"] > 100


def test_counterfactual_captions_are_deterministic_per_generator():
    events = [e.to_dict(FPS) for e in _specs(5)[0].events]
    first = [counterfactual_caption(np.random.default_rng(11), events) for _ in range(3)]
    again = [counterfactual_caption(np.random.default_rng(11), events) for _ in range(3)]
    assert first == again


def test_no_events_gives_no_counterfactual():
    assert counterfactual_caption(np.random.default_rng(0), []) is None


def test_caption_negatives_are_not_negatives_for_the_video_they_describe():
    # A swap twin in the batch: the anchor's counterfactual may be exactly the twin's description.
    rng = np.random.default_rng(2)
    base = _specs(1)[0].events
    swapped, _ = swap_attribute(rng, base)
    bank = CaptionBank(captions=[list(make_captions(rng, base)), list(make_captions(rng, swapped)), ["no events"]],
                       events=[[e.to_dict(FPS) for e in base], [e.to_dict(FPS) for e in swapped], []])
    found_twin = False
    for seed in range(30):
        negatives = caption_negatives(bank, np.array([0, 1, 2]), 3, np.random.default_rng(seed))
        assert negatives is not None
        assert set(negatives.owners.tolist()) <= {0, 1}  # the event-less video makes none
        assert negatives.valid.shape == (3, len(negatives.texts))
        for e, owner in enumerate(negatives.owners.tolist()):
            assert bool(negatives.valid[owner, e])  # never describes its own video
        twin_rows = ~negatives.valid[1]
        if bool(twin_rows.any()):
            found_twin = True
            for e in np.flatnonzero(twin_rows.numpy()):
                assert negatives.owners[e] == 0
    assert found_twin


def test_caption_negatives_off_or_impossible_gives_none():
    bank = CaptionBank(captions=[["a"], ["b"]], events=[[], []])
    assert caption_negatives(bank, np.array([0, 1]), 0, np.random.default_rng(0)) is None
    assert caption_negatives(bank, np.array([0, 1]), 2, np.random.default_rng(0)) is None


def test_extra_logits_place_each_caption_at_its_own_video():
    import torch

    bank = CaptionBank(captions=[["x"]] * 2, events=[[e.to_dict(FPS) for e in s.events] for s in _specs(2)])
    negatives = caption_negatives(bank, np.array([0, 1]), 1, np.random.default_rng(4))
    own = torch.arange(len(negatives.texts), dtype=torch.float32) + 1.0
    extra = negatives.extra_logits(own, 2)
    for e, owner in enumerate(negatives.owners.tolist()):
        assert extra[owner, e] == pytest.approx(e + 1.0)
        assert torch.isinf(extra[1 - owner, e])


def test_events_key_matches_the_scene_key():
    spec = _specs(1)[0]
    assert events_key([e.to_dict(FPS) for e in spec.events]) == spec.key()
    assert Event.from_dict(spec.events[0].to_dict(FPS)) == spec.events[0]
