"""Zero-downtime re-index: build ``videos__<version>`` for a model version, flip the alias.

``reindex(settings, version)`` fills the collection of ``version`` from the live one
(the collection the store alias points at), flips the alias to it, points the
registry's ``production`` at it and drops collections past ``store.keep_collections``.
``rollback(settings)`` is the same migration towards an older version.

How each point is converted (per point, by its payload's ``frame_encoder``):

* **Same frame encoder** as the target version: the stored ``frames`` multivector is
  kept and only the ``video`` vector is recomputed with the target version's head
  (``model.aggregate(frames, mask)``), in this process. No video is decoded.
* **Another frame encoder**: the video is decoded again from its stored ``uri`` with
  the ingest pipeline's own decode tasks and frame-encoder actors (loaded with the
  target version), like an ingest. A uri that no longer decodes is reported in
  :attr:`ReindexReport.failed` and skipped (its video is not in the new index).

A long video is several points, one per segment (see ``vidsearch.segments``); it is
converted whole: each segment's ``video`` vector from that segment's own stored
frames, its segment payload (``segment``, ``segment_count``, ``start_s``, ``end_s``)
carried over, and the target's stale tail segments trimmed by the store's upsert.

Either way the payload is kept (``ingested_at`` too: it is when the video was ingested)
with ``model_version`` (and ``frame_encoder``, frame timestamps, size ... for a
re-decoded video) updated.

Writes that happen during the migration: **catch-up passes, not dual-write.** Ingest
workers keep writing the live collection only; the re-index converges on it:

1. Before the flip, passes make the target mirror the source: each pass lists both
   collections' ``(video_id, ingested_at)``, converts every source point that is new
   or whose ``ingested_at`` differs from the target's copy, and deletes target points
   whose video is gone from the source (a delete during the migration never survives).
   The first pass does the bulk; passes repeat (at most ``MAX_CATCHUP_PASSES``) until
   one finds nothing to do, so the flip happens with a near-empty backlog.
2. The alias is flipped (one atomic Qdrant alias operation: a search sees the old or
   the new collection, never none).
3. Ingest workers check the alias every ``serve.alias_poll_s``; a batch they captured
   before noticing the flip may still land in the old collection. For
   ``store.reindex_grace_s`` after the flip, passes copy those late writes: a source
   point whose ``ingested_at`` changed since it was mirrored and is newer than the
   target's copy, and a delete of a mirrored point the target still holds unchanged.
   A final pass runs when the grace is over. Workers apply deletes to their previous
   collection as well, so a late copy can't revive a video deleted after the flip.

Why catch-up rather than dual-write: it needs no coordination with the workers (no
migration flag every worker must see before the bulk copy may start), it costs
ingestion nothing outside the flip (dual-write would encode every video twice during
the whole migration when the frame encoder changes), and it is the same code for the
first pass, the catch-ups and a rollback onto a collection that already exists. Its
price is one id/ingest-time listing of both collections per pass, and a bound: the
grace must exceed the time a worker takes to notice the flip plus one store write.
The worker's side of that bound: it checks the alias every ``serve.alias_poll_s``, and
once it noticed a move it stops taking records, loads the new version, re-encodes the
batches it had not written yet and writes only the new collection from then on.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from vidsearch.config import Settings
from vidsearch.store_schema import REGION_CODEC_FIELD, REGION_ENCODER_FIELD, collection_name, model_version_of
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

PRODUCTION_ALIAS = "production"
# Registry alias the re-index sets to the version that was live before its flip.
PREVIOUS_ALIAS = "previous"
BASE_PREFIX = "base-"
# Catch-up passes before the flip after the first one (each stops early when idle).
MAX_CATCHUP_PASSES = 3
# Points per listing page and per conversion chunk.
SCAN_BATCH = 512
CONVERT_BATCH = 128
# How often late writes are looked for during the grace after the flip.
POST_FLIP_INTERVAL_S = 0.5
# Re-decoding one chunk gives up on videos still unfinished after this long (a uri
# failing transiently forever must not hang the re-index): base + per video.
REDECODE_TIMEOUT_S = 300.0
REDECODE_TIMEOUT_PER_VIDEO_S = 30.0


class ReindexError(RuntimeError):
    """The re-index or rollback can't run (unknown version, nothing live ...); one line."""


@dataclass(frozen=True)
class FailedVideo:
    """A video that could not be converted and is not in the new collection."""

    video_id: str
    uri: str
    error_class: str
    reason: str


@dataclass
class ReindexReport:
    """What a re-index (or rollback) did."""

    version: str
    collection: str
    previous_collection: str | None = None
    previous_version: str | None = None
    points: int = 0  # points in the new collection at the end
    from_frames: int = 0  # video vectors recomputed from stored frames (nothing decoded)
    decoded: int = 0  # videos sent to the decode tasks again (another frame encoder)
    deleted: int = 0  # deletes made during the migration, applied to the new collection
    late: int = 0  # points copied after the flip (late writes to the old collection)
    passes: int = 0  # passes over both collections, before and after the flip
    failed: list[FailedVideo] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # collections dropped by retention
    production: str | None = None  # the registry's production alias afterwards
    already_live: bool = False
    flipped_at: float | None = None  # time.time() of the alias flip
    seconds: float = 0.0

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        if self.already_live:
            return (f"{self.collection} is already live ({self.points} points); "
                    f"production = {self.production or '-'}")
        lines = [
            f"re-indexed {self.previous_collection} -> {self.collection} in {self.seconds:.1f}s; "
            f"alias flipped, production = {self.production or '-'}",
            f"  points: {self.points} ({self.from_frames} from stored frames, {self.decoded} decoded again, "
            f"{self.late} late writes copied after the flip, {self.deleted} deletes applied, "
            f"{self.passes} passes)",
        ]
        if self.failed:
            lines.append(f"  skipped {len(self.failed)} video(s) that could not be decoded:")
            lines += [f"    {f.video_id} {f.uri}: {f.error_class}: {f.reason[:200]}" for f in self.failed]
        if self.dropped:
            lines.append(f"  dropped old collections: {', '.join(self.dropped)}")
        return "\n".join(lines)


PassHook = Callable[[str, ReindexReport], None]


# --------------------------------------------------------------------------- versions

def _registry(settings: Settings) -> Any:
    from vidsearch.registry import ModelRegistry, RegistryError

    try:
        return ModelRegistry(settings.model.registry_root)
    except RegistryError as exc:
        raise ReindexError(str(exc)) from None


def resolve_version(settings: Settings, ref: str, registry: Any = None) -> str:
    """A version id for ``ref``: a registry version id or alias, or a ``base-<hash>``
    base model version (what an index built before anything was published uses)."""
    from vidsearch.registry import RegistryError

    if not isinstance(ref, str) or not ref.strip():
        raise ReindexError("version must be a non-empty version id or registry alias")
    if ref.startswith(BASE_PREFIX):
        try:
            collection_name(ref)
        except ValueError as exc:
            raise ReindexError(str(exc)) from None
        return ref
    registry = registry or _registry(settings)
    try:
        return registry.resolve(settings.model.model_name, ref)
    except RegistryError as exc:
        raise ReindexError(_one_line(exc)) from None


def _version_of(collection: str | None, alias: str) -> str | None:
    if collection is None:
        return None
    try:
        return model_version_of(collection, alias)
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_model(settings: Settings, version: str, registry: Any) -> Any:
    from vidsearch.model_versions import ModelVersionError, load_model_for_version

    try:
        return load_model_for_version(settings, version, registry)
    except ModelVersionError as exc:
        raise ReindexError(_one_line(exc)) from None


def _max_frames(model: Any) -> int:
    config = model.config
    limits = [config.scorer.max_frames] + ([config.head.max_frames] if config.head.kind != "meanP" else [])
    return int(min(limits))


# --------------------------------------------------------------------------- re-decoding

class _Redecoder:
    """Decode tasks + frame-encoder actors of the ingest pipeline, loaded with the
    target version, driven to completion for one chunk of videos at a time."""

    def __init__(self, settings: Settings, version: str) -> None:
        from vidsearch.services.ingest.encoder import EncoderPool, frames_per_video
        from vidsearch.services.ingest.metrics import IngestMetrics
        from vidsearch.services.ingest.pipeline import Pipeline
        from vidsearch.services.ingest.worker import ensure_ray

        ensure_ray(settings)
        ingest = settings.ingest
        self.pool = EncoderPool(settings, version=version)
        info = self.pool.info
        if info.model_version != version:  # pragma: no cover - EncoderPool loads what it is told
            raise ReindexError(f"encoder actors loaded {info.model_version}, not {version}")
        self.frame_encoder = info.frame_encoder_id
        self.pipeline = Pipeline(
            self.pool, settings.decode, num_frames=frames_per_video(settings.decode, info),
            resize_to=info.image_size, parallelism=ingest.decode_parallelism,
            batch_frames=ingest.encoder_batch_frames, retry_initial_s=ingest.retry_initial_s,
            retry_max_s=ingest.retry_max_s, metrics=IngestMetrics())

    def run(self, videos: list[Any]) -> list[tuple[Any, Any]]:
        """[(stored video, Encoded | FailedVideo)] in the order given."""
        from vidsearch.messages import MessageError, UpsertOp
        from vidsearch.services.ingest.batch import Batch, Item
        from vidsearch.store_schema import source_uri

        batch = Batch()
        for offset, video in enumerate(videos):
            item = Item(batch, "reindex", 0, offset, None, None)
            payload = video.payload
            try:
                # The full uri when ingest kept it apart (credentials): decoding needs it.
                item.op = UpsertOp(video.video_id, source_uri(payload), dict(payload.get("metadata") or {}))
            except MessageError as exc:
                item.fail(exc.error_class, exc.reason)
            batch.items.append(item)
        self.pipeline.submit(batch.items)
        deadline = time.monotonic() + REDECODE_TIMEOUT_S + REDECODE_TIMEOUT_PER_VIDEO_S * len(videos)
        while True:
            self.pipeline.pump()
            waiting = [item for item in batch.items if item.needs_work]
            if not waiting:
                break
            if time.monotonic() > deadline:
                for item in waiting:
                    item.fail("timeout", "still not decoded and encoded when the re-index gave up on it")
                batch.revoked.add(("reindex", 0))  # the pipeline forgets what is left of it
                self.pipeline.drop_revoked()
                break
            self.pipeline.wait(0.1)
        out: list[tuple[Any, Any]] = []
        for video, item in zip(videos, batch.items):
            if item.failed:
                out.append((video, FailedVideo(video.video_id, str(video.payload.get("uri", "")),
                                               item.error_class or "failed", item.reason or "")))
            else:
                out.append((video, item.encoded))
        return out

    def close(self) -> None:
        self.pool.close()


# --------------------------------------------------------------------------- migration

class _Migration:
    """Converges ``target`` on ``source`` (see the module docstring for the rules)."""

    def __init__(self, settings: Settings, store: Any, source: str, target: str, version: str, model: Any,
                 report: ReindexReport, progress: bool) -> None:
        self.settings = settings
        self.store = store
        self.source = source
        self.target = target
        self.version = version
        self.model = model
        self.frame_encoder = model.frame_encoder_id
        self.max_frames = _max_frames(model)
        self.report = report
        self.progress = progress
        # video_id -> ingested_at of the source point the target holds a copy of.
        self.mirror: dict[str, str] = {}
        # video_id -> ingested_at of a source point that could not be converted.
        self.failed: dict[str, str] = {}
        self._redecoder: _Redecoder | None = None

    def close(self) -> None:
        if self._redecoder is not None:
            self._redecoder.close()
            self._redecoder = None

    # ---- listing ---------------------------------------------------------------
    def _listing(self, collection: str) -> dict[str, str]:
        listing: dict[str, str] = {}
        for page in self.store.scroll(collection, batch_size=SCAN_BATCH):
            for video in page:
                listing[video.video_id] = str(video.payload.get("ingested_at") or "")
        return listing

    # ---- one pass --------------------------------------------------------------
    def sync(self, *, after_flip: bool, label: str) -> int:
        """One pass; returns how many points it changed in the target."""
        source, target = self._listing(self.source), self._listing(self.target)
        if not after_flip:
            # Before the flip only this re-index writes the target: make it a mirror.
            copy = [v for v, at in source.items()
                    if self.failed.get(v) != at and target.get(v) != at]
            delete = [v for v in target if v not in source
                      or (self.failed.get(v) == source[v] and target[v] != source[v])]
            for v, at in source.items():
                if target.get(v) == at:
                    self.mirror[v] = at
        else:
            # After the flip the workers write the target: copy only what changed in the
            # source since it was mirrored (a late write) and is newer than the target's
            # copy, and delete only mirrored copies the workers have not rewritten.
            copy = [v for v, at in source.items()
                    if self.mirror.get(v) != at and self.failed.get(v) != at
                    and (v not in target or target[v] < at)]
            delete = [v for v, at in self.mirror.items()
                      if v not in source and target.get(v) == at]
        if delete:
            self.store.delete(self.target, delete)
            for v in delete:
                self.mirror.pop(v, None)
            self.report.deleted += len(delete)
        copied = self._convert(copy, label) if copy else 0
        if after_flip:
            self.report.late += copied
        self.report.passes += 1
        log_event(log, "re-index pass", pass_=label, source=self.source, target=self.target,
                  source_points=len(source), copied=copied, deleted=len(delete))
        return copied + len(delete)

    # ---- conversion ------------------------------------------------------------
    def _convert(self, video_ids: list[str], label: str) -> int:
        from tqdm import tqdm

        written = 0
        with tqdm(total=len(video_ids), desc=f"reindex {label}", unit="video", file=sys.stderr,
                  disable=not self.progress) as bar:
            for start in range(0, len(video_ids), CONVERT_BATCH):
                chunk = video_ids[start:start + CONVERT_BATCH]
                # Every segment of each video. Missing ones were deleted meanwhile: the
                # next pass sees that.
                segments = self.store.get_segments(self.source, chunk, with_vectors=True)
                by_video: dict[str, list[Any]] = {}
                for segment in segments:
                    by_video.setdefault(segment.video_id, []).append(segment)
                keep, redo = [], []
                for parts in by_video.values():
                    # A video is converted whole: from its stored frames when every
                    # segment allows it, else decoded again (once for all its segments).
                    same = all(p.payload.get("frame_encoder") == self.frame_encoder and p.frames is not None
                               and len(p.frames) <= self.max_frames and self._regions_fit(p) for p in parts)
                    if same:
                        keep.extend(parts)
                    else:
                        redo.append(parts[0])
                points = self._from_frames(keep) + self._redecode(redo)
                if points:
                    self.store.upsert(self.target, points)
                    for point in points:
                        self.mirror[point.video_id] = str(point.payload.get("ingested_at") or "")
                written += len(points)
                bar.update(len(chunk))
        return written

    def _regions_fit(self, point: Any) -> bool:
        """Stored region tokens serve the target version: it reads none, or they come from the
        same frame tower, grid and width (else the video is decoded again)."""
        if not self.model.uses_regions:
            return True
        return point.regions is not None and point.payload.get(REGION_ENCODER_FIELD) == self.model.region_encoder_id

    def _payload(self, video: Any, **updates: Any) -> dict[str, Any]:
        payload = {**video.payload, "model_version": self.version, **updates}
        if not self.model.uses_regions:
            payload.pop(REGION_ENCODER_FIELD, None)
            payload.pop(REGION_CODEC_FIELD, None)
        return payload

    def _from_frames(self, videos: list[Any]) -> list[Any]:
        import torch

        from vidsearch.store import VideoPoint

        if not videos:
            return []
        frames = [np.asarray(v.frames, dtype=np.float32) for v in videos]
        longest = max(f.shape[0] for f in frames)
        padded = np.zeros((len(frames), longest, frames[0].shape[1]), dtype=np.float32)
        mask = np.zeros((len(frames), longest), dtype=bool)
        for row, f in enumerate(frames):
            padded[row, :f.shape[0]] = f
            mask[row, :f.shape[0]] = True
        with torch.inference_mode():
            vectors = self.model.aggregate(torch.from_numpy(padded), torch.from_numpy(mask)).float().cpu().numpy()
        carry = self.model.uses_regions
        points = [VideoPoint(v.video_id, vectors[row], frames[row], self._payload(v),
                             regions=v.regions if carry else None)
                  for row, v in enumerate(videos)]
        self.report.from_frames += len(points)
        return points

    def _redecode(self, videos: list[Any]) -> list[Any]:
        if not videos:
            return []
        if self._redecoder is None:
            log_event(log, "re-index: starting decode tasks and encoder actors", version=self.version,
                      frame_encoder=self.frame_encoder)
            self._redecoder = _Redecoder(self.settings, self.version)
        self.report.decoded += len(videos)
        points = []
        for video, result in self._redecoder.run(videos):
            if not isinstance(result, FailedVideo):
                try:
                    # Segment fields and frame times come from the new decode (the same
                    # windows unless the segment settings changed).
                    # The new decode's tokens are this version's: name their encoder (never the
                    # source point's, which may have had another grid or width).
                    regions = {REGION_ENCODER_FIELD: self.model.region_encoder_id} if self.model.uses_regions else {}
                    points.extend(result.points(video.video_id, self._payload(
                        video, frame_timestamps=list(result.timestamps), duration_s=result.duration_s,
                        width=result.width, height=result.height, fps=result.fps, codec=result.codec,
                        frame_encoder=self._redecoder.frame_encoder, **regions)))
                    continue
                except ValueError as exc:
                    result = FailedVideo(video.video_id, str(video.payload.get("uri", "")), "encode_failed", str(exc))
            self.report.failed.append(result)
            self.failed[video.video_id] = str(video.payload.get("ingested_at") or "")
            log_event(log, "re-index skipped a video", logging.WARNING, video_id=result.video_id,
                      uri=result.uri, error_class=result.error_class, reason=result.reason[:300])
        return points


# --------------------------------------------------------------------------- retention

def _age_key(version: str) -> tuple[int, str]:
    # Registry versions sort by time (YYYYmmddTHHMMSS-...); base models are the oldest.
    return (0 if version.startswith(BASE_PREFIX) else 1, version)


def apply_retention(settings: Settings, store: Any, protected: Iterable[str]) -> list[str]:
    """Drop index collections beyond ``store.keep_collections``, newest kept first.

    ``protected`` (the live collection and the rollback targets) is never dropped,
    even when that keeps more than the setting asks. Returns the dropped names.
    """
    from vidsearch.store import StoreError

    alias, keep = settings.store.alias, settings.store.keep_collections
    versions = {c: v for c in store.list_collections() if (v := _version_of(c, alias)) is not None}
    live = store.resolve_alias(alias)
    kept = [c for c in dict.fromkeys([live, *protected]) if c in versions]
    dropped = []
    for collection in sorted(versions, key=lambda c: _age_key(versions[c]), reverse=True):
        if collection in kept:
            continue
        if len(kept) < keep:
            kept.append(collection)
            continue
        try:
            if store.delete_collection(collection):
                dropped.append(collection)
        except StoreError as exc:
            log_event(log, "could not drop an old collection", logging.WARNING, collection=collection,
                      error=_one_line(exc))
    if dropped:
        log_event(log, "old collections dropped", dropped=dropped, kept=kept)
    return dropped


def rollback_targets(settings: Settings, version: str, registry: Any = None) -> list[str]:
    """The versions a rollback from ``version`` would go to: its manifest's parent, then
    the registry's ``previous`` alias (each only when published, or a base version)."""
    from vidsearch.registry import RegistryError

    registry = registry or _registry(settings)
    name = settings.model.model_name
    found: list[str] = []
    candidates: list[str | None] = []
    if not version.startswith(BASE_PREFIX):
        try:
            candidates.append(registry.get_manifest(name, version).parent)
        except RegistryError:
            pass  # no readable manifest: no parent to offer, the alias below may still be one
    try:
        candidates.append(registry.get_alias(name, PREVIOUS_ALIAS))
    except RegistryError:
        pass  # no "previous" alias yet (nothing was ever flipped)
    for candidate in candidates:
        if not candidate or candidate == version or candidate in found:
            continue
        try:
            found.append(resolve_version(settings, candidate, registry))
        except ReindexError:
            continue
    return found


# --------------------------------------------------------------------------- the commands

def _set_production(settings: Settings, registry: Any, version: str, previous_version: str | None) -> str | None:
    """Registry: ``production`` -> version; ``previous`` -> what was live before (or the
    production before, when that was a base model). Base versions are not registry
    versions: for those production stays where it is."""
    from vidsearch.registry import RegistryError

    name = settings.model.model_name
    try:
        before = registry.get_alias(name, PRODUCTION_ALIAS)
        if not version.startswith(BASE_PREFIX) and before != version:
            registry.set_alias(name, PRODUCTION_ALIAS, version)
        if previous_version and not previous_version.startswith(BASE_PREFIX):
            previous = previous_version
        else:
            previous = before
        if previous and previous != version:
            registry.set_alias(name, PREVIOUS_ALIAS, previous)
        return registry.get_alias(name, PRODUCTION_ALIAS)
    except RegistryError as exc:
        raise ReindexError(f"the registry could not be updated: {_one_line(exc)}") from None


def reindex(settings: Settings, version: str, *, progress: bool = True, on_pass: PassHook | None = None,
            grace_s: float | None = None) -> ReindexReport:
    """Build ``videos__<version>`` from the live collection and make it live.

    ``version``: a registry version id or alias (``production``), or a ``base-<hash>``
    version. ``on_pass(label, report)`` is called after every pass ("pass 1", "catch-up
    2" ..., "after flip N", "final"); ``grace_s`` overrides ``store.reindex_grace_s``.
    Raises :class:`ReindexError` with a one-line reason.
    """
    from vidsearch.store import StoreError, open_store

    started = time.monotonic()
    registry = _registry(settings)
    version = resolve_version(settings, version, registry)
    alias = settings.store.alias
    target = collection_name(version, alias)
    grace = settings.store.reindex_grace_s if grace_s is None else grace_s
    try:
        store = open_store(settings)
    except StoreError as exc:
        raise ReindexError(f"cannot open the vector store: {_one_line(exc)}") from None
    try:
        try:
            source = store.resolve_alias(alias)
        except StoreError as exc:
            raise ReindexError(f"cannot read the store alias {alias!r}: {_one_line(exc)}") from None
        if source is None:
            raise ReindexError(f"alias {alias!r} points at no collection: nothing to re-index (ingest videos first)")
        report = ReindexReport(version=version, collection=target, previous_collection=source,
                               previous_version=_version_of(source, alias))
        if source == target:
            report.already_live = True
            report.production = _set_production(settings, registry, version, None)
            report.points = store.count(target)
            report.seconds = time.monotonic() - started
            return report
        model = _load_model(settings, version, registry)
        log_event(log, "re-index started", source=source, target=target, version=version,
                  frame_encoder=model.frame_encoder_id)
        migration = _Migration(settings, store, source, target, version, model, report, progress)
        try:
            _migrate(settings, store, registry, migration, report, on_pass, grace)
        except StoreError as exc:
            raise ReindexError(f"vector store failed during the re-index: {_one_line(exc)}") from None
        finally:
            migration.close()
        protected = [target, source, *(collection_name(v, alias) for v in rollback_targets(settings, version, registry))]
        report.dropped = apply_retention(settings, store, protected)
        report.points = store.count(target)
    finally:
        store.close()
    report.seconds = time.monotonic() - started
    log_event(log, "re-index done", target=target, points=report.points, from_frames=report.from_frames,
              decoded=report.decoded, failed=len(report.failed), late=report.late, deleted=report.deleted,
              passes=report.passes, dropped=report.dropped, seconds=round(report.seconds, 2))
    return report


def _migrate(settings: Settings, store: Any, registry: Any, migration: _Migration, report: ReindexReport,
             on_pass: PassHook | None, grace: float) -> None:
    def run_pass(label: str, after_flip: bool) -> int:
        changed = migration.sync(after_flip=after_flip, label=label)
        if on_pass is not None:
            on_pass(label, report)
        return changed

    alias = settings.store.alias
    store.ensure_collection(migration.target, migration.model.embed_dim, migration.model.embed_dim,
                            migration.model.region_width if migration.model.uses_regions else None)
    run_pass("pass 1", after_flip=False)
    for number in range(2, MAX_CATCHUP_PASSES + 2):
        if run_pass(f"catch-up {number}", after_flip=False) == 0:
            break
    live = store.resolve_alias(alias)
    if live != migration.source:
        raise ReindexError(f"alias {alias!r} moved to {live} during the re-index (another re-index or "
                           "rollback?); nothing was flipped, run it again")
    store.set_alias(migration.target, alias)
    report.flipped_at = time.time()
    log_event(log, "alias flipped", alias=alias, collection=migration.target, previous=migration.source)
    report.production = _set_production(settings, registry, migration.version, report.previous_version)
    deadline = time.monotonic() + grace
    number = 1
    while time.monotonic() < deadline:
        time.sleep(min(POST_FLIP_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        run_pass(f"after flip {number}", after_flip=True)
        number += 1
    run_pass("final", after_flip=True)


def rollback(settings: Settings, to: str | None = None, *, progress: bool = True,
             on_pass: PassHook | None = None, grace_s: float | None = None) -> ReindexReport:
    """Make an earlier version live again: ``to``, or the live version's manifest
    ``parent``, or the registry's ``previous`` alias. Its collection is caught up with
    what was ingested and deleted since (or re-built when retention dropped it), then
    the alias flips back, exactly like :func:`reindex`."""
    from vidsearch.store import StoreError, open_store

    registry = _registry(settings)
    alias = settings.store.alias
    try:
        with open_store(settings) as store:
            live = store.resolve_alias(alias)
    except StoreError as exc:
        raise ReindexError(f"cannot read the store alias {alias!r}: {_one_line(exc)}") from None
    if live is None:
        raise ReindexError(f"alias {alias!r} points at no collection: nothing to roll back")
    current = _version_of(live, alias)
    if current is None:
        raise ReindexError(f"alias {alias!r} points at {live!r}, which is not a '{alias}__<version>' collection")
    if to is not None:
        target = resolve_version(settings, to, registry)
    else:
        targets = rollback_targets(settings, current, registry)
        if not targets:
            raise ReindexError(f"live version {current} has no parent and no previous production to roll "
                               "back to; name one with --to VERSION")
        target = targets[0]
    if target == current:
        raise ReindexError(f"version {target} is already live")
    log_event(log, "rollback", live=current, to=target)
    return reindex(settings, target, progress=progress, on_pass=on_pass, grace_s=grace_s)
