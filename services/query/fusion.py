"""Score fusion and best-moment selection (Thinking Fast and Slow, Miech et al. 2021).

Recall (dual-encoder cosine) and re-rank (cross-encoder) scores live on unrelated
scales, so each is min-max normalised over the candidates of *this* request before
they are mixed: ``final = beta * rerank + (1 - beta) * recall``. Pure numpy, so the
ingress and the tests compute exactly the same thing.
"""
from __future__ import annotations

import numpy as np


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over this request's candidates.

    When every candidate scores the same (including a single candidate), the
    scores carry no ordering information; they all map to 1.0 so a lone match
    still reads as a full match rather than as 0.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    low, high = float(values.min()), float(values.max())
    if not high > low:
        return np.ones_like(values)
    return (values - low) / (high - low)


def fuse(recall: np.ndarray, rerank: np.ndarray | None, beta: float) -> np.ndarray:
    """Fused score per candidate in [0, 1]; recall-only when ``rerank`` is None."""
    recall_norm = minmax(recall)
    if rerank is None:
        return recall_norm
    if len(rerank) != len(recall):
        raise ValueError(f"rerank has {len(rerank)} scores for {len(recall)} candidates")
    return beta * minmax(rerank) + (1.0 - beta) * recall_norm


def rank(fused: np.ndarray) -> np.ndarray:
    """Candidate indices, best first.

    The sort is stable and candidates arrive in recall order, so ties keep the
    recall ranking; beta=0 therefore reproduces recall exactly.
    """
    return np.argsort(-np.asarray(fused, dtype=np.float64), kind="stable")


def frame_text_cosine(text: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Cosine of the (L2-normalised) query with every stored frame: [K, T].

    Used for the best moment when the cross-encoder did not run; the stored frame
    embeddings are already L2-normalised by the encoder, but padding rows are zero,
    so the norm is guarded rather than assumed.
    """
    text = np.asarray(text, dtype=np.float32)
    frames = np.asarray(frames, dtype=np.float32)
    norms = np.linalg.norm(frames, axis=-1)
    dots = frames @ text
    return np.where(norms > 0, dots / np.maximum(norms, 1e-12), 0.0)


def best_frames(relevance: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Index of the most relevant real frame per candidate: [K]. Padding never wins."""
    relevance = np.asarray(relevance, dtype=np.float64)
    masked = np.where(np.asarray(mask, dtype=bool), relevance, -np.inf)
    return np.argmax(masked, axis=1)


def best_moments(relevance: np.ndarray, mask: np.ndarray,
                 timestamps: list[list[float]]) -> list[float]:
    """Timestamp (seconds) of the best frame of each candidate.

    ``timestamps[k]`` are the stored frame times of candidate k, aligned with its
    frame embeddings; a candidate without timestamps gets 0.0.
    """
    result = []
    for k, index in enumerate(best_frames(relevance, mask)):
        times = timestamps[k] if k < len(timestamps) else []
        result.append(float(times[index]) if index < len(times) else 0.0)
    return result
