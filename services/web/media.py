"""Where a video's bytes come from: the live index names the uri, the decode
allowlist decides whether it may be read.

A video id is only ever looked up in the collection the live alias points at, and
its stored uri goes through :func:`vidsearch.uris.resolve_uri` (``..`` and
symlinks resolved) before a byte is read, so neither an id nor a stored uri can
reach a file outside ``decode.allowed_prefixes``.
"""
from __future__ import annotations

import logging
import mimetypes
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from vidsearch.config import DecodeSettings
from vidsearch.services.query.validation import validate_video_id
from vidsearch.services.query.errors import RequestError
from vidsearch.store import CollectionNotFound, StoreUnavailable, VectorStore
from vidsearch.telemetry import log_event
from vidsearch.uris import GuardedReader, ResolvedURI, VideoError, resolve_uri

from .http_errors import HttpError, bad_request

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
# Containers browsers play; anything else is offered as a download.
_VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
                ".mkv": "video/x-matroska", ".ogv": "video/ogg"}
# VideoError class -> HTTP status: refusals are 403, missing files 404.
_STATUS = {"not_found": 404, "not_allowed": 403, "unsupported_uri": 403, "too_large": 403}


@dataclass(frozen=True)
class Source:
    video_id: str
    collection: str
    uri: str
    duration_s: float | None


def find_source(store: VectorStore, alias: str, video_id: str) -> Source:
    """The live index's record of ``video_id`` (blocking: call it in a thread)."""
    try:
        video_id = validate_video_id(video_id)
    except RequestError as exc:
        raise bad_request(exc) from None
    try:
        collection = store.resolve_alias(alias)
        if collection is None:
            raise HttpError(503, "FAILED_PRECONDITION",
                            f"no live index: alias {alias!r} does not point at a collection yet",
                            headers={"Retry-After": "5"})
        found = store.get(collection, [video_id])
    except CollectionNotFound:
        raise HttpError(503, "FAILED_PRECONDITION", "the live index moved; try again",
                        headers={"Retry-After": "1"}) from None
    except StoreUnavailable as exc:
        raise HttpError(503, "UNAVAILABLE", f"vector store unavailable: {exc}",
                        headers={"Retry-After": "5"}) from None
    if not found:
        raise HttpError(404, "NOT_FOUND", f"video_id: no video {video_id!r} in the live index {collection}")
    payload = found[0].payload
    uri = payload.get("uri")
    if not isinstance(uri, str) or not uri:
        raise HttpError(404, "NOT_FOUND", f"video_id: video {video_id!r} has no stored uri")
    duration = payload.get("duration_s")
    return Source(video_id=video_id, collection=collection, uri=uri,
                  duration_s=float(duration) if isinstance(duration, (int, float)) else None)


def check_uri(source: Source, decode: DecodeSettings) -> ResolvedURI:
    """The stored uri, if the allowlist (as configured now) still admits it."""
    try:
        return resolve_uri(source.uri, decode)
    except VideoError as exc:
        raise _video_error(source, exc) from None


def open_media(resolved: ResolvedURI, source: Source, decode: DecodeSettings) -> GuardedReader:
    """Open for reading with the decode size limit (blocking: call it in a thread)."""
    try:
        return resolved.open(decode.max_bytes)
    except VideoError as exc:
        raise _video_error(source, exc) from None
    except OSError as exc:
        raise HttpError(503, "UNAVAILABLE", f"the source of video {source.video_id!r} cannot be read now: {exc}",
                        headers={"Retry-After": "5"}) from None


def _video_error(source: Source, exc: VideoError) -> HttpError:
    status = _STATUS.get(exc.error_class, 403)
    code = "NOT_FOUND" if status == 404 else "PERMISSION_DENIED"
    # The reason names the uri (redacted); log it, but tell the client only the class.
    log_event(log, "media refused", logging.WARNING, video_id=source.video_id, error_class=exc.error_class,
              reason=exc.reason)
    return HttpError(status, code, f"video_id: the source of video {source.video_id!r} cannot be served "
                                   f"({exc.error_class})")


def content_type(uri: str) -> str:
    path = urlsplit(uri).path if "://" in uri else uri
    suffix = ("." + path.rsplit(".", 1)[-1].lower()) if "." in path.rsplit("/", 1)[-1] else ""
    return _VIDEO_TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def read_chunks(reader: GuardedReader, start: int, length: int | None, video_id: str) -> Iterator[bytes]:
    """``length`` bytes from ``start`` (all when None), then close the reader.

    A read failure mid-way ends the body early (the client sees a short response
    and retries the rest with a new range); it is logged, never raised into the
    server, since the headers are already sent.
    """
    try:
        if start:
            reader.seek(start)
        left = length
        while left is None or left > 0:
            data = reader.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            yield data
        if reader.failure is not None:
            log_event(log, "media read failed", logging.WARNING, video_id=video_id, error=str(reader.failure))
    finally:
        reader.close()
