"""Turn files, a manifest or ids into ingest messages, and publish them.

Everything a user can get wrong (a missing file, a bad manifest line, two files
that would share a video id, metadata that isn't a JSON object) is checked
before the first message is sent, so a typo never leaves half a dataset queued.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vidsearch.config import Settings
from vidsearch.messages import DeleteOp, IngestOp, MessageError, UpsertOp, encode_ingest_message, parse_ingest_message
from vidsearch.redact import redact
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

# Suffixes picked up when a directory is given on the command line.
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


class ProducerError(ValueError):
    """A user-facing problem with the input or the broker; the message is one line,
    redacted (a path or bootstrap address may carry a token or user-info)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def _parse_metadata(raw: str | None, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ProducerError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProducerError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def _file_op(path: Path, video_id: str | None, metadata: dict[str, Any], where: str) -> UpsertOp:
    if not path.exists():
        raise ProducerError(f"{where}: no such file: {path}")
    if not path.is_file():
        raise ProducerError(f"{where}: not a regular file: {path}")
    try:
        # as_uri() percent-encodes, so spaces and non-ASCII names survive the trip.
        return UpsertOp(video_id or path.stem, path.resolve().as_uri(), metadata)
    except MessageError as exc:
        raise ProducerError(f"{where}: {exc.reason}") from None


def ops_from_paths(paths: Sequence[str | os.PathLike], metadata_json: str | None = None) -> list[UpsertOp]:
    """One upsert per file (video_id = file stem); a directory contributes its video files."""
    extra = _parse_metadata(metadata_json, "--metadata-json")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
            if not found:
                raise ProducerError(f"{path}: directory has no video files ({', '.join(VIDEO_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(path)
    ops = [_file_op(path, None, dict(extra), str(path)) for path in files]
    _check_unique(ops, [str(p) for p in files])
    return ops


def ops_from_manifest(manifest: str | os.PathLike, metadata_json: str | None = None) -> list[UpsertOp]:
    """Upserts from a JSONL manifest (the ``vidsearch synth`` format, or any subset of it).

    Each line is an object with ``path`` (relative paths resolve against the manifest's
    directory) and optionally ``video_id`` (default: the file stem) and ``metadata``
    (an object). Other fields (captions, split ...) are ignored here. ``--metadata-json``
    fields are added to every video and win over the manifest's.
    """
    extra = _parse_metadata(metadata_json, "--metadata-json")
    path = Path(manifest).expanduser()
    if path.is_dir():
        path = path / "manifest.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ProducerError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProducerError(f"cannot read manifest {path}: {exc}") from None
    root = path.resolve().parent
    ops: list[UpsertOp] = []
    wheres: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ProducerError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise ProducerError(f"{where}: each line must be a JSON object")
        raw_path = entry.get("path")
        if not isinstance(raw_path, str) or not raw_path:
            raise ProducerError(f"{where}: missing 'path'")
        video_id = entry.get("video_id")
        if video_id is not None and not isinstance(video_id, str):
            raise ProducerError(f"{where}: video_id must be a string")
        metadata = entry.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ProducerError(f"{where}: metadata must be an object")
        file_path = Path(raw_path)
        if not file_path.is_absolute():
            file_path = root / file_path
        ops.append(_file_op(file_path, video_id, {**metadata, **extra}, where))
        wheres.append(where)
    if not ops:
        raise ProducerError(f"manifest {path} has no entries")
    _check_unique(ops, wheres)
    return ops


def ops_for_delete(video_ids: Iterable[str]) -> list[DeleteOp]:
    try:
        return [DeleteOp(video_id) for video_id in video_ids]
    except MessageError as exc:
        raise ProducerError(f"--delete: {exc.reason}") from None


def _check_unique(ops: Sequence[UpsertOp], wheres: Sequence[str]) -> None:
    # Two entries with one id would silently overwrite each other in the index.
    seen: dict[str, str] = {}
    for op, where in zip(ops, wheres):
        if op.video_id in seen:
            raise ProducerError(f"{where}: video_id {op.video_id!r} also used by {seen[op.video_id]}")
        seen[op.video_id] = where


@dataclass
class PublishResult:
    sent: int
    topic: str
    bootstrap: str


def publish(bootstrap: str, topic: str, ops: Sequence[IngestOp], *, partitions: int,
            progress: bool | None = None, timeout_s: float = 30.0,
            max_request_bytes: int = 1_048_576, security: Mapping[str, Any] | None = None,
            create_topics: bool = True) -> PublishResult:
    """Produce ``ops`` with acks=all and wait until every one is acknowledged.

    The topic is created first if it is missing (brokers like Tansu don't auto-create);
    with ``create_topics=False`` (``broker.create_topics``) it must exist, and a missing one
    is a ProducerError naming it, before anything is sent. Raises ProducerError naming the
    bootstrap when the broker can't be reached.
    """
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm import tqdm

    from vidsearch.broker import BrokerError, TopicError, ensure_topics

    encoded: list[tuple[bytes, bytes]] = []
    for op in ops:
        try:
            encoded.append(encode_ingest_message(op))
        except MessageError as exc:
            raise ProducerError(f"video {op.video_id!r}: {exc.reason}") from None
    try:
        ensure_topics(bootstrap, [topic], partitions, timeout_s=min(timeout_s, 15.0), security=security,
                      create=create_topics)
    except TopicError as exc:  # the broker answered: the line names the topic and the bootstrap
        raise ProducerError(_first_line(exc)) from None
    except BrokerError as exc:
        raise ProducerError(f"cannot reach Kafka at {bootstrap}: {_first_line(exc)}") from None
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="vidsearch-ingest-cli",
                                 request_timeout_ms=int(timeout_s * 1000), linger_ms=5,
                                 max_request_size=max_request_bytes, **(security or {}))
    except KafkaError as exc:
        raise ProducerError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with tqdm(total=len(encoded), desc="ingest", unit="msg", file=sys.stderr, disable=not show) as bar:
            futures = []
            for key, value in encoded:
                future = producer.send(topic, key=key, value=value)
                # The bar counts acknowledgements (acks=all), not sends; tqdm locks internally,
                # so the producer's IO thread may update it.
                future.add_callback(lambda _metadata: bar.update(1))
                futures.append(future)
            producer.flush(timeout=timeout_s)
            for future in futures:
                # get() raises the send error, if any: that message was not acknowledged.
                future.get(timeout=timeout_s)
    except KafkaError as exc:
        raise ProducerError(f"publishing to {topic} on {bootstrap} failed: {exc}") from None
    finally:
        producer.close(timeout=5)
    log_event(log, "published ingest messages", topic=topic, bootstrap=bootstrap, count=len(encoded))
    return PublishResult(sent=len(encoded), topic=topic, bootstrap=bootstrap)


def check_ops(ops: Sequence[IngestOp], settings: Settings, *, local_files: bool = True) -> None:
    """Refuse, before anything is published, what the worker would send to the DLQ.

    Each message goes through the worker's own parser with ``settings.messages``
    (size, metadata depth/bytes/keys, strings, integers), and each local file is
    checked against ``decode.allowed_schemes``/``allowed_prefixes`` and the decode
    limits (bytes, then the container header: resolution and duration). Raises
    ProducerError naming the file and the setting.
    """
    from vidsearch.uris import VideoError
    from vidsearch.video import probe_video

    for op in ops:
        try:
            key, value = encode_ingest_message(op)
            parse_ingest_message(value, key, settings.messages)
        except MessageError as exc:
            raise ProducerError(f"video {op.video_id!r}: {exc.reason}") from None
        if not local_files or not isinstance(op, UpsertOp):
            continue
        try:
            probe_video(op.uri, settings.decode)
        except VideoError as exc:
            raise ProducerError(f"{_display_path(op.uri)}: {exc.reason} ({_setting_for(exc)}); "
                                "nothing was published") from None
        except OSError as exc:
            raise ProducerError(f"{_display_path(op.uri)}: cannot read it ({exc.strerror or exc}); "
                                "nothing was published") from None


def _display_path(uri: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(uri).path) if uri.startswith("file:") else uri


def _setting_for(exc: Exception) -> str:
    """The setting a decode refusal is about, for the one-line error."""
    import re

    from vidsearch.uris import NotAllowed

    reason = getattr(exc, "reason", str(exc))
    match = re.search(r"\b(max_bytes|max_pixels|max_duration_s|max_segments|max_decoded_mb)=", reason)
    if match:
        return f"decode.{match.group(1)}"
    if isinstance(exc, NotAllowed):
        return "decode.allowed_schemes" if "allowed_schemes" in reason else "decode.allowed_prefixes"
    return f"error class {getattr(exc, 'error_class', 'video_error')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
