"""The Ray side of ingestion: the decode task and the frame-encoder actor pool.

Decoding runs as plain CPU tasks, so any number of them can spread over a
cluster; the frames they return stay in the object store and go straight to an
encoder actor (the driver never holds the pixels). Decode tasks already shrink
frames to the model's input size, so what travels is ~T x 224 x 224 x 3 bytes,
not full-resolution video.

Each encoder actor owns the serving model (GPU with bf16 autocast when the
cluster has one, CPU otherwise). One call encodes the frames of several videos in
one forward pass (the driver packs them), then aggregates each video with the head
of the model version the call names. An actor keeps the last
:data:`CACHED_VERSIONS` versions it was asked for, so a worker following an alias
flip encodes the batches captured before and after the flip each with its own
version; versions with the same ``frame_encoder`` id share one frame tower (only
the head and text side differ), a new ``frame_encoder`` loads its own.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import ray

from vidsearch.config import DecodeSettings, Settings

log = logging.getLogger(__name__)

# Tasks are retried by Ray when their worker process dies (system failures only);
# exceptions raised by our own code are data, see decode_frames.
DECODE_SYSTEM_RETRIES = 2
# Model versions one encoder actor keeps loaded (the live one and the one before a flip).
CACHED_VERSIONS = 2


@dataclass(frozen=True)
class DecodeMeta:
    """The small half of a decode result: the driver fetches this, never the frames."""

    ok: bool
    num_frames: int = 0  # distinct frames decoded (overlapping segments share frames)
    timestamps: tuple[float, ...] = ()  # of the distinct frames, seconds from the video's start
    # Per segment: its span and the indices (into the distinct frames) of its frames.
    windows: tuple[tuple[float, float], ...] = ()
    frame_index: tuple[tuple[int, ...], ...] = ()
    duration_s: float = 0.0
    width: int = 0
    height: int = 0
    fps: float | None = None
    codec: str = ""
    error_class: str = ""
    reason: str = ""
    transient: bool = False


@ray.remote(num_returns=2, max_retries=DECODE_SYSTEM_RETRIES)
def decode_frames(uri: str, settings: DecodeSettings, num_frames: int, resize_to: int) -> tuple[DecodeMeta, Any]:
    """Decode every segment window of ``uri`` in one pass -> (meta, distinct frames
    uint8[N,H,W,3] or None); ``meta.frame_index`` says which frames each segment has.

    Failures come back as values, not exceptions: a VideoError is permanent (DLQ),
    an OSError is transient (the file system or network hiccuped; retry). Anything
    else is a decoder bug for this input; it is reported as permanent so that one
    odd file cannot stall its partition, and the DLQ keeps it for replay.
    """
    from vidsearch.redact import redact, redact_uri
    from vidsearch.video import VideoError, decode_segments

    try:
        video = decode_segments(uri, settings, num_frames=num_frames, resize_to=resize_to)
    except VideoError as exc:
        return DecodeMeta(ok=False, error_class=exc.error_class, reason=exc.reason), None
    except OSError as exc:
        return DecodeMeta(ok=False, error_class="io_error", reason=redact(f"{redact_uri(uri)}: {exc}"),
                          transient=True), None
    except Exception as exc:  # noqa: BLE001 - see docstring
        return DecodeMeta(ok=False, error_class="decode_failed",
                          reason=redact(f"{redact_uri(uri)}: {type(exc).__name__}: {exc}")), None
    meta = DecodeMeta(ok=True, num_frames=int(video.frames.shape[0]),
                      timestamps=tuple(float(t) for t in video.timestamps),
                      windows=tuple((w.start_s, w.end_s) for w in video.windows), frame_index=video.frame_index,
                      duration_s=video.duration_s,
                      width=video.width, height=video.height, fps=video.fps, codec=video.codec)
    return meta, video.frames


class EncodedVideo(NamedTuple):
    """One video's encoder output: a vector per segment, its distinct frames, and (for a model
    whose scorer reads them) each frame's region tokens."""

    vectors: np.ndarray  # float32[S, D]
    frames: np.ndarray  # float32[N, D]
    regions: np.ndarray | None  # float32[N, G, W]


@dataclass(frozen=True)
class EncoderInfo:
    """What the driver needs to know about the serving model, without loading it."""

    model_version: str
    frame_encoder_id: str
    embed_dim: int
    image_size: int  # shorter side decode tasks resize to
    num_frames: int  # frames per video the model was configured with
    max_frames: int  # most frames the head and scorer can take
    device: str
    region_dim: int | None = None  # width of the region tokens the model's scorer reads (None: none)
    region_encoder: str | None = None  # what fixes them (VideoTextModel.region_encoder_id)


def frames_per_video(decode: DecodeSettings, info: EncoderInfo) -> int:
    """Frames to sample per video for a model: its own frame count (uniform) or the cap
    (fps), never more than the head/scorer position embeddings or the decode limit allow."""
    wanted = info.num_frames if decode.sampling == "uniform" else decode.max_frames
    return max(1, min(wanted, info.max_frames, decode.max_frames))


@dataclass(frozen=True)
class EncodeTarget:
    """What one ingest batch is encoded for and written to: one model version (its frame
    tower and head), the decode shape that version wants, and its collection."""

    version: str
    collection: str
    info: EncoderInfo
    num_frames: int

    @property
    def resize_to(self) -> int:
        return self.info.image_size

    @property
    def frame_encoder(self) -> str:
        return self.info.frame_encoder_id


class FrameEncoder:
    """Ray actor: the frame tower + head of one or a few model versions on one device.

    ``version`` None loads the serving model (the registry's production, or the base
    model); any other version is loaded by id with ``load_model_for_version``.
    """

    def __init__(self, settings: Settings, version: str | None = None) -> None:
        import torch

        self._torch = torch
        self._settings = settings
        if version is None:
            from vidsearch.models.persist import load_serving_model

            model, version = load_serving_model(settings)
        else:
            model = self._load(version)
        model.eval()
        self.version = version  # the default: what a call naming no version uses
        self._models: OrderedDict[str, Any] = OrderedDict([(version, model)])
        self.batch_frames = settings.ingest.encoder_batch_frames

    @property
    def model(self) -> Any:
        return self._model(None)

    def _load(self, version: str) -> Any:
        from vidsearch.model_versions import load_model_for_version

        return load_model_for_version(self._settings, version).eval()

    def _model(self, version: str | None) -> Any:
        version = version or self.version
        if version in self._models:
            self._models.move_to_end(version)
            return self._models[version]
        model = self._load(version)
        for other in self._models.values():
            # Same frame-encoder id = same frame tower by contract (that is what lets a
            # re-index keep the stored frames): keep one copy of it on the device.
            if other.frame_encoder_id == model.frame_encoder_id and other.config.clip == model.config.clip:
                model.clip.visual = other.clip.visual
                break
        self._models[version] = model
        while len(self._models) > CACHED_VERSIONS:
            self._models.popitem(last=False)
        log.info("encoder actor loaded model version %s (frame encoder %s)", version, model.frame_encoder_id)
        return model

    def info(self, version: str | None = None) -> EncoderInfo:
        model = self._model(version)
        config = model.config
        size = model.image_size
        limits = [config.scorer.max_frames] + ([config.head.max_frames] if config.head.kind != "meanP" else [])
        return EncoderInfo(
            model_version=version or self.version, frame_encoder_id=model.frame_encoder_id,
            embed_dim=int(model.embed_dim), image_size=int(size if isinstance(size, int) else max(size)),
            num_frames=int(config.num_frames), max_frames=int(min(limits)), device=str(model.device),
            region_dim=int(model.region_width) if model.uses_regions else None,
            region_encoder=model.region_encoder_id)

    def prepare(self, version: str) -> EncoderInfo:
        """Load ``version`` now (before a worker switches to it) and describe it."""
        return self.info(version)

    def versions(self) -> list[str]:
        return list(self._models)

    def encode(self, *videos: np.ndarray, version: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Frames of several videos -> per video (video_vector[D], frames[T,D]), float32,
        with ``version``'s frame tower and head (default: the actor's default version).

        Frames of all videos go through the image tower together, ``batch_frames``
        at a time, so small videos still fill the device.
        """
        windows = [(tuple(range(int(v.shape[0]))),) for v in videos]
        return [(out.vectors[0], out.frames) for out in self.encode_segments(*videos, windows=windows,
                                                                             version=version)]

    def encode_segments(self, *videos: np.ndarray, windows: list[tuple[tuple[int, ...], ...]],
                        version: str | None = None) -> list[EncodedVideo]:
        """Distinct frames of several videos, and per video the frame indices of each of
        its segments -> per video an EncodedVideo (segment vectors [S,D], frames [N,D] and,
        when the version's scorer reads them, region tokens [N,G,W]), float32.

        Every distinct frame goes through the image tower once (overlapping segments
        share frames), region tokens come from the same pass; the head then aggregates
        each segment from its own frames.
        """
        torch = self._torch
        model = self._model(version)
        if len(windows) != len(videos):
            raise ValueError(f"{len(windows)} segment lists for {len(videos)} videos")
        counts = [int(v.shape[0]) for v in videos]
        with torch.inference_mode():
            # Preprocess per video: videos may differ in aspect ratio, the output never does.
            pixels = torch.cat([model.preprocess(v) for v in videos])
            chunks = [model.encode_frames_and_regions(pixels[i:i + self.batch_frames])
                      for i in range(0, pixels.shape[0], self.batch_frames)]
            features = torch.cat([frames for frames, _ in chunks])
            per_video = list(torch.split(features, counts))
            regions = (list(torch.split(torch.cat([cells for _, cells in chunks]), counts))
                       if model.uses_regions else [None] * len(videos))
            rows = [(v, index) for v, segments in enumerate(windows) for index in segments]
            longest = max(len(index) for _, index in rows)
            padded = features.new_zeros((len(rows), longest, features.shape[-1]))
            mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=features.device)
            for row, (v, index) in enumerate(rows):
                padded[row, :len(index)] = per_video[v][list(index)]
                mask[row, :len(index)] = True
            vectors = model.aggregate(padded, mask).float().cpu().numpy()
        out, start = [], 0
        for v, segments in enumerate(windows):
            cells = None if regions[v] is None else regions[v].float().cpu().numpy()
            out.append(EncodedVideo(vectors[start:start + len(segments)], per_video[v].float().cpu().numpy(), cells))
            start += len(segments)
        return out


def use_gpu(settings: Settings) -> bool:
    """GPU actors when the cluster has a GPU (the driver itself may be CPU-only) and the
    model device setting allows it."""
    if settings.model.device == "cpu" or settings.ingest.encoder_num_gpus <= 0:
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


class EncoderPool:
    """``settings.ingest.encoder_actors`` FrameEncoder actors with the same default model
    version (``version``, or the serving model when None); ``info`` describes it."""

    def __init__(self, settings: Settings, actors: int | None = None, *, startup_timeout_s: float = 600.0,
                 version: str | None = None) -> None:
        count = actors or settings.ingest.encoder_actors
        gpu = use_gpu(settings)
        options: dict[str, Any] = {
            # A crashed actor comes back (reloading the model); calls that were running
            # on it fail with RayActorError and the pipeline resubmits their videos.
            "max_restarts": -1, "max_task_retries": 0,
            "num_cpus": 1,
        }
        if gpu:
            options["num_gpus"] = settings.ingest.encoder_num_gpus
        actor_class = ray.remote(FrameEncoder)
        self.actors = [actor_class.options(**options).remote(settings, version) for _ in range(count)]
        infos: list[EncoderInfo] = ray.get([a.info.remote() for a in self.actors], timeout=startup_timeout_s)
        versions = {i.model_version for i in infos}
        if len(versions) != 1:
            # The production alias moved while the actors were loading; a restart settles it.
            self.close()
            raise RuntimeError(f"encoder actors loaded different model versions: {sorted(versions)}")
        self.info = infos[0]
        self.gpu = gpu
        self.outstanding = [0] * count

    def prepare(self, version: str) -> list[Any]:
        """Start loading ``version`` on every actor; the refs resolve to its EncoderInfo
        (or raise when it can't be loaded). Nothing waits here."""
        return [actor.prepare.remote(version) for actor in self.actors]

    def pick(self) -> int:
        """Index of the actor with the fewest calls in flight."""
        return min(range(len(self.actors)), key=lambda i: self.outstanding[i])

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.actors = []
