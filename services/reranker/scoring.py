"""What travels between the query ingress and the reranker, and the batched scoring.

Kept free of Ray so the tests (and the benchmark) can compute exactly the scores
the deployment returns, in-process, with the same model version.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vidsearch.models import VideoTextModel


@dataclass
class RerankRequest:
    """One query and its recalled candidates' stored frames: one row per segment (the
    best ``serve.rerank_segments`` of each recalled video), scored independently.

    The optional fields carry work the ingress has already done with the same version,
    so the reranker does not redo it: the query's token features (from the encode that
    gave the recall vector) and the candidates' stored ``video`` vectors.
    """

    text: str
    frames: np.ndarray  # float32[K, T, D]: padded per-frame embeddings of K candidates
    mask: np.ndarray  # bool[K, T]: True on real frames
    model_version: str  # the version that built the searched index; scores must use it
    text_tokens: np.ndarray | None = None  # float32[L, D]: the query's real token features
    text_vector: np.ndarray | None = None  # float32[D]: its sentence feature (the recall vector)
    video: np.ndarray | None = None  # float32[K, D]: the candidates' stored video vectors
    regions: np.ndarray | None = None  # float32[K, T, G, W]: their stored region tokens (spatial scorer)

    def __post_init__(self) -> None:
        self.frames = np.asarray(self.frames, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.frames.ndim != 3 or self.frames.shape[0] == 0:
            raise ValueError(f"frames: expected a non-empty [K, T, D] array, got shape {self.frames.shape}")
        if self.mask.shape != self.frames.shape[:2]:
            raise ValueError(f"mask: shape {self.mask.shape} does not match frames {self.frames.shape[:2]}")
        if not self.mask.any(axis=1).all():
            raise ValueError("mask: every candidate needs at least one real frame")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("text: must be a non-empty string")
        count, width = self.frames.shape[0], self.frames.shape[2]
        if (self.text_tokens is None) != (self.text_vector is None):
            raise ValueError("text_tokens and text_vector: give both or neither")
        if self.text_tokens is not None:
            self.text_tokens = np.asarray(self.text_tokens, dtype=np.float32)
            self.text_vector = np.asarray(self.text_vector, dtype=np.float32)
            if self.text_tokens.ndim != 2 or self.text_tokens.shape[0] == 0 or self.text_tokens.shape[1] != width:
                raise ValueError(f"text_tokens: expected a non-empty [L, {width}] array, got shape {self.text_tokens.shape}")
            if self.text_vector.shape != (width,):
                raise ValueError(f"text_vector: expected shape ({width},), got {self.text_vector.shape}")
        if self.video is not None:
            self.video = np.asarray(self.video, dtype=np.float32)
            if self.video.shape != (count, width):
                raise ValueError(f"video: expected shape ({count}, {width}), got {self.video.shape}")
        if self.regions is not None:
            self.regions = np.asarray(self.regions, dtype=np.float32)
            if self.regions.ndim != 4 or self.regions.shape[:2] != self.frames.shape[:2] or 0 in self.regions.shape:
                raise ValueError(f"regions: expected a [K, T, G, W] array with [K, T] = {self.frames.shape[:2]}, "
                                 f"got shape {self.regions.shape}")
            if not np.isfinite(self.regions).all():
                raise ValueError("regions: contains NaN or infinity")

    def text_row(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.text_tokens is None else (self.text_tokens, self.text_vector)


@dataclass
class RerankResult:
    scores: np.ndarray  # float32[K]: cross-encoder score per candidate
    frame_relevance: np.ndarray  # float32[K, T]: per-frame relevance (0 on padding)
    model_version: str
    batch_size: int  # requests scored together in this batch (to observe batching)


def best_segments(scores: np.ndarray, video_rows: list[list[int]]) -> tuple[np.ndarray, list[int]]:
    """A video scores as its best segment: per video (its candidate rows), the highest
    row score and that row. Ties keep the first row (the better recall)."""
    scores = np.asarray(scores, dtype=np.float64)
    best = [rows[int(np.argmax(scores[rows]))] for rows in video_rows]
    return scores[best].astype(np.float32), best


def pad_frames(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length [T_k, D] frame arrays -> (float32[K, T_max, D], bool[K, T_max])."""
    if not frames:
        raise ValueError("pad_frames needs at least one candidate")
    width = frames[0].shape[-1]
    longest = max(f.shape[0] for f in frames)
    out = np.zeros((len(frames), longest, width), dtype=np.float32)
    mask = np.zeros((len(frames), longest), dtype=bool)
    for k, f in enumerate(frames):
        out[k, : f.shape[0]] = f
        mask[k, : f.shape[0]] = True
    return out, mask


def score_requests(model: VideoTextModel, requests: list[RerankRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score several queries' candidates in one forward pass of the slow scorer.

    The scorer takes aligned (text, video) pairs, so requests are flattened into
    pairs: the texts the ingress did not send encoded are encoded once for the whole
    batch, and each request's text features are repeated for its candidates. Frames
    are padded to the longest T in the batch and every result is cut back to its
    request's own T. The stored video vectors are used when every request has them.
    """
    counts = [r.frames.shape[0] for r in requests]
    longest = max(r.frames.shape[1] for r in requests)
    width = requests[0].frames.shape[2]
    frames = np.zeros((sum(counts), longest, width), dtype=np.float32)
    mask = np.zeros((sum(counts), longest), dtype=bool)
    start = 0
    for r in requests:
        k, t = r.frames.shape[:2]
        frames[start:start + k, :t] = r.frames
        mask[start:start + k, :t] = r.mask
        start += k
    video = (np.concatenate([r.video for r in requests]) if all(r.video is not None for r in requests)
             else None)
    regions = None
    if all(r.regions is not None for r in requests):
        shapes = {r.regions.shape[2:] for r in requests}
        if len(shapes) != 1:
            raise ValueError(f"regions: requests of one batch differ in region shape: {sorted(shapes)}")
        regions = np.zeros((sum(counts), longest, *shapes.pop()), dtype=np.float32)
        start = 0
        for r in requests:
            k, t = r.frames.shape[:2]
            regions[start:start + k, :t] = r.regions
            start += k
    with torch.inference_mode():
        text = model.text_features_of([r.text for r in requests], [r.text_row() for r in requests])
        index = torch.repeat_interleave(torch.arange(len(requests), device=model.device),
                                        torch.tensor(counts, device=model.device))
        scores, relevance = model.score_pairs(text.select(index), torch.from_numpy(frames),
                                              torch.from_numpy(mask), video=video,
                                              regions=None if regions is None else torch.from_numpy(regions))
    scores_np = scores.cpu().numpy().astype(np.float32)
    relevance_np = relevance.cpu().numpy().astype(np.float32)
    results, start = [], 0
    for r, k in zip(requests, counts):
        t = r.frames.shape[1]
        results.append((scores_np[start:start + k], relevance_np[start:start + k, :t]))
        start += k
    return results
