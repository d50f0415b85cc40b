"""The spatial scorer's motion tokens and word embeddings (``scorer.motion_tokens``,
``scorer.word_tokens``) on real tiny open_clip towers: the motion token by hand, the config
rules, the refusal of text handed over without word embeddings, a published version that
reads them back, and a direction task that only they make learnable."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vidsearch.models import ModelConfig, TextFeatures, build_model
from vidsearch.models.persist import load_model_version, save_model_version
from vidsearch.models.spatial_scorer import SpatialCrossScorer
from vidsearch.registry import ModelRegistry

from test_models import _frames, _pad_with_garbage, _perturb
from test_spatial_model import (CELLS, WIDTH, _with_scorer, pad_regions, pair_margin, spatial_config,
                                train_scorer_on_pairs, unit_regions)


def motion_config(**scorer) -> ModelConfig:
    return spatial_config(**{"own_text": True, "motion_tokens": True, "word_tokens": True, **scorer})


def test_the_motion_token_is_the_change_since_the_previous_frame_by_hand():
    regions = unit_regions(2, 4, seed=1)
    regions[1, 3] = 0.0  # padding, as the scorer zeroes it
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    change, moved = SpatialCrossScorer._motion(regions, mask)
    assert change.shape == (2, 4, CELLS * WIDTH)
    assert moved.tolist() == [[False, True, True, True], [False, True, True, False]]
    for b in range(2):
        assert torch.equal(change[b, 0], torch.zeros(CELLS * WIDTH))
        for t in range(1, 4):
            want = (regions[b, t] - regions[b, t - 1]).flatten() if moved[b, t] else torch.zeros(CELLS * WIDTH)
            assert torch.allclose(change[b, t], want, atol=0), (b, t)
    # Played backwards, every change flips its sign (and moves to the mirrored frame).
    backwards, _ = SpatialCrossScorer._motion(regions[:1].flip(1), mask[:1])
    assert torch.allclose(backwards[0, 1:], -change[0, 1:].flip(0), atol=1e-7)


@pytest.mark.parametrize("scorer, message", [
    ({"kind": "cross", "motion_tokens": True}, r"^scorer\.motion_tokens/word_tokens: only the spatial scorer"),
    ({"kind": "xclip", "word_tokens": True, "own_text": True}, r"^scorer\.motion_tokens/word_tokens: only the spatial"),
    ({"kind": "spatial", "grid": 2, "word_tokens": True}, r"^scorer\.word_tokens: needs scorer\.own_text"),
    ({"kind": "spatial", "grid": 2, "motion_tokens": "yes"}, r"^scorer\.motion_tokens: must be true or false"),
])
def test_motion_and_word_config_rules(scorer, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(_with_scorer(**scorer))


def test_word_tokens_refuse_text_handed_over_without_word_embeddings():
    model = build_model(motion_config(), device="cpu", seed=0)
    frames = _frames(1, 3, seed=2)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        own = model.encode_scorer_text(["a red circle moves left"])
    assert own.words is not None and own.words.shape[:2] == own.tokens.shape[:2]
    handed = TextFeatures.from_rows(own.rows())
    assert handed.words is None
    with pytest.raises(ValueError, match=r"word embeddings \(scorer\.word_tokens\)"), torch.no_grad():
        model.scorer(handed, frames, mask, regions=unit_regions(1, 3, seed=3),
                     video=F.normalize(torch.randn(1, model.embed_dim), dim=-1))
    # The model's own path re-encodes with its scorer tower, so the service hand-off still works.
    with torch.no_grad():
        again = model.text_features_of(["a red circle moves left"], own.rows())
    assert again.words is not None and torch.equal(again.words, own.words)


def test_a_published_version_reads_its_motion_and_word_inputs_back(tmp_path):
    model = build_model(motion_config(), device="cpu", seed=0)
    _perturb(model, 6)
    texts = ["a red square moves left", "a red square moves right"]
    frames, mask = _pad_with_garbage([_frames(1, 4, seed=7)[0], _frames(1, 2, seed=8)[0]], 4)
    regions = pad_regions([unit_regions(1, 4, 9)[0], unit_regions(1, 2, 10)[0]], 4)
    with torch.inference_mode():
        before, _ = model.score_pairs(texts, frames, mask, regions=regions)
        alone, _ = model.score_pairs(texts[1:], frames[1:, :2], mask[1:, :2], regions=regions[1:, :2])
    assert torch.isfinite(before).all() and abs(float(before[0] - before[1])) > 1e-4
    assert torch.allclose(before[1], alone[0], atol=1e-5)  # padding frames make no motion token
    registry = ModelRegistry(str(tmp_path / "registry"))
    loaded, _ = load_model_version(registry, "vidsearch", save_model_version(registry, "vidsearch", model), device="cpu")
    assert loaded.config.scorer.motion_tokens and loaded.config.scorer.word_tokens
    with torch.inference_mode():
        again, _ = loaded.score_pairs(texts, frames, mask, regions=regions)
    assert torch.allclose(again, before, atol=1e-6)


def _direction_task(model):
    """Two videos, one the other played backwards: a bright cell moves left -> right in the first.
    Their frame vectors are the same set; their captions differ only in the direction word, and
    both captions get the *same* contextual tokens and sentence (what the trained text transformer
    gives them, measured at cosine 0.999): only the word embeddings still tell them apart."""
    frames = _frames(1, 4, seed=11)
    frames = torch.cat([frames, frames.flip(1)])
    mask = torch.ones(2, 4, dtype=torch.bool)
    bright, dark = F.normalize(torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(12)), dim=-1)
    # Row-major 2x2 cells: the bright cell on the left (0, 2), then on the right (1, 3).
    left, right = torch.stack([bright, dark, bright, dark]), torch.stack([dark, bright, dark, bright])
    rightwards = torch.stack([left, left, right, right])
    regions = torch.stack([rightwards, rightwards.flip(0)])
    with torch.no_grad():
        own = model.encode_scorer_text(["the bright shape moves right", "the bright shape moves left"])
    same = own.select(torch.tensor([0, 0]))
    text = TextFeatures(same.tokens, same.mask, same.sentence, own.words)
    return text, frames, mask, regions


def _train_margin(model, steps: int) -> float:
    text, frames, mask, regions = _direction_task(model)
    train_scorer_on_pairs(model, text, frames, mask, regions, steps)
    return pair_margin(model, text, frames, mask, regions)


def test_direction_is_learnable_only_when_the_words_stay_apart():
    """The premise of word_tokens: with the direction words merged, no scorer can learn the
    task (margin exactly 0 after training); with their embeddings and motion tokens it can."""
    merged = build_model(spatial_config(layers=2, own_text=True, motion_tokens=True), device="cpu", seed=0)
    assert _train_margin(merged, 30) == pytest.approx(0.0, abs=1e-6)
    apart = build_model(motion_config(layers=2), device="cpu", seed=0)
    assert _train_margin(apart, 40) > 0.3
