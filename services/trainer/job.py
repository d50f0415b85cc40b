"""The driver side of ``vidsearch train``: data, caches, Ray Train, report.

1. validate the dataset (every URI against the decode allowlist, every caption)
   before anything is decoded, and fail with one line;
2. decode each split once into the frame caches (``<run_dir>/cache``);
3. run :func:`worker.train_loop` on a ``TorchTrainer`` with the configured
   workers (one CPU worker, the local Ray, or ``RAY_ADDRESS`` unchanged), checkpointing
   to Ray Train's storage and restarting the workers from the last checkpoint after a
   worker failure (``scaling.max_failures``, :mod:`recovery`);
4. read back the final weights and metrics and write ``report.md``.

Gating, publishing and re-indexing follow in :mod:`publish`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidsearch.config import Settings
from vidsearch.telemetry import log_event

from .config import RECOVERY_FIELDS, RunConfig
from .datasets import DatasetSource, TrainingVideo, data_hash, load_dataset, split_videos, trusting_dataset_root
from .errors import TrainingError
from .frames import build_cache
from .gate import val_data_hash
from .index_frames import cache_index_frames
from .recovery import RAY_RUN_NAME, clear_abort, storage_path
from .worker import FINAL_DIR, train_loop

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    config: RunConfig
    model_config: dict[str, Any]
    weights: Path
    frame_encoder: str
    metrics: dict[str, float]
    logs: dict[str, Any]
    data_hash: str
    parent_frame_encoder: str
    data_info: dict[str, Any]
    # sha256 of the val split's (video_id, captions) (gate.val_data_hash): the gate compares
    # against production's recorded metrics only when production's hash is the same.
    val_data_hash: str | None = None
    # The serving fusion weight the run's rerank rows were computed with; the gate
    # re-evaluates production with the same one.
    beta: float | None = None


def _model_config(cfg: RunConfig, settings: Settings) -> tuple[Any, Any, Path | None, str | None]:
    """(ModelConfig, a built model for its input size, init weights file, init version)."""
    from safetensors.torch import save_file

    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import load_model_version
    from vidsearch.registry import ModelRegistry, RegistryError

    if cfg.model.init_from:
        registry = ModelRegistry(cfg.publish.registry or settings.model.registry_root)
        name = cfg.publish.model_name or settings.model.model_name
        try:
            model, manifest = load_model_version(registry, name, cfg.model.init_from, device="cpu")
        except (RegistryError, ValueError) as exc:
            raise TrainingError(f"model.init_from {cfg.model.init_from!r}: {exc}") from None
        scorer = _scorer_for_run(cfg, model.config)
        if scorer != model.config.scorer.__dict__:
            model = _with_scorer(model, scorer, cfg.seed, fresh_scorer=cfg.model.scorer is not None)
        init = Path(cfg.run_dir) / "init.safetensors"
        save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(init))
        return model.config, model, init, manifest.version
    try:
        config = load_model_config(cfg.model.preset)
        if cfg.model.pretrained:
            config = config.with_pretrained(cfg.model.pretrained)
        config = _replace_scorer(config, _scorer_for_run(cfg, config))
        model = build_model(config, device="cpu", seed=cfg.seed)
    except (ValueError, OSError, RuntimeError) as exc:
        raise TrainingError(f"model: {str(exc).splitlines()[0]}") from None
    return config, model, None, None


def _replace_scorer(config: Any, scorer: dict[str, Any]) -> Any:
    from vidsearch.models import ModelConfig

    try:
        return ModelConfig.from_dict({**config.to_dict(), "scorer": dict(scorer)})
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"model.scorer: {exc}") from None


def _scorer_for_run(cfg: RunConfig, config: Any) -> dict[str, Any]:
    """The scorer config the run trains: ``model.scorer`` when given, else the model's own; with
    ``own_text`` switched on when distillation trains the student's text tower (the teacher
    must keep the text tower it was trained on)."""
    scorer = dict(cfg.model.scorer) if cfg.model.scorer is not None else dict(config.scorer.__dict__)
    if cfg.stages.distill.enabled and cfg.stages.distill.train_text:
        scorer["own_text"] = True
    return scorer


def _with_scorer(model: Any, scorer: dict[str, Any], seed: int, *, fresh_scorer: bool) -> Any:
    """``model`` (from a registry version) rebuilt with another scorer config. The frame tower, head
    and text tower keep their weights (and the frame encoder its id); the scorer keeps its weights
    too unless ``fresh_scorer`` (another kind of scorer starts untrained)."""
    from vidsearch.models import build_model

    config = _replace_scorer(model.config, scorer)
    rebuilt = build_model(config, device="cpu", seed=seed, load_weights=False)
    kept = {k: v for k, v in model.state_dict().items() if not (fresh_scorer and k.startswith("scorer."))}
    state = rebuilt.state_dict()
    unknown = set(kept) - set(state)
    if unknown:
        raise TrainingError(f"model.scorer: the new scorer has no place for {sorted(unknown)[0]}")
    rebuilt.load_state_dict({**state, **kept}, strict=True)
    # New copies for the scorer (where the version had none) are the student's as it is now;
    # copies the version has are the ones its teacher was trained with, and stay.
    new = set(state) - set(kept)
    rebuilt.freeze_teacher_view(text=any(k.startswith("scorer_text.") for k in new),
                                head=any(k.startswith("scorer_head.") for k in new))
    rebuilt.frame_encoder_id = model.frame_encoder_id
    return rebuilt


def _split_record(videos: list[TrainingVideo]) -> dict[str, Any]:
    return {"video_ids": [v.video_id for v in videos], "captions": [list(v.captions) for v in videos],
            "events": [list(v.events) for v in videos], "hard_negatives": [list(v.hard_negatives) for v in videos]}


def prepare_data(cfg: RunConfig, settings: Settings, image_size: int, num_frames: int,
                 progress: bool, frame_encoder: str = "") -> tuple[dict[str, Any], str]:
    source = DatasetSource(kind=cfg.data.kind, path=cfg.data.path, val_frac=cfg.data.val_frac,
                           videos_dir=cfg.data.videos_dir)
    decode = trusting_dataset_root(settings.decode, source)
    videos = load_dataset(source, decode, require_files=cfg.data.frames == "decode")
    splits = {name: split_videos(videos, name) for name in ("train", "val", "test")}
    if cfg.data.max_videos:
        splits["train"] = splits["train"][:cfg.data.max_videos]
    if len(splits["train"]) < 2:
        raise TrainingError(f"the train split has {len(splits['train'])} video(s); contrastive training needs >= 2")
    if len(splits["train"]) < cfg.scaling.num_workers:
        raise TrainingError(f"the train split has {len(splits['train'])} videos, fewer than scaling.num_workers "
                            f"({cfg.scaling.num_workers}): every worker needs a shard of each batch")
    # The config allows only val.* gate metrics (PublishSection), so the gate needs a val split.
    if cfg.publish.enabled and (not splits["val"] or "val" not in cfg.evaluate.splits):
        raise TrainingError(f"publish.gate_metric {cfg.publish.gate_metric!r} needs an evaluated val split, "
                            f"and the dataset has {len(splits['val'])} val video(s) "
                            f"(evaluate.splits: {', '.join(cfg.evaluate.splits) or 'none'})")
    cache_dir = Path(cfg.run_dir) / "cache"
    threads = max(1, min(8, os.cpu_count() or 1))
    data: dict[str, Any] = {}
    for name, members in splits.items():
        if not members:
            continue
        record = _split_record(members)
        if cfg.data.frames == "index":
            if name == "train" or name in cfg.evaluate.splits:
                record["feature_cache"] = str(cache_index_frames(settings, members, frame_encoder, num_frames,
                                                                 cache_dir, name))
            data[name] = record
            continue
        if name == "train":
            record["train_cache"] = str(build_cache(members, decode, frames=num_frames * cfg.data.train_frames_factor,
                                                    size=image_size, cache_dir=cache_dir, label="train",
                                                    threads=threads, progress=progress).path)
        if name in cfg.evaluate.splits:
            record["eval_cache"] = str(build_cache(members, decode, frames=num_frames, size=image_size,
                                                   cache_dir=cache_dir, label=f"{name}-eval",
                                                   threads=threads, progress=progress).path)
        data[name] = record
    return data, data_hash([v for m in splits.values() for v in m])


def _ensure_ray(settings: Settings, cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = settings.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = settings.ray.num_cpus or max(os.cpu_count() or 1, cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1)
        # Ray Train's controller polls the state API, which the dashboard serves (loopback only);
        # without it every poll logs a warning.
        ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


def _run_trainer(cfg: RunConfig, loop_config: dict[str, Any]) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # A TrainingError an earlier command recorded must not stop this one (it may fix the cause).
    clear_abort(Path(cfg.run_dir))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        # One fixed name per storage path: a re-run of the command finds the run's checkpoints again.
        run_config=RayRunConfig(name=RAY_RUN_NAME, storage_path=storage_path(cfg),
                                failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                                checkpoint_config=CheckpointConfig(num_to_keep=cfg.scaling.keep_checkpoints)),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps the worker's exception; surface its own one line
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = str(cause).strip().splitlines()
        message = next((line for line in reversed(text) if "TrainingError" in line), text[-1] if text else repr(cause))
        raise TrainingError(f"training failed: {message.split('TrainingError:', 1)[-1].strip()}") from exc


def run_training(cfg: RunConfig, settings: Settings, *, progress: bool = True, log_level: str = "INFO") -> TrainResult:
    """Everything up to (not including) publishing; resumes a run directory that has checkpoints."""
    run_dir = Path(cfg.run_dir).resolve()
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    run_dir.mkdir(parents=True, exist_ok=True)
    finished = _finished_with_same_config(run_dir, cfg)
    (run_dir / "run.yaml").write_text(cfg.to_yaml())
    model_config, model, init, init_version = _model_config(cfg, settings)
    size = model.image_size if isinstance(model.image_size, int) else min(model.image_size)
    data, digest = prepare_data(cfg, settings, size, model_config.num_frames, progress, model.frame_encoder_id)
    data_file = run_dir / "data.json"
    data_file.write_text(json.dumps(data))
    loop_config = {"run": cfg.to_dict(), "model_config": model_config.to_dict(), "seed": cfg.seed,
                   "data_file": str(data_file), "beta": settings.serve.beta, "log_level": log_level,
                   "init_weights": str(init) if init else None, "init_frame_encoder": model.frame_encoder_id}
    log_event(log, "training started", run_dir=str(run_dir), workers=cfg.scaling.num_workers,
              train=len(data["train"]["video_ids"]), val=len(data.get("val", {}).get("video_ids", [])),
              test=len(data.get("test", {}).get("video_ids", [])))
    if finished:
        # Every stage and the evaluation are done for exactly this config (publish settings
        # aside): go straight to publishing instead of evaluating again.
        log_event(log, "run already finished; using its final weights and metrics", run_dir=str(run_dir))
    else:
        _ensure_ray(settings, cfg)
        _run_trainer(cfg, loop_config)
    final = run_dir / FINAL_DIR
    if not (final / "metrics.json").is_file():
        raise TrainingError(f"training finished without writing {final / 'metrics.json'}")
    result = json.loads((final / "metrics.json").read_text())
    return TrainResult(run_dir=run_dir, config=cfg, model_config=model_config.to_dict(),
                       weights=final / "model.safetensors", frame_encoder=result["frame_encoder"],
                       metrics=result["metrics"], logs=json.loads((final / "logs.json").read_text()),
                       data_hash=digest, parent_frame_encoder=model.frame_encoder_id, data_info=_data_info(cfg),
                       val_data_hash=val_data_hash(data["val"]) if "val" in data else None, beta=settings.serve.beta)


def _finished_with_same_config(run_dir: Path, cfg: RunConfig) -> bool:
    """True when ``run_dir`` holds a finished run (final metrics written) whose recorded config
    equals ``cfg`` in everything but the publish section."""
    import yaml

    recorded, final = run_dir / "run.yaml", run_dir / FINAL_DIR / "metrics.json"
    if not (recorded.is_file() and final.is_file()) or final.stat().st_mtime < recorded.stat().st_mtime:
        return False
    try:
        before = yaml.safe_load(recorded.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(before, dict) and _trained_by(before) == _trained_by(cfg.to_dict())


def _trained_by(config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run config that decide what is trained: not publishing, and not how the run
    survives failures (a run.yaml written before those settings existed compares equal)."""
    kept = {k: v for k, v in config.items() if k != "publish"}
    if isinstance(kept.get("scaling"), dict):
        kept["scaling"] = {k: v for k, v in kept["scaling"].items() if k not in RECOVERY_FIELDS}
    return kept


def _data_info(cfg: RunConfig) -> dict[str, Any]:
    """The synthetic generator's arguments (synth.json), so the dataset can be rebuilt exactly."""
    if cfg.data.kind != "synth":
        return {"kind": cfg.data.kind}
    from vidsearch.synth import INFO_NAME

    root = Path(cfg.data.path)
    info = (root if root.is_dir() else root.parent) / INFO_NAME
    try:
        return {"kind": "synth", **json.loads(info.read_text())}
    except (OSError, ValueError):
        return {"kind": "synth"}
