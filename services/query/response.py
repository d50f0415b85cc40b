"""Turning recall hits (+ optional rerank scores) into a SearchResponse."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from vidsearch.services.reranker.scoring import pad_frames
from vidsearch.store_schema import Hit
from vidsearch.v1 import search_pb2

from .fusion import best_moments, frame_text_cosine, fuse, rank
from .payloads import PayloadView, fit_response, payload_view


@dataclass
class Candidates:
    """The recalled hits with their frames padded into one array."""

    hits: list[Hit]
    frames: np.ndarray  # float32[K, T, D]
    mask: np.ndarray  # bool[K, T]

    @property
    def recall_scores(self) -> np.ndarray:
        return np.array([h.score for h in self.hits], dtype=np.float64)

    @property
    def timestamps(self) -> list[list[float]]:
        return [list(h.payload.get("frame_timestamps") or []) for h in self.hits]


def build_results(candidates: Candidates, text_vector: np.ndarray, top_k: int, beta: float,
                  rerank_scores: np.ndarray | None,
                  frame_relevance: np.ndarray | None, *, max_payload_bytes: int,
                  max_response_bytes: int) -> list[search_pb2.SearchResult]:
    """Fuse, order and cut to top_k; each result gets its best moment.

    Without rerank scores the best moment comes from the cosine of the query with
    each stored frame; with them, from the cross-encoder's frame relevance.
    Payloads go through :func:`payloads.payload_view` (no credentials, encodable,
    at most ``max_payload_bytes``) and the largest are cut until the results fit
    ``max_response_bytes``: one bad stored point never fails the whole search.
    """
    if not candidates.hits:
        return []
    recall = candidates.recall_scores
    fused = fuse(recall, rerank_scores, beta)
    relevance = frame_relevance if frame_relevance is not None else \
        frame_text_cosine(text_vector, candidates.frames)
    moments = best_moments(relevance, candidates.mask, candidates.timestamps)
    results = []
    for index in rank(fused)[:top_k]:
        hit = candidates.hits[index]
        view = payload_view(hit.video_id, hit.payload, max_payload_bytes)
        results.append(search_pb2.SearchResult(
            video_id=hit.video_id,
            score=float(fused[index]),
            recall_score=float(recall[index]),
            rerank_score=float(rerank_scores[index]) if rerank_scores is not None else 0.0,
            best_moment_seconds=moments[index],
            payload=view.struct, summary=view.summary, payload_notice=view.notice,
        ))
    fit_response(results, [candidates.hits[i].payload for i in rank(fused)[:top_k]], max_response_bytes)
    return results


def video_response(video_id: str, payload: dict[str, Any], index: str,
                   max_bytes: int) -> search_pb2.GetVideoResponse:
    """GetVideo's answer, with the same payload defences as a search result."""
    view: PayloadView = payload_view(video_id, payload, max_bytes)
    return search_pb2.GetVideoResponse(video_id=video_id, payload=view.struct, index=index,
                                       summary=view.summary, payload_notice=view.notice)


def stage_timings(encode_ms: float, recall_ms: float, rerank_ms: float,
                  total_ms: float) -> search_pb2.StageTimings:
    return search_pb2.StageTimings(encode_ms=encode_ms, recall_ms=recall_ms, rerank_ms=rerank_ms,
                                   total_ms=total_ms)


def pad_hits(hits: Sequence[Hit]) -> Candidates:
    """Stack the hits' stored frames ([T_k, D] each) into [K, T_max, D] + mask."""
    hits = list(hits)
    if not hits:
        return Candidates(hits=[], frames=np.zeros((0, 0, 0), np.float32), mask=np.zeros((0, 0), bool))
    missing = [h.video_id for h in hits if h.frames is None or len(h.frames) == 0]
    if missing:
        raise ValueError(f"stored point {missing[0]!r} has no frame embeddings")
    frames, mask = pad_frames([np.asarray(h.frames, dtype=np.float32) for h in hits])
    return Candidates(hits=hits, frames=frames, mask=mask)
