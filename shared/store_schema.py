"""The vector-store schema: names, point ids, point/payload shapes and typed filters.

Everything here is pure (no client, no I/O), so the ingest worker, the query
service and the trainer agree on the contract without opening a store:

- one collection per index version, ``videos__<model_version>``; the alias
  ``videos`` points at the live one;
- one point per segment of a video (one for a short video): point id =
  uuid5(:data:`POINT_NAMESPACE`, video_id) for segment 0, uuid5(:data:`SEGMENT_NAMESPACE`,
  f"{video_id}#{k}") for segment k, so a redelivered message overwrites the same points;
- named vector ``video`` (cosine) and multivector ``frames`` (cosine, MAX_SIM); for a
  model whose slow scorer reads them, multivector ``regions`` (the region tokens, T x G
  rows, kept out of any ANN index, stored compactly: see :func:`encode_regions`);
- payload: video_id, uri, metadata, frame_timestamps, duration_s, ingested_at,
  frame_encoder, model_version, and the segment fields segment, segment_count,
  start_s, end_s.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Union

import numpy as np

from .config import ConfigError, StoreSettings
from .messages import MessageError, check_video_id
from .uris import public_uri

ALIAS: str = StoreSettings().alias
COLLECTION_SEP = "__"
VIDEO_VECTOR = "video"
FRAMES_VECTOR = "frames"
REGIONS_VECTOR = "regions"
# Private payload field (never returned to clients): how the point's regions are coded.
REGION_CODEC_FIELD = "_region_codec"
REGION_CODECS = ("uint8", "float16", "float32")
# Payload field naming what computed a point's region tokens (VideoTextModel.region_encoder_id):
# a re-index keeps them only for a model with the same one.
REGION_ENCODER_FIELD = "region_encoder"
# uint8 codes cover +-REGION_UINT8_RANGE / sqrt(W) per component of a unit W-vector (a unit
# vector's components are ~N(0, 1/W)): 4 standard deviations, in 255 steps.
REGION_UINT8_RANGE = 4.0

# Fixed forever: changing it would re-key every stored point (duplicates on re-ingest).
POINT_NAMESPACE = uuid.UUID("6c0b5a3e-2f4d-5b8e-9a51-7d3c2e1f0a94")
# Segments k > 0 of a long video (see point_id); fixed forever for the same reason.
SEGMENT_NAMESPACE = uuid.UUID("0f6a2d8c-91b4-5e37-8c1d-4b9e7a3f52c6")
# Payload fields of a segment point (a short video is segment 0 of 1, spanning it all).
SEGMENT_FIELDS = ("segment", "segment_count", "start_s", "end_s")

_MODEL_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

FieldType = Literal["keyword", "integer", "float", "datetime", "bool"]

# Top-level payload fields; a filter on one of these names uses the name itself as the
# payload path, any other name is a metadata field (metadata.<name>). Each has the
# only type its stored values can be filtered as.
SYSTEM_FIELDS: dict[str, FieldType] = {
    "video_id": "keyword",
    "uri": "keyword",
    "duration_s": "float",
    "ingested_at": "datetime",
    "frame_encoder": "keyword",
    "model_version": "keyword",
}
MAX_ANY_VALUES = 1024
# Where a point keeps its full source uri when that holds credentials (user-info, a
# query string): read only to re-decode the video, never returned to a client.
SOURCE_URI_FIELD = "source_uri"


# --------------------------------------------------------------------------- names, ids

def collection_name(model_version: str, alias: str = ALIAS) -> str:
    """``videos__<model_version>``: the collection holding one index version."""
    if not isinstance(model_version, str) or not _MODEL_VERSION_RE.fullmatch(model_version):
        raise ValueError(f"model version {model_version!r} must be 1-128 characters of "
                         "letters, digits, '.', '_' or '-', starting with a letter or digit")
    return f"{alias}{COLLECTION_SEP}{model_version}"


def model_version_of(collection: str, alias: str = ALIAS) -> str:
    """Inverse of :func:`collection_name`."""
    prefix = f"{alias}{COLLECTION_SEP}"
    version = collection[len(prefix):] if isinstance(collection, str) and collection.startswith(prefix) else ""
    if not _MODEL_VERSION_RE.fullmatch(version):
        raise ValueError(f"{collection!r} is not a '{prefix}<model_version>' collection name")
    return version


def point_id(video_id: str, segment: int = 0) -> str:
    """The deterministic point id of a video's segment (uuid5 string).

    Segment 0 (all of a short video) keeps the id a video always had,
    uuid5(POINT_NAMESPACE, video_id), so collections built before segments stay
    valid; segment k > 0 is uuid5(SEGMENT_NAMESPACE, f"{video_id}#{k}"), in a
    namespace of its own so it can never collide with a video whose id ends in
    "#<k>". A redelivered message overwrites the same points.
    """
    if not isinstance(video_id, str):
        raise TypeError(f"video_id must be a string, got {type(video_id).__name__}")
    if isinstance(segment, bool) or not isinstance(segment, (int, np.integer)) or segment < 0:
        raise ValueError(f"segment must be an int >= 0, got {segment!r}")
    if segment == 0:
        return str(uuid.uuid5(POINT_NAMESPACE, video_id))
    return str(uuid.uuid5(SEGMENT_NAMESPACE, f"{video_id}#{int(segment)}"))


# --------------------------------------------------------------------------- points

def rfc3339(moment: datetime) -> str:
    """UTC RFC3339 with milliseconds and a ``Z`` (what Qdrant's datetime filter parses)."""
    if moment.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def build_payload(video_id: str, uri: str, metadata: Mapping[str, Any], frame_timestamps: Sequence[float],
                  duration_s: float, frame_encoder: str, model_version: str, *,
                  ingested_at: datetime | None = None) -> dict[str, Any]:
    """The payload stored with a video point (validated, JSON-safe)."""
    try:
        check_video_id(video_id)
    except MessageError as exc:
        raise ValueError(exc.reason) from None
    for name, value in (("uri", uri), ("frame_encoder", frame_encoder), ("model_version", model_version)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        # Round trip: proves it is storable JSON and detaches it from the caller's objects.
        metadata = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata is not JSON-serialisable: {exc}") from None
    timestamps = [_finite_non_negative("frame timestamp", t) for t in np.asarray(frame_timestamps).tolist()]
    shown = public_uri(uri)
    # Credentials (user-info, a presigned query) never go where responses read: `uri`
    # is the public form, and the full one is kept apart only when it differs, for
    # re-decoding (the query service never returns SOURCE_URI_FIELD).
    private = {SOURCE_URI_FIELD: uri} if shown != uri else {}
    return {
        "video_id": video_id,
        "uri": shown,
        **private,
        "metadata": metadata,
        "frame_timestamps": timestamps,
        "duration_s": _finite_non_negative("duration_s", duration_s),
        "ingested_at": rfc3339(ingested_at or datetime.now(timezone.utc)),
        "frame_encoder": frame_encoder,
        "model_version": model_version,
    }


def source_uri(payload: Mapping[str, Any]) -> str:
    """The uri to decode a stored video from again (the full one when it was kept apart)."""
    return str(payload.get(SOURCE_URI_FIELD) or payload.get("uri") or "")


def as_vector(name: str, value: object, ndim: int) -> np.ndarray:
    """float32 array of the given rank, finite, without all-zero rows (else ValueError)."""
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != ndim or 0 in array.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-d array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinity")
    # Cosine distance divides by the norm: an all-zero vector has no direction.
    norms = np.linalg.norm(array, axis=-1)
    if (norms == 0).any():
        raise ValueError(f"{name} contains an all-zero vector")
    return array


def segment_payload(payload: Mapping[str, Any], segment: int, segment_count: int, start_s: float, end_s: float,
                    frame_timestamps: Sequence[float]) -> dict[str, Any]:
    """``payload`` (from :func:`build_payload`) for one segment of a video: its index,
    the video's segment count, its span (seconds from the video's start) and its own
    frame timestamps (absolute, from the video's start)."""
    if isinstance(segment_count, bool) or not isinstance(segment_count, (int, np.integer)) or segment_count < 1:
        raise ValueError(f"segment_count must be an int >= 1, got {segment_count!r}")
    if isinstance(segment, bool) or not isinstance(segment, (int, np.integer)) or not 0 <= segment < segment_count:
        raise ValueError(f"segment must be an int in [0, {segment_count}), got {segment!r}")
    start, end = _finite_non_negative("start_s", start_s), _finite_non_negative("end_s", end_s)
    if end < start:
        raise ValueError(f"segment end_s={end} is before start_s={start}")
    return {**payload, "segment": int(segment), "segment_count": int(segment_count), "start_s": start, "end_s": end,
            "frame_timestamps": [_finite_non_negative("frame timestamp", t)
                                 for t in np.asarray(frame_timestamps).tolist()]}


@dataclass(frozen=True)
class SegmentSpan:
    """Where a stored point sits in its video."""

    segment: int
    segment_count: int
    start_s: float
    end_s: float


def segment_span(payload: Mapping[str, Any]) -> SegmentSpan:
    """The segment fields of a stored payload; a point written before segments existed
    is the one segment of its video, spanning all of it."""
    duration = payload.get("duration_s")
    duration = float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 0.0
    segment, count = payload.get("segment"), payload.get("segment_count")
    start, end = payload.get("start_s"), payload.get("end_s")
    ok = (isinstance(segment, int) and isinstance(count, int) and not isinstance(segment, bool)
          and isinstance(start, (int, float)) and isinstance(end, (int, float)))
    if not ok:
        return SegmentSpan(0, 1, 0.0, duration)
    return SegmentSpan(int(segment), int(count), float(start), float(end))


def encode_regions(regions: np.ndarray, codec: str) -> np.ndarray:
    """float32[T,G,W] unit region tokens -> the [T*G, W] rows stored in the ``regions`` multivector.

    ``uint8``: each component as an integer code 0..255 over +-REGION_UINT8_RANGE/sqrt(W)
    (a Qdrant server stores them as uint8: 1 byte a value); ``float16``/``float32`` as is.
    """
    if codec not in REGION_CODECS:
        raise ValueError(f"region codec {codec!r}: expected one of {', '.join(REGION_CODECS)}")
    regions = as_vector("regions", regions, 3)
    rows = regions.reshape(-1, regions.shape[-1])
    if codec == "uint8":
        span = REGION_UINT8_RANGE / math.sqrt(rows.shape[-1])
        return np.clip(np.rint((rows / span + 1.0) * 127.5), 0, 255).astype(np.float32)
    if codec == "float16":
        return rows.astype(np.float16).astype(np.float32)
    return rows


def decode_regions(rows: np.ndarray, num_frames: int, codec: str) -> np.ndarray:
    """The stored ``regions`` rows of a point with ``num_frames`` frames -> float32[T,G,W]."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or num_frames <= 0 or rows.shape[0] % num_frames:
        raise ValueError(f"stored regions of shape {rows.shape} do not split into {num_frames} frames")
    if codec == "uint8":
        rows = (rows / 127.5 - 1.0) * (REGION_UINT8_RANGE / math.sqrt(rows.shape[-1]))
    elif codec not in REGION_CODECS:
        raise ValueError(f"stored regions have unknown codec {codec!r}")
    return rows.reshape(num_frames, rows.shape[0] // num_frames, rows.shape[-1])


@dataclass(frozen=True)
class VideoPoint:
    """One point to write (a video, or one segment of a long video): aggregated
    vector, per-frame vectors and payload (its ``segment`` picks the point id)."""

    video_id: str
    video_vector: np.ndarray  # float32[D]
    frames: np.ndarray  # float32[T, D_frame]
    payload: dict[str, Any] = field(default_factory=dict)
    regions: np.ndarray | None = None  # float32[T, G, W]: region tokens, for a spatial scorer

    def __post_init__(self) -> None:
        if not isinstance(self.video_id, str):
            raise ValueError(f"video_id must be a string, got {type(self.video_id).__name__}")
        object.__setattr__(self, "video_vector", as_vector("video_vector", self.video_vector, 1))
        object.__setattr__(self, "frames", as_vector("frames", self.frames, 2))
        if self.regions is not None:
            object.__setattr__(self, "regions", as_vector("regions", self.regions, 3))
            if self.regions.shape[0] != self.frames.shape[0]:
                raise ValueError(f"{self.regions.shape[0]} frames of regions for {self.frames.shape[0]} frames")
        if not isinstance(self.payload, dict):
            raise ValueError(f"payload must be a dict, got {type(self.payload).__name__}")
        if self.payload.get("video_id", self.video_id) != self.video_id:
            raise ValueError(f"payload video_id {self.payload['video_id']!r} != {self.video_id!r}")
        stamps = self.payload.get("frame_timestamps")
        if stamps is not None and len(stamps) != self.frames.shape[0]:
            raise ValueError(f"{len(stamps)} frame timestamps for {self.frames.shape[0]} frames")
        segment, count = self.payload.get("segment", 0), self.payload.get("segment_count", 1)
        if (isinstance(segment, bool) or not isinstance(segment, (int, np.integer)) or isinstance(count, bool)
                or not isinstance(count, (int, np.integer)) or not 0 <= segment < count):
            raise ValueError(f"segment {segment!r} of segment_count {count!r}: needs 0 <= segment < segment_count")

    @property
    def segment(self) -> int:
        return int(self.payload.get("segment", 0))

    @property
    def segment_count(self) -> int:
        return int(self.payload.get("segment_count", 1))


@dataclass
class StoredVideo:
    """A point read back: payload, and the vectors when asked for."""

    video_id: str
    payload: dict[str, Any]
    video_vector: np.ndarray | None = None
    frames: np.ndarray | None = None
    regions: np.ndarray | None = None  # float32[T, G, W] when the point has region tokens


@dataclass
class Hit:
    """One recall result. ``frames`` and ``video`` (the stored vectors) are set when the
    query asked for frames: the reranker's cross-encoder builds on the head's ``video``
    vector, and reading it back saves recomputing it."""

    video_id: str
    score: float
    payload: dict[str, Any]
    frames: np.ndarray | None = None
    video: np.ndarray | None = None
    regions: np.ndarray | None = None  # float32[T, G, W] when the point has region tokens


# --------------------------------------------------------------------------- filters

class FilterError(ValueError):
    """A filter names an unknown field or is malformed (gRPC: INVALID_ARGUMENT)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"filter on {field!r}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):
        # Crosses the Ray actor boundary in embedded mode; rebuild from both fields.
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True)
class Match:
    """``field == value`` (for an array field: any element equals value)."""

    field: str
    value: str | int | bool


@dataclass(frozen=True)
class MatchAny:
    """``field`` is one of ``values`` (for an array field: any element is)."""

    field: str
    values: Sequence[str | int]


Bound = Union[int, float, datetime, str, None]


@dataclass(frozen=True)
class Range:
    """Numeric or datetime range; datetime bounds are aware datetimes or RFC3339 strings."""

    field: str
    gte: Bound = None
    gt: Bound = None
    lte: Bound = None
    lt: Bound = None


FilterSpec = Union[Match, MatchAny, Range]


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _parse_datetime(field_name: str, value: object) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise FilterError(field_name, f"{value!r} is not an RFC3339 datetime") from None
    if not isinstance(value, datetime):
        raise FilterError(field_name, f"datetime bound must be a datetime or RFC3339 string, "
                                      f"got {type(value).__name__}")
    if value.tzinfo is None:
        raise FilterError(field_name, "datetime bound needs a timezone (e.g. 'Z' or '+00:00')")
    return value.astimezone(timezone.utc)


def _parse_number(field_name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FilterError(field_name, f"range bound must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise FilterError(field_name, "range bound must be finite")
    return float(value)


class FilterSchema:
    """Which fields are filterable, their payload paths and index types."""

    def __init__(self, field_types: Mapping[str, FieldType]) -> None:
        for name, kind in field_types.items():
            expected = SYSTEM_FIELDS.get(name)
            if expected is not None and kind != expected:
                raise ConfigError(f"invalid setting store.filter_fields.{name}: system field "
                                  f"{name} is stored as {expected}, not {kind}")
        self.field_types: dict[str, FieldType] = dict(field_types)

    @staticmethod
    def path(field_name: str) -> str:
        """Payload path of a public field name."""
        return field_name if field_name in SYSTEM_FIELDS else f"metadata.{field_name}"

    def index_schemas(self) -> dict[str, str]:
        """payload path -> Qdrant payload schema type, for the payload indexes."""
        return {self.path(name): kind for name, kind in self.field_types.items()}

    def to_qdrant(self, filters: Sequence[FilterSpec] | None):
        """AND of the given specs as a ``qdrant_client.models.Filter`` (None when empty)."""
        from qdrant_client import models

        if filters is None:
            return None
        if isinstance(filters, (Match, MatchAny, Range)):
            filters = [filters]
        if not isinstance(filters, (list, tuple)):
            raise FilterError("<filters>", f"expected a list of filters, got {type(filters).__name__}")
        conditions = [self._condition(models, spec) for spec in filters]
        return models.Filter(must=conditions) if conditions else None

    def _condition(self, models, spec: object):
        if not isinstance(spec, (Match, MatchAny, Range)):
            raise FilterError("<filters>", f"not a filter: {type(spec).__name__}")
        name = spec.field
        kind = self.field_types.get(name) if isinstance(name, str) else None
        if kind is None:
            known = ", ".join(sorted(self.field_types)) or "none"
            raise FilterError(str(name), f"unknown filter field (filterable: {known})")
        key = self.path(name)
        if isinstance(spec, Match):
            return models.FieldCondition(key=key, match=models.MatchValue(value=self._match_value(name, kind, spec.value)))
        if isinstance(spec, MatchAny):
            return models.FieldCondition(key=key, match=models.MatchAny(any=self._any_values(name, kind, spec.values)))
        return self._range(models, name, kind, key, spec)

    @staticmethod
    def _match_value(name: str, kind: FieldType, value: object) -> str | int | bool:
        if kind == "keyword" and isinstance(value, str):
            return value
        if kind == "integer" and _is_int(value):
            return int(value)
        if kind == "bool" and isinstance(value, (bool, np.bool_)):
            return bool(value)
        if kind in ("float", "datetime"):
            raise FilterError(name, f"exact match is not supported on a {kind} field; use a range")
        raise FilterError(name, f"{kind} field needs a {kind} value, got {type(value).__name__}")

    @staticmethod
    def _any_values(name: str, kind: FieldType, values: object) -> list[str] | list[int]:
        if kind not in ("keyword", "integer"):
            raise FilterError(name, f"any-of is only supported on keyword and integer fields, not {kind}")
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, set, frozenset)):
            raise FilterError(name, f"any-of needs a list of values, got {type(values).__name__}")
        if not values:
            raise FilterError(name, "any-of needs at least one value")
        if len(values) > MAX_ANY_VALUES:
            raise FilterError(name, f"any-of takes at most {MAX_ANY_VALUES} values, got {len(values)}")
        check = (lambda v: isinstance(v, str)) if kind == "keyword" else _is_int
        bad = [v for v in values if not check(v)]
        if bad:
            raise FilterError(name, f"{kind} field needs {kind} values, got {type(bad[0]).__name__}")
        return [v if kind == "keyword" else int(v) for v in values]

    @staticmethod
    def _range(models, name: str, kind: FieldType, key: str, spec: Range):
        if kind not in ("integer", "float", "datetime"):
            raise FilterError(name, f"range is not supported on a {kind} field")
        bounds = {op: getattr(spec, op) for op in ("gte", "gt", "lte", "lt") if getattr(spec, op) is not None}
        if not bounds:
            raise FilterError(name, "range needs at least one of gte, gt, lte, lt")
        if "gte" in bounds and "gt" in bounds or "lte" in bounds and "lt" in bounds:
            raise FilterError(name, "range takes one lower bound (gte or gt) and one upper bound (lte or lt)")
        parse = _parse_datetime if kind == "datetime" else _parse_number
        parsed = {op: parse(name, value) for op, value in bounds.items()}
        lower = next(((op, parsed[op]) for op in ("gte", "gt") if op in parsed), None)
        upper = next(((op, parsed[op]) for op in ("lte", "lt") if op in parsed), None)
        if lower and upper:
            (low_op, low), (high_op, high) = lower, upper
            if low > high or (low == high and (low_op == "gt" or high_op == "lt")):
                raise FilterError(name, "range is empty (lower bound above upper bound)")
        if kind == "datetime":
            return models.FieldCondition(key=key, range=models.DatetimeRange(**parsed))
        return models.FieldCondition(key=key, range=models.Range(**parsed))
