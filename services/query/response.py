"""Turning recall hits (+ optional rerank scores) into a SearchResponse."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from vidsearch.services.reranker.scoring import best_segments, pad_frames
from vidsearch.store_schema import Hit, segment_span
from vidsearch.v1 import search_pb2

from .fusion import best_moments, frame_text_cosine, fuse, rank
from .payloads import PayloadView, fit_response, payload_view


@dataclass
class Candidates:
    """The recalled segments (rows) with their frames padded into one array.

    ``groups[r]`` is the video of row r; a video's rows are consecutive, best recall
    first (what the store's group-by returns). None: every row is its own video.
    """

    hits: list[Hit]
    frames: np.ndarray  # float32[K, T, D]
    mask: np.ndarray  # bool[K, T]
    groups: list[int] | None = None
    video: np.ndarray | None = None  # float32[K, D]: stored video vectors, when every row has one
    regions: np.ndarray | None = None  # float32[K, T, G, W]: stored region tokens, when every row has them

    def video_rows(self) -> list[list[int]]:
        """Per video, in recall order: its rows."""
        if self.groups is None:
            return [[row] for row in range(len(self.hits))]
        rows: dict[int, list[int]] = {}
        for row, video in enumerate(self.groups):
            rows.setdefault(video, []).append(row)
        return list(rows.values())

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
    """Fuse per video, order and cut to top_k; each result gets its best segment and
    best moment.

    A video's recall score is its best segment's (the group-by order). Re-ranked, its
    rerank score is its best segment's by the cross-encoder and that segment is the
    one returned; otherwise the best segment by recall is. The best moment is the best
    frame inside the returned segment: without rerank scores by the cosine of the
    query with each stored frame, with them by the cross-encoder's frame relevance.
    Payloads go through :func:`payloads.payload_view` (no credentials, encodable,
    at most ``max_payload_bytes``) and the largest are cut until the results fit
    ``max_response_bytes``: one bad stored point never fails the whole search.
    """
    if not candidates.hits:
        return []
    rows_of = candidates.video_rows()
    recall = candidates.recall_scores[[rows[0] for rows in rows_of]]
    if rerank_scores is None:
        rerank, best_row = None, [rows[0] for rows in rows_of]
    else:
        rerank, best_row = best_segments(rerank_scores, rows_of)
    fused = fuse(recall, rerank, beta)
    relevance = frame_relevance if frame_relevance is not None else \
        frame_text_cosine(text_vector, candidates.frames)
    moments = best_moments(relevance, candidates.mask, candidates.timestamps)
    results, payloads = [], []
    for index in rank(fused)[:top_k]:
        row = best_row[index]
        hit = candidates.hits[row]
        span = segment_span(hit.payload)
        view = payload_view(hit.video_id, hit.payload, max_payload_bytes)
        results.append(search_pb2.SearchResult(
            video_id=hit.video_id,
            score=float(fused[index]),
            recall_score=float(recall[index]),
            rerank_score=float(rerank[index]) if rerank is not None else 0.0,
            best_moment_seconds=moments[row],
            payload=view.struct, summary=view.summary, payload_notice=view.notice,
            segment_start_s=span.start_s, segment_end_s=span.end_s, segment=span.segment,
            segment_count=span.segment_count,
        ))
        payloads.append(hit.payload)
    fit_response(results, payloads, max_response_bytes)
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


def pad_groups(groups: Sequence[Sequence[Hit]]) -> Candidates:
    """The store's per-video groups of segment hits as candidate rows (see Candidates)."""
    rows = [(video, hit) for video, group in enumerate(groups) for hit in group]
    candidates = pad_hits([hit for _, hit in rows])
    candidates.groups = [video for video, _ in rows]
    return candidates


def pad_hits(hits: Sequence[Hit]) -> Candidates:
    """Stack the hits' stored frames ([T_k, D] each) into [K, T_max, D] + mask."""
    hits = list(hits)
    if not hits:
        return Candidates(hits=[], frames=np.zeros((0, 0, 0), np.float32), mask=np.zeros((0, 0), bool))
    missing = [h.video_id for h in hits if h.frames is None or len(h.frames) == 0]
    if missing:
        raise ValueError(f"stored point {missing[0]!r} has no frame embeddings")
    frames, mask = pad_frames([np.asarray(h.frames, dtype=np.float32) for h in hits])
    video = (np.stack([np.asarray(h.video, dtype=np.float32) for h in hits])
             if all(h.video is not None for h in hits) else None)
    regions = None
    if all(h.regions is not None for h in hits) and len({h.regions.shape[1:] for h in hits}) == 1:
        regions = np.zeros((*frames.shape[:2], *hits[0].regions.shape[1:]), dtype=np.float32)
        for k, hit in enumerate(hits):
            regions[k, :hit.regions.shape[0]] = hit.regions
    return Candidates(hits=hits, frames=frames, mask=mask, video=video, regions=regions)
