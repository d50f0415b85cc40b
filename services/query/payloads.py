"""Stored payload -> what a client may receive: defence in depth for every response.

Ingest bounds what it stores, but points written before those limits, by another
writer, or straight into Qdrant can hold anything. A payload that protobuf cannot
encode (a lone surrogate), that a client with default limits cannot decode (nested
past protobuf's recursion limit of 100) or that is too large is cut down for that
result alone, and ``notice`` says what was left out, so one poison point never
fails a whole search. Credentials never leave: the uri loses user-info, query and
fragment, and private fields are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError, EncodeError

from vidsearch.uris import public_uri
from vidsearch.v1 import search_pb2

# Payload fields never returned: where a writer may keep the full uri (presigned
# query string included) for re-decoding. Any field starting with "_" is private too.
PRIVATE_FIELDS = frozenset({"source_uri", "full_uri"})
# Kept when the metadata has to go: small, typed by the store schema.
SYSTEM_FIELDS = ("video_id", "uri", "duration_s", "ingested_at", "frame_timestamps", "frame_encoder",
                 "model_version", "width", "height", "fps", "codec")
NOTICE_FIELD = "payload_notice"
# Caps of the typed summary fields (a title is a line, not a document).
MAX_TITLE_CHARS = 1024
MAX_TAGS = 256
MAX_TAG_CHARS = 256


@dataclass
class PayloadView:
    struct: struct_pb2.Struct
    summary: search_pb2.VideoSummary
    notice: str = ""


def to_struct(payload: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    # ParseDict handles nested dicts/lists and rejects non-JSON values loudly.
    json_format.ParseDict(dict(payload), struct)
    return struct


def public_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload without private fields and with a credential-free uri."""
    out = {k: v for k, v in payload.items()
           if isinstance(k, str) and k not in PRIVATE_FIELDS and not k.startswith("_")}
    if isinstance(out.get("uri"), str):
        out["uri"] = public_uri(out["uri"])
    return out


def encoded_struct(payload: Mapping[str, Any], max_bytes: int) -> tuple[struct_pb2.Struct | None, str]:
    """(Struct, "") when ``payload`` encodes, decodes again with protobuf's default
    limits inside a full response, and fits ``max_bytes``; else (None, why)."""
    try:
        struct = to_struct(payload)
        size = struct.ByteSize()
        if size > max_bytes:
            return None, f"{size} bytes encoded, over the {max_bytes}-byte limit"
        # Round trip inside the message clients decode: the Struct's depth plus the
        # response's own levels must stay within the decoder's recursion limit.
        wire = search_pb2.SearchResponse(results=[search_pb2.SearchResult(payload=struct)]).SerializeToString()
        search_pb2.SearchResponse.FromString(wire)
    except (json_format.ParseError, EncodeError, DecodeError, UnicodeError, RecursionError,
            TypeError, ValueError) as exc:
        return None, f"cannot be encoded for clients ({_short(exc)})"
    return struct, ""


def payload_view(video_id: str, payload: Mapping[str, Any], max_bytes: int) -> PayloadView:
    """The whole public payload when it can be sent, else the largest safe part of it."""
    public = public_payload(payload if isinstance(payload, Mapping) else {})
    summary = summarize(public)
    struct, why = encoded_struct(public, max_bytes)
    if struct is not None:
        return PayloadView(struct, summary)
    base = {k: public[k] for k in SYSTEM_FIELDS if k in public}
    metadata = public.get("metadata")
    kept, dropped = _fit_metadata(base, metadata if isinstance(metadata, Mapping) else {}, max_bytes)
    notice = (f"payload {why}: metadata field(s) {', '.join(map(repr, dropped[:10]))}"
              f"{' ...' if len(dropped) > 10 else ''} left out") if dropped else f"payload {why}"
    cut = {**base, "metadata": kept, NOTICE_FIELD: notice}
    struct, _ = encoded_struct(cut, max_bytes)
    if struct is None:
        # Even the system fields are unusable (a writer stored garbage): a marker alone.
        notice = f"payload {why}: only the video id is returned"
        struct = to_struct({"video_id": video_id, NOTICE_FIELD: notice})
        summary = search_pb2.VideoSummary()
    return PayloadView(struct, summary, notice)


def cut_to_marker(result: Any, payload: Mapping[str, Any], why: str) -> None:
    """Replace ``result``'s payload (a SearchResult or GetVideoResponse) by the system
    fields and a notice: what is left when the response as a whole is too large."""
    public = public_payload(payload if isinstance(payload, Mapping) else {})
    notice = f"payload left out: {why}"
    base = {k: public[k] for k in SYSTEM_FIELDS if k in public}
    struct, _ = encoded_struct({**base, "metadata": {}, NOTICE_FIELD: notice}, 1 << 20)
    if struct is None:
        struct = to_struct({"video_id": result.video_id, NOTICE_FIELD: notice})
    result.payload.CopyFrom(struct)
    result.payload_notice = notice


def fit_response(results: Sequence[Any], payloads: Sequence[Mapping[str, Any]], max_bytes: int) -> int:
    """Cut the largest payloads until the results together fit ``max_bytes``
    (under the 4 MB default receive limit of gRPC clients); return how many were cut."""
    total = sum(r.ByteSize() for r in results)
    cut = 0
    order = sorted(range(len(results)), key=lambda i: results[i].payload.ByteSize(), reverse=True)
    for i in order:
        if total <= max_bytes:
            break
        before = results[i].ByteSize()
        cut_to_marker(results[i], payloads[i], f"the response would exceed {max_bytes} bytes")
        total += results[i].ByteSize() - before
        cut += 1
    return cut


def summarize(payload: Mapping[str, Any]) -> search_pb2.VideoSummary:
    """Typed copies of the common fields, each checked and capped."""
    metadata = payload.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    tags = metadata.get("tags")
    tags = [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []
    duration = payload.get("duration_s")
    return search_pb2.VideoSummary(
        uri=_text(payload.get("uri"), MAX_TITLE_CHARS * 4),
        title=_text(metadata.get("title"), MAX_TITLE_CHARS),
        tags=[_text(t, MAX_TAG_CHARS) for t in tags[:MAX_TAGS] if isinstance(t, str)],
        duration_s=float(duration) if _finite_number(duration) else 0.0,
        category=_text(metadata.get("category"), MAX_TITLE_CHARS),
        ingested_at=_text(payload.get("ingested_at"), 64),
    )


def _fit_metadata(base: dict[str, Any], metadata: Mapping[str, Any],
                  max_bytes: int) -> tuple[dict[str, Any], list[str]]:
    """The metadata fields that encode on their own, smallest first, within the budget."""
    sizes: list[tuple[int, str]] = []
    dropped: list[str] = []
    for key, value in metadata.items():
        struct, _ = encoded_struct({str(key): value}, max_bytes)
        if struct is None:
            dropped.append(str(key))
        else:
            sizes.append((struct.ByteSize(), str(key)))
    budget = max_bytes - _size(base) - 1024  # room for the notice
    kept: dict[str, Any] = {}
    for size, key in sorted(sizes):
        if size > budget:
            dropped.append(key)
            continue
        kept[key] = metadata[key]
        budget -= size
    return kept, dropped


def _size(fields: Mapping[str, Any]) -> int:
    struct, _ = encoded_struct(fields, 1 << 30)
    return struct.ByteSize() if struct is not None else 0


def _text(value: Any, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    # Lone surrogates cannot be sent as protobuf strings.
    value = value.encode("utf-8", "replace").decode("utf-8")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__
