"""Request validation: SearchRequest / GetVideoRequest -> checked parameters.

Pure functions with no Ray or store access, so every rule is tested directly and
the ingress only maps :class:`RequestError` to INVALID_ARGUMENT. Every message
starts with the offending field (``top_k: ...``, ``filters[1].range: ...``) so a
client developer sees what to fix without reading server logs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from vidsearch.config import ServeSettings

from .errors import RequestError
from .filters import filters_from_proto

MAX_TOP_K = 100
MAX_RECALL_K = 1000
MAX_VIDEO_ID_CHARS = 512


@dataclass(frozen=True)
class SearchParams:
    query: str
    top_k: int
    recall_k: int
    rerank: bool
    beta: float
    # Store filter specs (vidsearch.store Match / MatchAny / Range), ANDed.
    filters: tuple[Any, ...] = ()


def validate_search(request: Any, serve: ServeSettings,
                    filter_fields: Mapping[str, str]) -> SearchParams:
    """Check a ``SearchRequest`` and fill in the server defaults."""
    query = _validate_query(request.query, serve.max_query_chars)

    top_k = int(request.top_k) or serve.default_top_k
    if not 1 <= top_k <= MAX_TOP_K:
        raise RequestError("top_k", f"must be between 1 and {MAX_TOP_K} (got {top_k})")

    # An unset recall_k must never make a valid top_k invalid, so the default is
    # raised to top_k when a client asks for more results than the default recalls.
    recall_k = int(request.recall_k) or max(serve.default_recall_k, top_k)
    if not top_k <= recall_k <= MAX_RECALL_K:
        raise RequestError("recall_k", f"must be between top_k ({top_k}) and {MAX_RECALL_K} (got {recall_k})")

    beta = serve.beta
    if request.HasField("beta"):
        beta = float(request.beta)
        if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
            raise RequestError("beta", f"must be between 0 and 1 (got {beta})")

    rerank = bool(request.rerank) if request.HasField("rerank") else True
    filters = filters_from_proto(request.filters, filter_fields)
    return SearchParams(query=query, top_k=top_k, recall_k=recall_k, rerank=rerank,
                        beta=beta, filters=tuple(filters))


def validate_video_id(video_id: str) -> str:
    if not video_id or not video_id.strip():
        raise RequestError("video_id", "must not be empty")
    if len(video_id) > MAX_VIDEO_ID_CHARS:
        raise RequestError("video_id", f"is {len(video_id)} characters, the limit is {MAX_VIDEO_ID_CHARS}")
    return video_id


def _validate_query(query: str, max_chars: int) -> str:
    text = query.strip()
    if not text:
        raise RequestError("query", "must not be empty or blank")
    # The limit applies to what the client sent: padding a long query with
    # whitespace must not be a way around it, nor should trimming hide it.
    if len(query) > max_chars:
        raise RequestError("query", f"is {len(query)} characters, the limit is {max_chars}")
    return text

