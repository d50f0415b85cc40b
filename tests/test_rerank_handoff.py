"""The ingress hands the reranker what it already computed with the same version: the
query's token features and the candidates' stored video vectors. Scores must equal
those of a reranker that recomputes both; malformed hand-offs are refused by name.

Uses the shipped model: its cross-encoder is a residual on the head's video vector
(scorer.base=head), so the stored vectors are on the scoring path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsearch.models.persist import PRODUCTION_ALIAS, load_model_version
from vidsearch.models.shipped import shipped_registry
from vidsearch.services.reranker.scoring import RerankRequest, score_requests

QUERIES = ["First a red circle moves left, then a small blue square appears at the top",
           "a green triangle grows"]


@pytest.fixture(scope="module")
def model():
    model, _ = load_model_version(shipped_registry(), "vidsearch", PRODUCTION_ALIAS, device="cpu")
    assert model.config.scorer.base == "head"
    return model


def candidates(model, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random unit frame features with ragged lengths, and the head's video vectors of them."""
    gen = torch.Generator().manual_seed(seed)
    frames = torch.nn.functional.normalize(torch.randn(count, 8, model.embed_dim, generator=gen), dim=-1)
    mask = torch.ones(count, 8, dtype=torch.bool)
    mask[1, 5:] = False
    frames = frames * mask[..., None]
    with torch.inference_mode():
        video = model.aggregate(frames, mask)
    return frames.numpy(), mask.numpy(), video.numpy()


def handed_off(model, query: str, frames, mask, video, version: str = "v") -> RerankRequest:
    with torch.inference_mode():
        [(tokens, vector)] = model.encode_text_features([query]).rows()
    return RerankRequest(query, frames, mask, version, text_tokens=tokens, text_vector=vector, video=video)


def test_handed_off_features_score_exactly_like_recomputed_ones(model):
    batches = [candidates(model, 6, seed=1), candidates(model, 4, seed=2)]
    plain = [RerankRequest(q, f, m, "v") for q, (f, m, _) in zip(QUERIES, batches)]
    full = [handed_off(model, q, f, m, v) for q, (f, m, v) in zip(QUERIES, batches)]
    # Queries of different lengths in one batch: the token padding must not leak.
    assert full[0].text_tokens.shape[0] != full[1].text_tokens.shape[0]
    want = score_requests(model, plain)
    for got in (score_requests(model, full),
                score_requests(model, [full[0], plain[1]])):  # one hand-off, one recompute
        for (scores, relevance), (want_scores, want_relevance) in zip(got, want):
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
            np.testing.assert_allclose(relevance, want_relevance, atol=1e-5)


def test_the_stored_video_vectors_are_what_the_scorer_uses(model):
    """A hand-off is not ignored: other video vectors give other scores."""
    frames, mask, video = candidates(model, 5, seed=3)
    [(right, _)] = score_requests(model, [handed_off(model, QUERIES[0], frames, mask, video)])
    [(wrong, _)] = score_requests(model, [handed_off(model, QUERIES[0], frames, mask, video[::-1].copy())])
    assert np.abs(right - wrong).max() > 1e-3


@pytest.mark.parametrize("change, message", [
    (lambda r: {"text_vector": None}, "text_tokens and text_vector: give both or neither"),
    (lambda r: {"text_tokens": None}, "text_tokens and text_vector: give both or neither"),
    (lambda r: {"text_tokens": r.text_tokens[:, :-1]}, "text_tokens: expected a non-empty [L, "),
    (lambda r: {"text_tokens": r.text_tokens[:0]}, "text_tokens: expected a non-empty [L, "),
    (lambda r: {"text_vector": r.text_vector[:-1]}, "text_vector: expected shape"),
    (lambda r: {"video": r.video[:-1]}, "video: expected shape"),
    (lambda r: {"video": r.video[:, :-1]}, "video: expected shape"),
])
def test_malformed_hand_offs_are_refused_by_name(model, change, message):
    frames, mask, video = candidates(model, 3, seed=4)
    good = handed_off(model, QUERIES[1], frames, mask, video)
    fields = {"text_tokens": good.text_tokens, "text_vector": good.text_vector, "video": good.video, **change(good)}
    with pytest.raises(ValueError) as err:
        RerankRequest(QUERIES[1], frames, mask, "v", **fields)
    assert str(err.value).startswith(message)


def test_the_ingress_encode_gives_the_recall_vector_and_the_tokens(model):
    from vidsearch.services.query.ingress import encode_grouped
    from vidsearch.services.query.live import LiveIndex

    live = LiveIndex(version="v", collection="videos__v", model=model)
    [(tokens, vector), (tokens2, _)] = encode_grouped([(QUERIES[0], live), (QUERIES[1], live)])
    with torch.inference_mode():
        recall = model.encode_text([QUERIES[0]]).numpy()[0]
    np.testing.assert_allclose(vector, recall, atol=1e-6)
    assert tokens.shape[1] == tokens2.shape[1] == model.embed_dim and tokens.shape[0] > tokens2.shape[0]
