"""The vector store: one API over a Qdrant server or the embedded local-mode store.

All Qdrant logic lives in :class:`QdrantStore`. :class:`VectorStore` is what
callers use; it forwards each operation to a backend:

- server mode (``store.url`` set): a QdrantStore over ``QdrantClient(url=...)``,
  called in-process;
- embedded mode: qdrant-client local mode takes an exclusive file lock, so exactly
  one process may open the directory. One named, detached Ray actor owns
  ``QdrantClient(path=...)`` (wrapping the same QdrantStore) and every process
  reaches it through the actor.

Callers can't tell the modes apart: same methods, same results, same exceptions.
:class:`StoreUnavailable` is the transient error (server down, actor dead, timeout)
that the ingest worker retries on; the embedded backend re-acquires (or re-creates)
the actor on the next call after one died.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from .config import Settings, StoreSettings
from .store_schema import (
    ALIAS,
    FRAMES_VECTOR,
    REGION_CODEC_FIELD,
    REGIONS_VECTOR,
    VIDEO_VECTOR,
    FilterError,
    FilterSchema,
    FilterSpec,
    Hit,
    Match,
    MatchAny,
    Range,
    StoredVideo,
    VideoPoint,
    as_vector,
    build_payload,
    collection_name,
    decode_regions,
    encode_regions,
    model_version_of,
    point_id,
)

# Payload indexes the store itself relies on, whatever store.filter_fields says:
# delete and re-ingest select a video's segments by video_id, trimming by segment.
_INTERNAL_INDEXES = {"video_id": "keyword", "segment": "integer"}
from .telemetry import log_event

__all__ = [
    "ALIAS", "CollectionNotFound", "FilterError", "Hit", "Match", "MatchAny", "QdrantStore", "Range",
    "StoreError", "StoreUnavailable", "StoredVideo", "VectorStore", "VideoPoint", "build_payload",
    "collection_name", "model_version_of", "open_store", "point_id", "shutdown_embedded_store",
]

log = logging.getLogger(__name__)

RAY_NAMESPACE = "vidsearch"
MAX_QUERY_LIMIT = 10_000
# HTTP statuses worth retrying: the server is overloaded, restarting or timed out.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Opening an embedded store loads every point into memory (12 s for 5,000 ViT-B/32
# videos on 2 cores), so the first call waits this long for the actor to open, and
# store.timeout_s applies to each call after that.
EMBEDDED_OPEN_TIMEOUT_S = 600.0


class StoreError(RuntimeError):
    """A store request failed; retrying the same request will not help."""


class StoreUnavailable(StoreError):
    """The store can't be reached right now (transient: retry with backoff)."""


class CollectionNotFound(StoreError):
    """The collection or alias does not exist (e.g. nothing indexed yet)."""


@contextlib.contextmanager
def _translated(target: str) -> Iterator[None]:
    """Map qdrant-client's errors (server and local mode differ) onto ours."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    try:
        yield
    except (StoreError, FilterError):
        raise
    except UnexpectedResponse as exc:
        detail = exc.content[:300].decode("utf-8", "replace")
        if exc.status_code == 404:
            raise CollectionNotFound(f"collection or alias {target!r} not found") from exc
        if exc.status_code in _TRANSIENT_STATUS or (exc.status_code or 0) >= 500:
            raise StoreUnavailable(f"qdrant answered {exc.status_code} on {target!r}: {detail}") from exc
        raise StoreError(f"qdrant rejected a request on {target!r} ({exc.status_code}): {detail}") from exc
    except (ResponseHandlingException, ConnectionError, TimeoutError, OSError) as exc:
        cause = getattr(exc, "source", exc)
        raise StoreUnavailable(f"qdrant unreachable ({target!r}): {type(cause).__name__}: {cause}") from exc
    except ValueError as exc:
        # Local mode reports a missing collection and a bad request as ValueError.
        if "not found" in str(exc):
            raise CollectionNotFound(f"collection or alias {target!r} not found") from exc
        raise StoreError(f"qdrant rejected a request on {target!r}: {exc}") from exc
    except RuntimeError as exc:
        # Local mode after close(): the store is going away, which a retry outlives.
        raise StoreUnavailable(f"qdrant store closed ({target!r}): {exc}") from exc


def _positive_int(name: str, value: object, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value}")
    return int(value)


def _video_ids(video_ids: Iterable[str]) -> list[str]:
    if isinstance(video_ids, str):
        raise TypeError("video_ids must be a list of ids, not one string")
    ids = list(dict.fromkeys(video_ids))
    bad = [v for v in ids if not isinstance(v, str)]
    if bad:
        raise TypeError(f"video ids must be strings, got {type(bad[0]).__name__}")
    return ids


def _frames_of(vector: Any) -> np.ndarray | None:
    frames = vector.get(FRAMES_VECTOR) if isinstance(vector, dict) else None
    return None if frames is None else np.asarray(frames, dtype=np.float32)


def _video_of(vector: Any) -> np.ndarray | None:
    video = vector.get(VIDEO_VECTOR) if isinstance(vector, dict) else None
    return None if video is None else np.asarray(video, dtype=np.float32)


def _regions_of(vector: Any, payload: dict[str, Any], frames: np.ndarray | None) -> np.ndarray | None:
    rows = vector.get(REGIONS_VECTOR) if isinstance(vector, dict) else None
    if rows is None or frames is None:
        return None
    return decode_regions(rows, frames.shape[0], str(payload.get(REGION_CODEC_FIELD, "float32")))


def _hit(point: Any, video_id: str, with_frames: bool) -> Hit:
    payload = point.payload or {}
    frames = _frames_of(point.vector) if with_frames else None
    return Hit(video_id=payload.get("video_id", video_id), score=float(point.score),
               payload=payload, frames=frames, video=_video_of(point.vector) if with_frames else None,
               regions=_regions_of(point.vector, payload, frames) if with_frames else None)


def _stored(record: Any, with_vectors: bool) -> StoredVideo:
    payload = record.payload or {}
    frames = _frames_of(record.vector) if with_vectors else None
    return StoredVideo(
        video_id=payload.get("video_id", str(record.id)),
        payload=payload,
        video_vector=_video_of(record.vector) if with_vectors else None,
        frames=frames,
        regions=_regions_of(record.vector, payload, frames) if with_vectors else None,
    )


class QdrantStore:
    """Every Qdrant operation of the store, over any ``QdrantClient``.

    Used directly in server mode and inside the embedded actor. Each method is one
    small request (an upsert is one batch: :class:`VectorStore` does the batching,
    so that no single actor call grows without bound).
    """

    def __init__(self, client: Any, settings: StoreSettings) -> None:
        self.client = client
        self.settings = settings
        self.schema = FilterSchema(settings.filter_fields)
        self._stats = {"upsert_requests": 0, "points_written": 0, "delete_requests": 0, "queries": 0}

    # ------------------------------------------------------------------ collections
    def ensure_collection(self, name: str, dim: int, frame_dim: int, region_dim: int | None = None) -> bool:
        """Create the collection and its payload indexes if missing; True if created.

        ``region_dim``: also a ``regions`` multivector of that width (for a model whose
        scorer reads region tokens). An existing collection must have the same layout
        (else StoreError): silently writing 512-d vectors into a 256-d index would fail on
        every upsert later, and a spatial re-ranker needs the regions it was built for.
        """
        from qdrant_client import models

        dim, frame_dim = _positive_int("dim", dim), _positive_int("frame_dim", frame_dim)
        if region_dim is not None:
            region_dim = _positive_int("region_dim", region_dim)
        created = False
        extra = {} if region_dim is None else {REGIONS_VECTOR: self._regions_params(region_dim)}
        with _translated(name):
            if not self.client.collection_exists(name):
                try:
                    self.client.create_collection(name, vectors_config={**extra, 
                        VIDEO_VECTOR: models.VectorParams(size=dim, distance=models.Distance.COSINE),
                        FRAMES_VECTOR: models.VectorParams(
                            size=frame_dim, distance=models.Distance.COSINE,
                            multivector_config=models.MultiVectorConfig(
                                comparator=models.MultiVectorComparator.MAX_SIM),
                            # Frames are only read back for re-ranking, never searched:
                            # m=0 skips building an HNSW graph for them on a server.
                            hnsw_config=models.HnswConfigDiff(m=0)),
                    })
                    created = True
                except Exception as exc:  # noqa: BLE001 - a concurrent creator won the race
                    if "already exists" not in str(exc):
                        raise
            info = self.client.get_collection(name)
        self._check_layout(name, info, dim, frame_dim, region_dim)
        self._ensure_indexes(name, info)
        if created:
            log_event(log, "collection created", collection=name, dim=dim, frame_dim=frame_dim,
                      region_dim=region_dim, region_dtype=self.settings.region_dtype if region_dim else None)
        return created

    def _regions_params(self, region_dim: int) -> Any:
        from qdrant_client import models

        datatype = {"uint8": models.Datatype.UINT8, "float16": models.Datatype.FLOAT16,
                    "float32": models.Datatype.FLOAT32}[self.settings.region_dtype]
        # Read back only for the top-K, never searched: no HNSW graph, the compact datatype.
        return models.VectorParams(size=region_dim, distance=models.Distance.DOT, datatype=datatype,
                                   multivector_config=models.MultiVectorConfig(
                                       comparator=models.MultiVectorComparator.MAX_SIM),
                                   hnsw_config=models.HnswConfigDiff(m=0))

    @staticmethod
    def _check_layout(name: str, info: Any, dim: int, frame_dim: int, region_dim: int | None = None) -> None:
        vectors = info.config.params.vectors
        video = vectors.get(VIDEO_VECTOR) if isinstance(vectors, dict) else None
        frames = vectors.get(FRAMES_VECTOR) if isinstance(vectors, dict) else None
        have = (getattr(video, "size", None), getattr(frames, "size", None),
                getattr(getattr(frames, "multivector_config", None), "comparator", None))
        if have[0] != dim or have[1] != frame_dim or have[2] is None:
            raise StoreError(f"collection {name!r} exists with another layout (video dim {have[0]}, "
                             f"frames dim {have[1]}, multivector {have[2] is not None}); "
                             f"wanted video dim {dim}, frames dim {frame_dim}")
        if region_dim is not None:
            regions = vectors.get(REGIONS_VECTOR) if isinstance(vectors, dict) else None
            if getattr(regions, "size", None) != region_dim:
                raise StoreError(f"collection {name!r} has no {region_dim}-d region tokens (found "
                                 f"{getattr(regions, 'size', None)}); the model's re-ranker reads them: "
                                 f"re-index with 'vidsearch reindex' into a new collection")

    def _ensure_indexes(self, name: str, info: Any) -> None:
        from qdrant_client import models

        existing = info.payload_schema or {}
        for path, kind in {**_INTERNAL_INDEXES, **self.schema.index_schemas()}.items():
            current = existing.get(path)
            if current is not None and getattr(current.data_type, "value", current.data_type) == kind:
                continue
            with _translated(name), warnings.catch_warnings():
                # Local mode warns that indexes are no-ops there; they matter on a server.
                warnings.filterwarnings("ignore", message="Payload indexes have no effect")
                self.client.create_payload_index(name, path, field_schema=models.PayloadSchemaType(kind))

    def list_collections(self) -> list[str]:
        with _translated("<collections>"):
            return sorted(c.name for c in self.client.get_collections().collections)

    def delete_collection(self, name: str, force: bool = False) -> bool:
        """Drop a collection; refuses the one an alias serves unless ``force``."""
        with _translated(name):
            if not self.client.collection_exists(name):
                return False
            serving = [a.alias_name for a in self.client.get_aliases().aliases if a.collection_name == name]
            if serving and not force:
                raise StoreError(f"collection {name!r} is live behind alias {serving[0]!r}; "
                                 "switch the alias first")
            return bool(self.client.delete_collection(name))

    # ------------------------------------------------------------------ aliases
    def resolve_alias(self, alias: str) -> str | None:
        with _translated(alias):
            for entry in self.client.get_aliases().aliases:
                if entry.alias_name == alias:
                    return entry.collection_name
        return None

    def set_alias(self, collection: str, alias: str) -> str | None:
        """Point ``alias`` at ``collection``; return the collection it pointed at before.

        Delete and create go in one update_collection_aliases call, which Qdrant
        applies atomically: a reader sees the old or the new collection, never none.
        """
        from qdrant_client import models

        with _translated(collection):
            if not self.client.collection_exists(collection):
                raise CollectionNotFound(f"collection {collection!r} not found")
            previous = self.resolve_alias(alias)
            ops: list[Any] = []
            if previous is not None:
                ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            ops.append(models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
            self.client.update_collection_aliases(change_aliases_operations=ops)
        log_event(log, "alias switched", alias=alias, collection=collection, previous=previous)
        return previous

    # ------------------------------------------------------------------ points
    def upsert(self, collection: str, points: Sequence[VideoPoint]) -> int:
        """Write one batch and wait until it is stored (wait=True)."""
        from qdrant_client import models

        structs = []
        for point in points:
            if not isinstance(point, VideoPoint):
                raise TypeError(f"expected VideoPoint, got {type(point).__name__}")
            vector = {VIDEO_VECTOR: point.video_vector.tolist(), FRAMES_VECTOR: point.frames.tolist()}
            payload = {**point.payload, "video_id": point.video_id}
            if point.regions is not None:
                vector[REGIONS_VECTOR] = encode_regions(point.regions, self.settings.region_dtype).tolist()
                payload[REGION_CODEC_FIELD] = self.settings.region_dtype
            # video_id is what reads map back from; it's always in the payload.
            structs.append(models.PointStruct(id=point_id(point.video_id, point.segment), vector=vector,
                                              payload=payload))
        if not structs:
            return 0
        with _translated(collection):
            self.client.upsert(collection, points=structs, wait=True)
        self._stats["upsert_requests"] += 1
        self._stats["points_written"] += len(structs)
        return len(structs)

    def delete(self, collection: str, video_ids: Iterable[str]) -> int:
        """Remove every point (all segments) of each video, selected by the ``video_id``
        payload field rather than by point ids: a segment count is not needed."""
        from qdrant_client import models

        ids = _video_ids(video_ids)
        if not ids:
            return 0
        selector = models.FilterSelector(filter=models.Filter(must=[
            models.FieldCondition(key="video_id", match=models.MatchAny(any=ids))]))
        with _translated(collection):
            self.client.delete(collection, points_selector=selector, wait=True)
        self._stats["delete_requests"] += 1
        return len(ids)

    def trim_segments(self, collection: str, counts: dict[str, int]) -> None:
        """Remove segments ``>= counts[video_id]`` of each video: what an earlier, longer
        version of it left behind. One request for all the videos."""
        from qdrant_client import models

        if not counts:
            return
        # A video's segments are always numbered 0..n-1, so a stale tail exists exactly
        # when segment ``count`` does. Looking that up by id is one cheap retrieve; a
        # delete by filter is checked against every point in local mode (brute force).
        probe = {point_id(video_id, int(count)): video_id for video_id, count in counts.items()}
        with _translated(collection):
            found = self.client.retrieve(collection, ids=list(probe), with_payload=False, with_vectors=False)
        longer = {probe[str(r.id)] for r in found}
        if not longer:
            return
        stale = [models.Filter(must=[
            models.FieldCondition(key="video_id", match=models.MatchValue(value=video_id)),
            models.FieldCondition(key="segment", range=models.Range(gte=int(counts[video_id])))])
            for video_id in sorted(longer)]
        with _translated(collection):
            self.client.delete(collection, points_selector=models.FilterSelector(filter=models.Filter(should=stale)),
                               wait=True)
        self._stats["delete_requests"] += 1

    # Reads that want vectors ask for every named vector a collection has (with_vectors=True):
    # region tokens come along where a collection stores them, and nothing changes elsewhere.
    def get(self, collection: str, video_ids: Iterable[str], with_vectors: bool = False) -> list[StoredVideo]:
        """The stored videos among ``video_ids``, in the order asked; missing ones are left out."""
        ids = [point_id(v) for v in _video_ids(video_ids)]
        if not ids:
            return []
        with _translated(collection):
            records = self.client.retrieve(collection, ids=ids, with_payload=True,
                                           with_vectors=bool(with_vectors))
        by_id = {str(r.id): r for r in records}
        return [_stored(by_id[i], with_vectors) for i in ids if i in by_id]

    def get_segments(self, collection: str, video_ids: Iterable[str],
                     with_vectors: bool = False) -> list[StoredVideo]:
        """Every stored segment of ``video_ids``: by video in the order asked, then by segment."""
        from qdrant_client import models

        ids = _video_ids(video_ids)
        if not ids:
            return []
        wanted = models.Filter(must=[models.FieldCondition(key="video_id", match=models.MatchAny(any=ids))])
        records, offset = [], None
        with _translated(collection):
            while True:
                page, offset = self.client.scroll(
                    collection, scroll_filter=wanted, limit=MAX_QUERY_LIMIT, offset=offset, with_payload=True,
                    with_vectors=bool(with_vectors))
                records.extend(page)
                if offset is None:
                    break
        order = {v: i for i, v in enumerate(ids)}
        stored = [_stored(r, with_vectors) for r in records]
        return sorted(stored, key=lambda v: (order.get(v.video_id, len(order)), int(v.payload.get("segment", 0))))

    def query(self, collection: str, vector: Any, limit: int, filters: Sequence[FilterSpec] | None = None,
              with_frames: bool = False) -> list[Hit]:
        """Nearest videos by the ``video`` vector (cosine), filtered, best first."""
        query = as_vector("query vector", vector, 1)
        limit = _positive_int("limit", limit, MAX_QUERY_LIMIT)
        query_filter = self.schema.to_qdrant(filters)
        with _translated(collection):
            response = self.client.query_points(
                collection, query=query.tolist(), using=VIDEO_VECTOR, limit=limit, query_filter=query_filter,
                with_payload=True, with_vectors=bool(with_frames))
        self._stats["queries"] += 1
        return [_hit(p, str(p.id), with_frames) for p in response.points]

    def query_groups(self, collection: str, vector: Any, limit: int, group_size: int,
                     filters: Sequence[FilterSpec] | None = None, with_frames: bool = False) -> list[list[Hit]]:
        """Nearest videos by the ``video`` vector, one group per video: up to ``limit``
        videos, best first, each with its best ``group_size`` segments, best first.

        Qdrant's group-by on ``video_id`` does it in the store, on a server and in
        local mode alike (qdrant-client 1.20 implements query_points_groups there too).
        """
        query = as_vector("query vector", vector, 1)
        limit = _positive_int("limit", limit, MAX_QUERY_LIMIT)
        group_size = _positive_int("group_size", group_size, MAX_QUERY_LIMIT)
        query_filter = self.schema.to_qdrant(filters)
        with _translated(collection):
            response = self.client.query_points_groups(
                collection, group_by="video_id", query=query.tolist(), using=VIDEO_VECTOR, limit=limit,
                group_size=group_size, query_filter=query_filter, with_payload=True,
                with_vectors=bool(with_frames))
        self._stats["queries"] += 1
        return [[_hit(p, str(group.id), with_frames) for p in group.hits] for group in response.groups if group.hits]

    def count(self, collection: str) -> int:
        with _translated(collection):
            return int(self.client.count(collection, exact=True).count)

    def scroll_page(self, collection: str, batch_size: int, offset: Any = None,
                    with_vectors: bool = False) -> tuple[list[StoredVideo], Any]:
        """One page of a full scan and the offset of the next (None at the end)."""
        batch_size = _positive_int("batch_size", batch_size, MAX_QUERY_LIMIT)
        with _translated(collection):
            records, next_offset = self.client.scroll(
                collection, limit=batch_size, offset=offset, with_payload=True,
                with_vectors=bool(with_vectors))
        return [_stored(r, with_vectors) for r in records], next_offset

    # ------------------------------------------------------------------ lifecycle
    def healthy(self) -> bool:
        try:
            with _translated("<health>"):
                self.client.get_collections()
            return True
        except StoreError:
            return False

    def stats(self) -> dict[str, int]:
        """Request counters since this store was opened (for metrics and tests)."""
        return dict(self._stats)

    def close(self) -> None:
        self.client.close()


# Operations a backend may forward; the actor refuses anything else.
_OPS = frozenset({"ensure_collection", "list_collections", "delete_collection", "resolve_alias", "set_alias",
                  "upsert", "delete", "trim_segments", "get", "get_segments", "query", "query_groups", "count",
                  "scroll_page", "healthy", "stats", "close"})


class _DirectBackend:
    """Calls a QdrantStore in this process (server mode, or a client the caller made)."""

    def __init__(self, core: QdrantStore) -> None:
        self.core = core

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.core, op)(*args, **kwargs)

    def close(self) -> None:
        self.core.close()


def resolve_store_path(path: str | os.PathLike) -> str:
    """Absolute, symlink-free store path: the identity of an embedded store."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def embedded_actor_name(path: str | os.PathLike) -> str:
    """Actor name for a store directory, so two stores never share an actor."""
    return "vidsearch-store-" + hashlib.sha256(resolve_store_path(path).encode()).hexdigest()[:16]


def _open_local_client(path: str, wait_s: float) -> Any:
    from qdrant_client import QdrantClient

    os.makedirs(path, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return QdrantClient(path=path)
        except RuntimeError as exc:
            # The lock can outlive a killed predecessor actor by a moment; wait for it.
            if "already accessed" not in str(exc) or time.monotonic() > deadline:
                raise StoreUnavailable(f"cannot open embedded store {path}: {exc}") from None
            time.sleep(0.1)


class _StoreActor:
    """Body of the embedded store actor: owns the local-mode client."""

    def __init__(self, path: str, settings: StoreSettings) -> None:
        self.core = QdrantStore(_open_local_client(path, settings.timeout_s), settings)

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if op not in _OPS:
            raise StoreError(f"unknown store operation {op!r}")
        return getattr(self.core, op)(*args, **kwargs)


@functools.cache
def _actor_class() -> Any:
    import ray

    return ray.remote(_StoreActor)


class _ActorBackend:
    """Forwards every call to the embedded store actor with ray.get."""

    def __init__(self, path: str, settings: StoreSettings) -> None:
        self.path = path
        self.settings = settings
        self.name = embedded_actor_name(path)
        self._handle: Any = None
        self._opened = False

    def _actor(self) -> Any:
        if self._handle is None:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # The path names a directory on this machine, so the actor must run here.
            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
            self._handle = _actor_class().options(
                name=self.name, namespace=RAY_NAMESPACE, lifetime="detached", get_if_exists=True,
                num_cpus=0,  # bookkeeping only: never take a CPU slot from decode tasks
                max_restarts=0, scheduling_strategy=here,
            ).remote(self.path, self.settings)
            self._opened = False
        if not self._opened:
            self._wait_open()
        return self._handle

    def _wait_open(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            # Raises RayActorError when opening failed (e.g. the directory is locked).
            ray.get(self._handle.__ray_ready__.remote(), timeout=EMBEDDED_OPEN_TIMEOUT_S)
        except GetTimeoutError:
            raise StoreUnavailable(f"embedded store {self.path} did not open within "
                                   f"{EMBEDDED_OPEN_TIMEOUT_S:g}s") from None
        self._opened = True

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

        try:
            return ray.get(self._actor().call.remote(op, *args, **kwargs), timeout=self.settings.timeout_s)
        except RayTaskError as exc:
            # The store raised: hand the caller that very exception, as in server mode.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception) and not isinstance(cause, RayError):
                raise cause from None
            raise StoreUnavailable(f"embedded store call {op} failed: {exc}") from None
        except RayActorError as exc:
            # Dead (killed, crashed, or failed to open the store): forget the handle so
            # the next call finds or creates a fresh actor.
            self._handle = None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"embedded store actor {self.name} is unavailable: {reason}") from None
        except GetTimeoutError:
            raise StoreUnavailable(f"embedded store did not answer {op} within "
                                   f"{self.settings.timeout_s:g}s") from None
        except RayError as exc:
            self._handle = None
            raise StoreUnavailable(f"embedded store call {op} failed: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        # The actor is shared with other processes; only this handle goes.
        self._handle = None


class VectorStore:
    """The store API every service uses; identical in server and embedded mode."""

    def __init__(self, backend: Any, settings: StoreSettings, location: str) -> None:
        self._backend = backend
        self.settings = settings
        self.location = location

    @classmethod
    def in_process(cls, client: Any, settings: StoreSettings) -> "VectorStore":
        """A store over a client made by the caller (a server client, or local mode)."""
        return cls(_DirectBackend(QdrantStore(client, settings)), settings, location="in-process")

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return self._backend.call(op, *args, **kwargs)

    def ensure_collection(self, name: str, dim: int, frame_dim: int, region_dim: int | None = None) -> bool:
        return self._call("ensure_collection", name, dim, frame_dim, region_dim)

    def resolve_alias(self, alias: str | None = None) -> str | None:
        """The collection ``alias`` (default: the configured one) points at, or None."""
        return self._call("resolve_alias", alias or self.settings.alias)

    def set_alias(self, collection: str, alias: str | None = None) -> str | None:
        """Atomically point the alias at ``collection``; returns the previous target."""
        return self._call("set_alias", collection, alias or self.settings.alias)

    def upsert(self, collection: str, points: Iterable[VideoPoint]) -> int:
        """Write points in batches of ``store.upsert_batch``, each acknowledged (wait=True),
        then remove the segments a longer earlier version of each video left behind.

        Upsert first, trim after: every step is idempotent, and a crash between them
        leaves the video whole and searchable (plus stale tail segments until the
        redelivered message trims them), never missing, as deleting first would.
        """
        points = list(points)
        size = self.settings.upsert_batch
        for start in range(0, len(points), size):
            self._call("upsert", collection, points[start:start + size])
        counts = {p.video_id: p.segment_count for p in points}
        if counts:
            self._call("trim_segments", collection, counts)
        return len(points)

    def delete(self, collection: str, video_ids: Iterable[str]) -> int:
        """Remove the videos, every segment of each."""
        return self._call("delete", collection, _video_ids(video_ids))

    def get(self, collection_or_alias: str, video_ids: Iterable[str], with_vectors: bool = False) -> list[StoredVideo]:
        """One point per video: a long video's first segment."""
        return self._call("get", collection_or_alias, _video_ids(video_ids), with_vectors)

    def get_segments(self, collection_or_alias: str, video_ids: Iterable[str],
                     with_vectors: bool = False) -> list[StoredVideo]:
        """Every segment of the videos (video order as asked, then segment order)."""
        return self._call("get_segments", collection_or_alias, _video_ids(video_ids), with_vectors)

    def query(self, collection_or_alias: str, vector: Any, limit: int,
              filters: Sequence[FilterSpec] | None = None, with_frames: bool = False) -> list[Hit]:
        """Nearest points (segments), not grouped."""
        return self._call("query", collection_or_alias, vector, limit, filters, with_frames)

    def query_groups(self, collection_or_alias: str, vector: Any, limit: int, group_size: int = 1,
                     filters: Sequence[FilterSpec] | None = None, with_frames: bool = False) -> list[list[Hit]]:
        """Nearest videos, each once, with its best ``group_size`` segments (best first)."""
        return self._call("query_groups", collection_or_alias, vector, limit, group_size, filters, with_frames)

    def count(self, collection: str) -> int:
        return self._call("count", collection)

    def scroll(self, collection: str, batch_size: int = 256, with_vectors: bool = False) -> Iterator[list[StoredVideo]]:
        """All points, one page per item (for re-indexing and training reads)."""
        offset = None
        while True:
            page, offset = self._call("scroll_page", collection, batch_size, offset, with_vectors)
            if page:
                yield page
            if offset is None:
                return

    def list_collections(self) -> list[str]:
        return self._call("list_collections")

    def delete_collection(self, name: str, force: bool = False) -> bool:
        return self._call("delete_collection", name, force)

    def healthy(self) -> bool:
        try:
            return bool(self._call("healthy"))
        except StoreError:
            return False

    def stats(self) -> dict[str, int]:
        return self._call("stats")

    def close(self) -> None:
        """Release this handle. In embedded mode the shared actor keeps running for other
        processes; :func:`shutdown_embedded_store` stops it."""
        self._backend.close()

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ensure_ray(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    if settings.ray.address:
        ray.init(address=settings.ray.address)
    else:
        ray.init(num_cpus=settings.ray.num_cpus, include_dashboard=False)


def open_store(settings: Settings) -> VectorStore:
    """The configured store: a Qdrant server when ``store.url`` is set, else embedded."""
    store = settings.store
    if store.url:
        from qdrant_client import QdrantClient

        api_key = store.api_key.get_secret_value() if store.api_key else None
        client = QdrantClient(url=store.url, api_key=api_key, timeout=max(1, math.ceil(store.timeout_s)))
        return VectorStore(_DirectBackend(QdrantStore(client, store)), store, location=store.url)
    _ensure_ray(settings)
    path = resolve_store_path(store.path)
    return VectorStore(_ActorBackend(path, store), store, location=f"embedded:{path}")


def shutdown_embedded_store(settings: Settings) -> bool:
    """Stop the embedded store actor for ``store.path`` (closing Qdrant cleanly first).

    Returns False when there was none. Returns once the actor's name is free, so a
    following open_store starts a fresh actor.
    """
    import ray
    from ray.exceptions import RayError

    if not ray.is_initialized():
        return False
    name = embedded_actor_name(settings.store.path)
    try:
        handle = ray.get_actor(name, namespace=RAY_NAMESPACE)
    except ValueError:
        return False
    with contextlib.suppress(RayError):
        # Closing first releases the file lock even if the kill below is slow.
        ray.get(handle.call.remote("close"), timeout=settings.store.timeout_s)
    ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + settings.store.timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=RAY_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.05)
    log_event(log, "embedded store stopped", actor=name)
    return True
