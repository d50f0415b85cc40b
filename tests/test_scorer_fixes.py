"""The slow scorers' temperatures, precision and (X-CLIP) frame order, on real tiny
models: learnable temperatures with a between-steps clamp, fp32 similarities under
bf16 autocast, and an order-aware X-CLIP whose padding stays exact."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vidsearch.models import TextFeatures, build_model
from vidsearch.models.config import ScorerConfig
from vidsearch.models.masking import masked_softmax
from vidsearch.models.scorers import MAX_LOGIT_SCALE, build_scorer

SCORER_PRESETS = {"cross": "tiny", "xclip": "tiny-xclip"}
TEXTS = ["a man cooks pasta in a small kitchen", "a dog runs on the beach", "fireworks over a city"]


def _model(kind: str, seed: int = 0):
    return build_model(SCORER_PRESETS[kind], device="cpu", seed=seed)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Move every parameter of ``module`` off its (zero / identity) init, reproducibly."""
    gen = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.empty_like(p).normal_(0.0, std, generator=gen))


def _near(anchor: torch.Tensor, length: int, spread: float, seed: int) -> torch.Tensor:
    """``length`` unit vectors scattered around ``anchor[D]``: moderate, distinct cosines,
    so softmaxes over them are neither flat nor saturated."""
    noise = torch.randn(length, anchor.shape[-1], generator=_gen(seed))
    return F.normalize(anchor + spread * noise, dim=-1)


def _videos_for(text: TextFeatures, lengths: list[int], total: int, seed: int = 0,
                fill: float = 0.0, best: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One video per text, each of ``lengths[b]`` valid frames near its sentence, padded
    to ``total`` with ``fill``. Cosines differ by ~0.05, so 100 * cosine softmaxes are
    not saturated (bf16 errors would show); with ``best`` frame 1 is the closest."""
    dim = text.sentence.shape[-1]
    frames = torch.full((len(lengths), total, dim), fill)
    mask = torch.zeros(len(lengths), total, dtype=torch.bool)
    for b, n in enumerate(lengths):
        video = _near(text.sentence[b], n, spread=0.15, seed=seed + b)
        if best and n > 1:
            video[1] = _near(text.sentence[b], 1, spread=0.1, seed=seed + 100 + b)[0]
        frames[b, :n], mask[b, :n] = video, True
    return frames, mask


def _features(model, texts: list[str] = TEXTS) -> TextFeatures:
    with torch.no_grad():
        return model.encode_text_features(texts)


def _hand_features(batch: int, words: int, dim: int = 32, seed: int = 0) -> TextFeatures:
    """Token and sentence features around one anchor (cosines ~0.5..0.9), to keep every
    attention of the scorers away from saturation."""
    anchor = F.normalize(torch.randn(dim, generator=_gen(seed)), dim=-1) * 2.0
    tokens = torch.stack([_near(anchor, words, spread=0.4, seed=seed + 1 + b) for b in range(batch)])
    sentence = _near(anchor, batch, spread=0.4, seed=seed + 1 + batch)
    return TextFeatures(tokens=tokens, mask=torch.ones(batch, words, dtype=torch.bool), sentence=sentence)


# ---- 1. temperatures learn ----------------------------------------------------------
def _log_scales(scorer: torch.nn.Module) -> torch.Tensor:
    return scorer.logit_scale if hasattr(scorer, "logit_scale") else scorer.logit_scales


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_temperatures_get_a_gradient_at_their_init(kind):
    model = _model(kind)
    model.train()
    scorer = model.scorer
    assert torch.allclose(_log_scales(scorer).detach(), torch.tensor(math.log(100.0)))
    text = _hand_features(3, 5)
    frames, mask = _videos_for(text, [4, 3, 5], 5, best=False)
    scores, relevance = scorer(text, frames, mask)
    # A teacher-style loss: scores plus the cross-entropy of the relevance to a target frame.
    loss = scores.sum() - torch.log(relevance[:, 0]).sum()
    loss.backward()
    grad = _log_scales(scorer).grad
    assert grad is not None and torch.isfinite(grad).all()
    # every temperature (X-CLIP has four) has a real gradient at log(100)
    assert (grad.abs() > 1e-6).all(), grad


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_clamp_temperatures_keeps_clips_range(kind):
    scorer = _model(kind).scorer
    scales = _log_scales(scorer)
    for value, bounded in ((-1.0, 0.0), (6.0, math.log(100.0)), (2.0, 2.0)):
        with torch.no_grad():
            scales.fill_(value)
        scorer.clamp_temperatures_()
        assert torch.allclose(scales.detach(), torch.full_like(scales, bounded), atol=1e-7, rtol=0), value
        assert scales.requires_grad and scales.grad is None  # still a leaf parameter, no graph recorded
    assert MAX_LOGIT_SCALE == math.log(100.0)


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_an_optimizer_step_moves_the_temperature_and_the_clamp_bounds_it(kind):
    model = _model(kind)
    model.train()
    scorer = model.scorer
    text = _hand_features(2, 4, seed=3)
    frames, mask = _videos_for(text, [4, 4], 4, seed=3, best=False)
    before = _log_scales(scorer).detach().clone()
    optimizer = torch.optim.SGD([_log_scales(scorer)], lr=10.0)
    for sign in (1.0, -1.0):  # push both ways, so one of them crosses the bound
        optimizer.zero_grad()
        scores, relevance = scorer(text, frames, mask)
        (sign * (scores.sum() - torch.log(relevance[:, 0]).sum())).backward()
        optimizer.step()
        assert not torch.equal(_log_scales(scorer).detach(), before)
        scorer.clamp_temperatures_()
        scales = _log_scales(scorer).detach()
        assert float(scales.min()) >= 0.0 and float(scales.max()) <= MAX_LOGIT_SCALE + 1e-7


# ---- 2. fp32 similarities under bf16 autocast ----------------------------------------
def _both_precisions(scorer, text, frames, mask):
    with torch.no_grad():
        want = scorer(text, frames, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = scorer(text, frames, mask)
    return want, got


@pytest.mark.parametrize("kind", sorted(SCORER_PRESETS))
def test_untrained_scorers_under_bf16_autocast_equal_fp32(kind):
    model = _model(kind)
    text = _features(model)
    frames, mask = _videos_for(text, [4, 2, 5], 6, fill=3.0)
    (want_s, want_r), (got_s, got_r) = _both_precisions(model.scorer, text, frames, mask)
    assert got_s.dtype == torch.float32 and got_r.dtype == torch.float32
    # Untrained, both scorers are the plain CLIP similarity, so all of it is fp32 maths.
    assert torch.allclose(got_s, want_s, atol=1e-5, rtol=0)
    assert torch.allclose(got_r, want_r, atol=1e-5, rtol=0)
    assert torch.equal(got_r.argmax(dim=1), torch.tensor([1, 1, 1]))


def test_cross_encoder_similarity_is_fp32_when_its_encoder_runs_in_bf16():
    model = _model("cross")
    scorer = model.scorer
    _perturb(scorer, seed=5)
    text = _features(model)
    frames, mask = _videos_for(text, [4, 2, 5], 6, fill=3.0)
    with torch.no_grad():  # heads at zero again: the outputs are the similarity part alone
        heads = [(h.weight.clone(), h.bias.clone()) for h in (scorer.score_head, scorer.relevance_head)]
        for h in (scorer.score_head, scorer.relevance_head):
            h.weight.zero_()
            h.bias.zero_()
    (want_s, want_r), (got_s, got_r) = _both_precisions(scorer, text, frames, mask)
    assert torch.allclose(got_s, want_s, atol=1e-5, rtol=0)
    assert torch.allclose(got_r, want_r, atol=1e-5, rtol=0)

    with torch.no_grad():
        for h, (weight, bias) in zip((scorer.score_head, scorer.relevance_head), heads):
            h.weight.copy_(weight)
            h.bias.copy_(bias)
    (want_s, want_r), (got_s, got_r) = _both_precisions(scorer, text, frames, mask)
    assert got_s.dtype == torch.float32 and got_r.dtype == torch.float32
    assert not torch.allclose(got_s, want_s, atol=1e-7)  # the bf16 encoder does contribute
    assert torch.allclose(got_s, want_s, atol=5e-2)
    assert torch.equal(got_r.argmax(dim=1), want_r.argmax(dim=1))


def test_trained_xclip_under_bf16_autocast_equals_fp32():
    model = _model("xclip")
    _perturb(model.scorer, seed=6)
    text = _features(model)
    frames, mask = _videos_for(text, [4, 2, 5], 6, fill=3.0)
    (want_s, want_r), (got_s, got_r) = _both_precisions(model.scorer, text, frames, mask)
    assert got_s.dtype == torch.float32 and got_r.dtype == torch.float32
    assert torch.allclose(got_s, want_s, atol=1e-5, rtol=0)
    assert torch.allclose(got_r, want_r, atol=1e-5, rtol=0)
    assert torch.equal(got_r.argmax(dim=1), want_r.argmax(dim=1))


# ---- 3. X-CLIP sees frame order -------------------------------------------------------
def _reversed_valid(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = frames.clone()
    for b in range(frames.shape[0]):
        idx = mask[b].nonzero().squeeze(1)
        out[b, idx] = frames[b, idx.flip(0)]
    return out


def test_untrained_xclip_is_order_agnostic_clip_similarity():
    model = _model("xclip")
    scorer = model.scorer
    text = _features(model)
    frames, mask = _videos_for(text, [4, 2, 5], 6)
    with torch.no_grad():
        # the temporal residual starts as the exact identity
        assert torch.equal(scorer.temporal(frames, mask), frames)
        scores, relevance = scorer(text, frames, mask)
        reversed_scores, _ = scorer(text, _reversed_valid(frames, mask), mask)
    assert torch.allclose(scores, reversed_scores, atol=1e-6)
    cosines = torch.einsum("btd,bd->bt", frames, text.sentence)
    assert torch.allclose(relevance, masked_softmax(100.0 * cosines, mask), atol=1e-5)


def test_trained_xclip_score_depends_on_frame_order():
    model = _model("xclip")
    _perturb(model.scorer.temporal, seed=7)
    text = _features(model)
    frames, mask = _videos_for(text, [4, 3, 5], 5)
    with torch.no_grad():
        scores, relevance = model.scorer(text, frames, mask)
        reversed_scores, reversed_relevance = model.scorer(text, _reversed_valid(frames, mask), mask)
    assert ((scores - reversed_scores).abs() > 1e-3).all(), (scores - reversed_scores)
    assert torch.isfinite(scores).all() and torch.isfinite(reversed_scores).all()


def test_trained_xclip_padding_is_exact():
    model = _model("xclip")
    _perturb(model.scorer, seed=8)
    text = _features(model)
    zeros, mask = _videos_for(text, [4, 1, 3], 6, fill=0.0)
    garbage = zeros.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), zeros.shape[-1], generator=_gen(9)) * 1e4
    garbage[0, -1, 0] = float("nan")
    # the same videos with the padding in front and in between instead of at the end
    scattered = torch.full_like(zeros, 7.0)
    scattered_mask = torch.zeros_like(mask)
    for b, slots in enumerate(([1, 2, 4, 5], [3], [0, 2, 5])):
        scattered[b, slots] = zeros[b, :len(slots)]
        scattered_mask[b, slots] = True
    with torch.no_grad():
        want_s, want_r = model.scorer(text, zeros, mask)
        got_s, got_r = model.scorer(text, garbage, mask)
        sc_s, sc_r = model.scorer(text, scattered, scattered_mask)
    assert torch.isfinite(want_s).all()
    assert torch.allclose(got_s, want_s, atol=1e-5, rtol=0)
    assert torch.allclose(got_r, want_r, atol=1e-5, rtol=0)
    assert torch.equal(got_r[~mask], torch.zeros(int((~mask).sum())))
    assert torch.allclose(sc_s, want_s, atol=1e-5, rtol=0)
    assert torch.allclose(sc_r[scattered_mask], want_r[mask], atol=1e-5, rtol=0)


def test_trained_xclip_scores_one_frame_videos():
    model = _model("xclip")
    _perturb(model.scorer, seed=10)
    text = _features(model, TEXTS[:2])
    frames, mask = _videos_for(text, [1, 1], 1)
    with torch.no_grad():
        scores, relevance = model.scorer(text, frames, mask)
        alone, alone_rel = model.scorer(text.select(torch.tensor([1])), frames[1:], mask[1:])
        padded, padded_mask = _videos_for(text, [1, 1], 4, fill=5.0)
        in_batch, in_batch_rel = model.scorer(text, padded, padded_mask)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert torch.equal(relevance, torch.ones(2, 1))
    assert torch.allclose(alone[0], scores[1], atol=1e-5)
    assert torch.allclose(in_batch, scores, atol=1e-5)
    assert torch.equal(in_batch_rel, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))


def test_xclip_rejects_more_valid_frames_than_its_position_embeddings():
    model = _model("xclip")
    text = _features(model, TEXTS[:1])
    limit = model.config.scorer.max_frames
    frames = F.normalize(torch.randn(1, limit + 1, 32, generator=_gen(11)), dim=-1)
    with pytest.raises(ValueError, match=f"scorer's max_frames={limit}"):
        model.scorer(text, frames, torch.ones(1, limit + 1, dtype=torch.bool))


def test_xclip_heads_must_divide_the_embedding_width():
    with pytest.raises(ValueError, match="scorer.heads: width 32 is not divisible by 5"):
        build_scorer(ScorerConfig(kind="xclip", layers=1, heads=5, max_frames=8), embed_dim=32, max_text=32)
    scorer = build_scorer(ScorerConfig(kind="xclip", layers=2, heads=4, max_frames=8), embed_dim=32, max_text=32)
    assert len(scorer.temporal.encoder.layers) == 2 and scorer.temporal.max_frames == 8


def test_a_head_based_cross_encoder_starts_as_the_dual_encoder():
    """scorer.base=head: an untrained teacher scores exactly the recall similarity (its heads
    are zero-initialised), so re-ranking can only add what the joint encoder learns."""
    from dataclasses import replace

    from vidsearch.models import build_model, load_model_config

    config = load_model_config("tiny-afa")
    config = replace(config, scorer=replace(config.scorer, base="head"))
    model = build_model(config, device="cpu", seed=3)
    torch.manual_seed(0)
    for param in model.head.parameters():  # a non-trivial head, so head != meanP
        param.data.normal_(0, 0.2)
    frames = torch.randn(3, config.num_frames, model.embed_dim)
    mask = torch.ones(3, config.num_frames, dtype=torch.bool)
    mask[2, 2:] = False
    with torch.no_grad():
        scores, _ = model.score_query("a red circle moves left", frames, mask)
        recall = model.aggregate(frames, mask) @ model.encode_text(["a red circle moves left"])[0]
        meanp_scores, _ = build_model(load_model_config("tiny-afa"), device="cpu", seed=3).score_query(
            "a red circle moves left", frames, mask)
    assert torch.allclose(scores, recall, atol=1e-5), (scores, recall)
    assert not torch.allclose(scores, meanp_scores, atol=1e-3)
