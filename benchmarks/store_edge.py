"""A benchmark-only adapter: the store operations the store benchmark times, on qdrant-edge.

qdrant-edge (PyPI ``qdrant-edge-py``, import ``qdrant_edge``) is Qdrant's in-process
engine: one *shard* per directory, with HNSW, named vectors, multivectors and payload
filters, and no server. :class:`EdgeStore` has the same method names, arguments and
results as ``vidsearch.store.QdrantStore`` for the operations measured here
(ensure_collection, upsert, trim_segments, query, get, count, close), so the benchmark
drives both
engines through the same ``VectorStore`` front. It is not a product backend: what it
leaves out, and what qdrant-edge lacks for one, is written down in :data:`GAPS` (and in
docs/benchmarks/store.md).

Mapping: a collection is a shard directory ``<root>/<collection>``; the layout copies
``QdrantStore.ensure_collection`` (``video`` cosine with HNSW, ``frames`` cosine
multivector MAX_SIM with ``m=0``, so no graph is built for vectors that are only read
back); filters are validated and built by the project's own ``FilterSchema`` and then
translated; the point id is the project's ``point_id``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from vidsearch import store as _store
from vidsearch.config import StoreSettings
from vidsearch.store import StoreError
from vidsearch.store_schema import (
    FRAMES_VECTOR, VIDEO_VECTOR, FilterSchema, FilterSpec, Hit, StoredVideo, VideoPoint, as_vector, point_id,
    rfc3339,
)

# What a product backend on qdrant-edge 0.9 would have to add itself (checked against the
# package's type stubs and by calling it; see docs/benchmarks/store.md).
GAPS: dict[str, str] = {
    "named vectors": "supported (EdgeConfig(vectors={name: EdgeVectorParams}))",
    "multivector MAX_SIM": "supported (MultiVectorConfig(MultiVectorComparator.MaxSim))",
    "payload filters": "supported (Filter/FieldCondition with MatchValue, MatchAny, RangeFloat, RangeDateTime) "
                       "and payload indexes (UpdateOperation.create_field_index)",
    "collections": "missing: an EdgeShard is one directory holding one collection; a backend keeps one "
                   "shard per collection itself",
    "aliases": "missing: no alias API, so no atomic alias switch; a backend would keep the alias -> "
               "collection map itself (one actor process, an os.replace'd file)",
    "group-by": "missing: no query_groups; grouping segments by video_id would be an over-fetch plus a "
                "de-duplication in Python, without Qdrant's guarantee of `limit` distinct groups",
    "index building": "not in the background: optimize() builds HNSW segments in the calling thread, "
                      "blocking; a backend must schedule it after writes",
    "one process": "the shard's WAL takes an exclusive lock (a second EdgeShard.load of the same path "
                   "fails with WouldBlock), so the one-actor design stays",
}


def _edge() -> Any:
    try:
        import qdrant_edge
    except ImportError as exc:
        raise ImportError("qdrant-edge-py is not installed: .venv/bin/pip install -e '.[bench]' "
                          "(or .venv/bin/pip install qdrant-edge-py)") from exc
    return qdrant_edge


def edge_version() -> str | None:
    """The installed qdrant-edge-py version, or None when it is missing."""
    from importlib import metadata

    try:
        return metadata.version("qdrant-edge-py")
    except metadata.PackageNotFoundError:
        return None


def _translate_filter(qe: Any, qdrant_filter: Any) -> Any:
    """A qdrant_client ``models.Filter`` (built by FilterSchema.to_qdrant) as a qdrant_edge Filter."""
    if qdrant_filter is None:
        return None
    conditions = []
    for cond in qdrant_filter.must or []:
        match, rng = cond.match, cond.range
        if match is not None and hasattr(match, "any"):
            conditions.append(qe.FieldCondition(key=cond.key, match=qe.MatchAny(list(match.any))))
        elif match is not None:
            conditions.append(qe.FieldCondition(key=cond.key, match=qe.MatchValue(match.value)))
        elif rng is not None:
            bounds = {op: getattr(rng, op) for op in ("gte", "gt", "lte", "lt") if getattr(rng, op) is not None}
            if any(isinstance(v, datetime) for v in bounds.values()):
                conditions.append(qe.FieldCondition(key=cond.key, range=qe.RangeDateTime(
                    **{op: rfc3339(v) for op, v in bounds.items()})))
            else:
                conditions.append(qe.FieldCondition(key=cond.key, range=qe.RangeFloat(
                    **{op: float(v) for op, v in bounds.items()})))
        else:
            raise StoreError(f"filter condition on {cond.key!r} has no edge translation")
    return qe.Filter(must=conditions)


def _frames(vector: Any) -> np.ndarray | None:
    frames = vector.get(FRAMES_VECTOR) if isinstance(vector, dict) else None
    return None if frames is None else np.asarray(frames, dtype=np.float32)


class EdgeStore:
    """The measured subset of ``QdrantStore`` on qdrant-edge shards under ``root``."""

    def __init__(self, root: str, settings: StoreSettings, hnsw_ef: int | None = None) -> None:
        self.qe = _edge()
        # Search-time HNSW beam width (None: the engine's default); exact=True searches by
        # brute force. The benchmark sets these to measure accuracy against cost.
        self.hnsw_ef = hnsw_ef
        self.exact = False
        self.root = root
        self.settings = settings
        self.schema = FilterSchema(settings.filter_fields)
        self.shards: dict[str, Any] = {}
        os.makedirs(root, exist_ok=True)

    def _shard(self, name: str) -> Any:
        shard = self.shards.get(name)
        if shard is None:
            path = os.path.join(self.root, name)
            if not os.path.isdir(path):
                from vidsearch.store import CollectionNotFound

                raise CollectionNotFound(f"collection or alias {name!r} not found")
            shard = self.shards[name] = self.qe.EdgeShard.load(path)
        return shard

    def ensure_collection(self, name: str, dim: int, frame_dim: int) -> bool:
        qe = self.qe
        path = os.path.join(self.root, name)
        if os.path.isdir(path):
            self._shard(name)
            return False
        config = qe.EdgeConfig(vectors={
            VIDEO_VECTOR: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine),
            FRAMES_VECTOR: qe.EdgeVectorParams(
                size=frame_dim, distance=qe.Distance.Cosine,
                multivector_config=qe.MultiVectorConfig(qe.MultiVectorComparator.MaxSim),
                # As in QdrantStore: frames are read back for re-ranking, never searched.
                hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10000)),
        })
        shard = self.shards[name] = qe.EdgeShard.create(path, config)
        kinds = {"keyword": qe.PayloadSchemaType.Keyword, "integer": qe.PayloadSchemaType.Integer,
                 "float": qe.PayloadSchemaType.Float, "datetime": qe.PayloadSchemaType.Datetime,
                 "bool": qe.PayloadSchemaType.Bool}
        # The indexes QdrantStore creates: its own (video_id, segment) and store.filter_fields'.
        internal = getattr(_store, "_INTERNAL_INDEXES", {})
        for field_path, kind in {**internal, **self.schema.index_schemas()}.items():
            shard.update(qe.UpdateOperation.create_field_index(field_path, kinds[kind]))
        return True

    def upsert(self, collection: str, points: Sequence[VideoPoint]) -> int:
        qe = self.qe
        structs = [qe.Point(point_id(p.video_id, p.segment) if hasattr(p, "segment") else point_id(p.video_id),
                            {VIDEO_VECTOR: p.video_vector.tolist(), FRAMES_VECTOR: p.frames.tolist()},
                            {**p.payload, "video_id": p.video_id}) for p in points]
        if structs:
            self._shard(collection).update(qe.UpdateOperation.upsert_points(structs))
        return len(structs)

    def trim_segments(self, collection: str, counts: dict[str, int]) -> None:
        """As QdrantStore.trim_segments: drop segments >= counts[video_id], in one request."""
        qe = self.qe
        if not counts:
            return
        stale = [qe.Filter(must=[qe.FieldCondition(key="video_id", match=qe.MatchValue(video_id)),
                                 qe.FieldCondition(key="segment", range=qe.RangeFloat(gte=float(count)))])
                 for video_id, count in counts.items()]
        self._shard(collection).update(qe.UpdateOperation.delete_points_by_filter(qe.Filter(should=stale)))

    def query(self, collection: str, vector: Any, limit: int, filters: Sequence[FilterSpec] | None = None,
              with_frames: bool = False) -> list[Hit]:
        qe = self.qe
        query = as_vector("query vector", vector, 1)
        request = qe.QueryRequest(
            limit=int(limit), query=qe.Query.Nearest(query.tolist(), using=VIDEO_VECTOR),
            filter=_translate_filter(qe, self.schema.to_qdrant(filters)), with_payload=True,
            with_vector=[FRAMES_VECTOR] if with_frames else False,
            params=qe.SearchParams(hnsw_ef=self.hnsw_ef, exact=self.exact)
            if self.hnsw_ef is not None or self.exact else None)
        points = self._shard(collection).query(request)
        return [Hit(video_id=(p.payload or {}).get("video_id", str(p.id)), score=float(p.score),
                    payload=p.payload or {}, frames=_frames(p.vector) if with_frames else None) for p in points]

    def get(self, collection: str, video_ids: Sequence[str], with_vectors: bool = False) -> list[StoredVideo]:
        records = self._shard(collection).retrieve(
            [point_id(v) for v in video_ids], with_payload=True,
            with_vector=[VIDEO_VECTOR, FRAMES_VECTOR] if with_vectors else False)
        out = []
        for r in records:
            video = r.vector.get(VIDEO_VECTOR) if with_vectors and isinstance(r.vector, dict) else None
            out.append(StoredVideo(video_id=(r.payload or {}).get("video_id", str(r.id)), payload=r.payload or {},
                                   video_vector=None if video is None else np.asarray(video, dtype=np.float32),
                                   frames=_frames(r.vector) if with_vectors else None))
        return out

    def count(self, collection: str) -> int:
        return int(self._shard(collection).count(self.qe.CountRequest(exact=True)))

    def optimize(self, collection: str) -> bool:
        """Build the HNSW segments now (qdrant-edge has no background optimizer)."""
        return bool(self._shard(collection).optimize())

    def flush(self) -> None:
        for shard in self.shards.values():
            shard.flush()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        for shard in self.shards.values():
            shard.close()
        self.shards.clear()
