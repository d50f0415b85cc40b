"""The per-worker training loop that Ray Train's TorchTrainer runs: every stage, then evaluation.

Each worker rebuilds the same model from the same seed, reads the frame caches the
driver wrote (memory-mapped), and trains its shard of every global batch; rank 0
writes checkpoints, the final weights and the metrics into the run directory, and
every checkpoint is reported to Ray Train, so a restarted worker group resumes from it
(:mod:`recovery`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from vidsearch.models import VideoTextModel, build_model
from vidsearch.models.scorers import MAX_LOGIT_SCALE
from vidsearch.telemetry import configure_logging, log_event

from .batches import BatchPlan, merge_neighbours, twin_neighbours
from .config import DistillStage, RunConfig
from .errors import TrainingError
from .evaluate import EvalSet, evaluate_model, flatten_metrics, moment_accuracy, shares_teacher, teacher_matrix
from .frames import open_cache
from .index_frames import open_feature_cache
from .recovery import fault_injector, raise_recorded_abort, ray_reporter, record_abort, restore_ray_checkpoint
from .runner import StageContext, load_stage_state, run_stage
from .stages import (STAGE_IDS, CaptionBank, FrozenFeatures, backbone_loss, distill_loss, encode_cache,
                     mine_neighbours, teacher_loss, text_tower_parameters)

log = logging.getLogger(__name__)

FINAL_DIR = "final"
BASELINE_HEAD_FILE = "baseline_head.safetensors"
MINED_NEGATIVES = 4


def _set_trainable(model: VideoTextModel, *modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    for param in model.parameters():
        param.requires_grad_(False)
    params = []
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(True)
            params.append(param)
    return params


def _student_parameters(model: VideoTextModel, stage: DistillStage) -> tuple[list[torch.nn.Parameter], dict[int, float]]:
    """What distillation trains: the head, and the text tower at its own rate when ``train_text``
    (the frame tower stays: it is the index's frame encoder)."""
    params = _set_trainable(model, model.head)
    if not stage.train_text:
        return params, {}
    text = text_tower_parameters(model)
    for param in text:
        param.requires_grad_(True)
    return params + text, {id(p): stage.text_lr_scale for p in text}


def _clamp_temperatures(model: VideoTextModel) -> None:
    with torch.no_grad():
        model.clip.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
    model.scorer.clamp_temperatures_()


def _start_teacher_at_student_temperature(model: VideoTextModel) -> None:
    """The teacher's score starts as the student's cosine, so it starts at the temperature the
    backbone learned for it (CLIP's 100 makes an untrained teacher confidently wrong, and Adam
    moves a log-temperature by only ~lr per step)."""
    scale = getattr(model.scorer, "logit_scale", None)
    # The spatial scorer's score stands alone (no cosine to share a temperature with).
    if isinstance(scale, torch.nn.Parameter) and scale.dim() == 0 and not model.uses_regions:
        with torch.no_grad():
            scale.copy_(model.clip.logit_scale.detach())


def visual_weights_id(model: VideoTextModel) -> str:
    """sha256 of the frame tower's weights: a trained frame tower is a new frame encoder."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.clip.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def _bank(split: dict[str, Any]) -> CaptionBank:
    return CaptionBank(captions=[list(c) for c in split["captions"]], events=[list(e) for e in split["events"]])


def _features_of(split: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored frame features (data.frames=index): no decoding, no frame tower."""
    frames, mask, times = open_feature_cache(split["feature_cache"])
    return torch.from_numpy(frames), torch.from_numpy(mask), torch.from_numpy(times)


def _check_index_features(model: VideoTextModel) -> None:
    if model.uses_regions:
        raise TrainingError("data.frames=index: the index stores no region tokens for a spatial scorer to "
                            "train on; use data.frames=decode")


def _eval_set(model: VideoTextModel, split: dict[str, Any], seed: int) -> EvalSet:
    regions = None
    if "feature_cache" in split:
        _check_index_features(model)
        frames, mask, times = _features_of(split)
    else:
        encoded = encode_cache(model, open_cache(split["eval_cache"]), model.config.num_frames, None, seed, 0)
        frames, mask, times, regions = encoded.frames, encoded.mask, encoded.times, encoded.regions
    index = {vid: i for i, vid in enumerate(split["video_ids"])}
    twins = [[(index[n["video_id"]], n["relation"]) for n in negs if n["video_id"] in index]
             for negs in split["hard_negatives"]]
    return EvalSet(video_ids=split["video_ids"], frames=frames, mask=mask, bank=_bank(split), twins=twins,
                   times=times, regions=regions)


def _train_features(model: VideoTextModel, cfg: RunConfig, split: dict[str, Any]) -> FrozenFeatures:
    if "feature_cache" in split:
        _check_index_features(model)
        clean = _features_of(split)
        return FrozenFeatures(*clean, views=clean[0][None], view_mask=clean[1][None], view_times=clean[2][None])
    cache = open_cache(split["train_cache"])
    num_frames = model.config.num_frames
    clean = encode_cache(model, cache, num_frames, None, cfg.seed, 0)
    views = [encode_cache(model, cache, num_frames, cfg.augment, cfg.seed, v + 1)
             for v in range(cfg.augment.views)] if cfg.augment.enabled else [clean]
    return FrozenFeatures(clean.frames, clean.mask, clean.times, views=torch.stack([v.frames for v in views]),
                          view_mask=torch.stack([v.mask for v in views]),
                          view_times=torch.stack([v.times for v in views]), regions=clean.regions,
                          view_regions=None if clean.regions is None else torch.stack([v.regions for v in views]))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point (``train_loop_per_worker``); Ray Train runs it again on every
    worker after a worker failure, and it resumes from the last checkpoint."""
    import ray.train

    configure_logging(loop_config.get("log_level", "INFO"))
    context = ray.train.get_context()
    cfg = RunConfig.model_validate(loop_config["run"])
    run_dir = Path(cfg.run_dir)
    raise_recorded_abort(run_dir)
    try:
        _train(loop_config, cfg, context.get_world_rank(), context.get_world_size(), context.get_local_rank())
    except TrainingError as exc:
        record_abort(run_dir, exc)
        raise


def _train(loop_config: dict[str, Any], cfg: RunConfig, rank: int, world: int, local_rank: int) -> None:
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    device = f"cuda:{local_rank}" if cfg.scaling.use_gpu else "cpu"
    if cfg.scaling.use_gpu:
        torch.cuda.set_device(device)  # the device NCCL's object collectives (checkpoint broadcast) use
    run_dir = Path(cfg.run_dir)
    data = json.loads(Path(loop_config["data_file"]).read_text())
    model = _initial_model(loop_config, device)
    frame_encoder = model.frame_encoder_id
    restore_ray_checkpoint(run_dir, rank)
    ctx = StageContext(run_dir=run_dir, rank=rank, world=world, checkpoint_every=cfg.checkpoint_every,
                       log_every=cfg.log_every, eval_every=cfg.eval_every, on_checkpoint=ray_reporter(run_dir, rank),
                       before_step=fault_injector(cfg, run_dir, rank))
    train = data["train"]
    bank = _bank(train)
    twins = twin_neighbours(train["video_ids"], train["hard_negatives"])
    logs: dict[str, Any] = {}
    stages = cfg.stages

    def after_step() -> None:
        _clamp_temperatures(model)

    val = data.get("val") if {"eval_cache", "feature_cache"} & set(data.get("val", {})) else None

    def val_r1(which: str, target: VideoTextModel | None = None, reencode: bool = False) -> Callable[[], float] | None:
        """A val R@1 probe for the report's curves (frames re-encoded when the frame tower trains)."""
        if val is None:
            return None
        cached: list[EvalSet] = []

        def probe() -> float:
            subject = target or model
            if reencode or not cached:
                cached[:] = [_eval_set(subject, val, cfg.seed)]
            rows = evaluate_model(subject, cached[0], rerank_k=(), beta=0.0, teacher=which == "teacher")
            return rows[which]["R@1"]
        return probe

    if stages.backbone.enabled:
        params = _set_trainable(model, model.clip, model.head)
        plan = BatchPlan(len(bank.captions), stages.backbone.batch_size, stages.backbone.hard_negatives,
                         twins, cfg.seed, STAGE_IDS["backbone"])
        loss = backbone_loss(model, open_cache(train["train_cache"]), bank, plan, stages.backbone, cfg.augment,
                             cfg.seed, rank, world)
        logs["backbone"] = run_stage("backbone", stages.backbone, model, params, loss, ctx, after_step=after_step,
                                     evaluate=val_r1("student", reencode=True)).to_dict()
        frame_encoder = f"{':'.join(model.frame_encoder_id.split(':')[:2])}:trained:{visual_weights_id(model)}"
    _set_trainable(model)
    model.eval()
    features = _train_features(model, cfg, train)
    mined = mine_neighbours(model, features, bank, MINED_NEGATIVES)
    neighbours = merge_neighbours(twins, mined)

    if stages.teacher.enabled:
        # The scorer's own text tower and head are the student's as the teacher is trained on
        # them; a teacher checkpoint, when resumed, restores the same weights. Without a teacher
        # stage the scorer keeps the copies it was trained with.
        model.freeze_teacher_view()
        if load_stage_state(ctx, "teacher") is None:
            _start_teacher_at_student_temperature(model)
        params = _set_trainable(model, model.scorer)
        plan = BatchPlan(len(bank.captions), stages.teacher.batch_size, stages.teacher.hard_negatives,
                         neighbours, cfg.seed, STAGE_IDS["teacher"])
        loss = teacher_loss(model, features, bank, plan, stages.teacher, cfg.seed, rank, world)
        logs["teacher"] = run_stage("teacher", stages.teacher, model, params, loss, ctx, after_step=after_step,
                                    evaluate=val_r1("teacher")).to_dict()

    baseline: VideoTextModel | None = None
    if stages.distill.enabled:
        if stages.distill.baseline:
            baseline = copy.deepcopy(model)
        # A frozen copy teaches: with scorer.base=head the teacher's score builds on the head,
        # which is what distillation moves.
        teacher = copy.deepcopy(model).eval()
        params, scales = _student_parameters(model, stages.distill)
        plan = BatchPlan(len(bank.captions), stages.distill.batch_size, stages.distill.hard_negatives,
                         neighbours, cfg.seed, STAGE_IDS["distill"])
        loss = distill_loss(model, teacher, features, bank, plan, stages.distill, cfg.seed, rank, world)
        logs["distill"] = run_stage("distill", stages.distill, model, params, loss, ctx, after_step=after_step,
                                    evaluate=val_r1("student"), lr_scales=scales).to_dict()
        if baseline is not None:
            params, scales = _student_parameters(baseline, stages.distill)
            loss = distill_loss(baseline, baseline, features, bank, plan, stages.distill, cfg.seed, rank, world,
                                distil=False)
            logs["baseline"] = run_stage("baseline", stages.distill, baseline, params, loss, ctx,
                                         evaluate=val_r1("student", target=baseline), lr_scales=scales).to_dict()
    _set_trainable(model)

    if rank == 0:
        metrics = _evaluate(model, baseline, data, cfg, loop_config["beta"])
        _write_final(run_dir, model, frame_encoder, metrics, logs, baseline)
    if world > 1:
        torch.distributed.barrier()


def _initial_model(loop_config: dict[str, Any], device: str) -> VideoTextModel:
    from vidsearch.models import ModelConfig

    init = loop_config.get("init_weights")
    config = ModelConfig.from_dict(loop_config["model_config"])
    model = build_model(config, device="cpu", seed=loop_config["seed"], load_weights=init is None)
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init), strict=True)
        model.frame_encoder_id = loop_config["init_frame_encoder"]
    return model.to(device)


def _evaluate(model: VideoTextModel, baseline: VideoTextModel | None, data: dict[str, Any], cfg: RunConfig,
              beta: float) -> dict[str, float]:
    # Imported here: this function and _write_final are the gate's part of this module.
    from .gate import BASELINE_PREFIX, query_ranks, rerank_gate_metric, se_metrics, split_metric

    # The rows the gate reads get bootstrap standard errors (val only: the gate reads only val).
    gate_rows = {"student"}
    for name in (cfg.publish.gate_metric, rerank_gate_metric(cfg.publish.gate_rerank_metric, cfg.evaluate.rerank_k)):
        parsed = split_metric(name) if name else None
        if parsed is not None:
            gate_rows.add(parsed[1].removeprefix(BASELINE_PREFIX))
    metrics: dict[str, float] = {}
    for split in cfg.evaluate.splits:
        if split not in data or not ({"eval_cache", "feature_cache"} & set(data[split])):
            continue
        eval_set = _eval_set(model, data[split], cfg.seed)
        # The teacher matrix (every caption x every video through the slow scorer) is the costly
        # part: computed once per split, and shared with the baseline when it has the same teacher.
        slow = teacher_matrix(model, eval_set, eval_set.queries()[0])
        metrics.update(flatten_metrics(split, evaluate_model(model, eval_set, rerank_k=cfg.evaluate.rerank_k,
                                                             beta=beta, slow=slow)))
        metrics.update({f"{split}.{k}": v for k, v in moment_accuracy(model, eval_set).items()})
        if split == "val":
            metrics.update(se_metrics(split, query_ranks(model, eval_set, gate_rows, beta, slow=slow)))
        if baseline is not None:
            # Evaluated as fully as the distilled student (its own teacher rows too: with
            # scorer.base=head the re-ranker builds on the head), since it may be the one published.
            base_set = _eval_set(baseline, data[split], cfg.seed)
            base_slow = slow if shares_teacher(model, baseline) else teacher_matrix(baseline, base_set,
                                                                                   base_set.queries()[0])
            rows = evaluate_model(baseline, base_set, rerank_k=cfg.evaluate.rerank_k, beta=beta, slow=base_slow)
            metrics.update(flatten_metrics(split, rows, prefix=BASELINE_PREFIX))
            metrics.update({f"{split}.{BASELINE_PREFIX}{k}": v for k, v in moment_accuracy(baseline, base_set).items()})
            if split == "val":
                metrics.update(se_metrics(split, query_ranks(baseline, base_set, gate_rows, beta, slow=base_slow),
                                          prefix=BASELINE_PREFIX))
        log_event(log, "evaluated", split=split, **{k.split(".", 1)[1]: round(v, 2) for k, v in metrics.items()
                                                     if k.startswith(split) and k.endswith("R@1")})
    return metrics


def _write_final(run_dir: Path, model: VideoTextModel, frame_encoder: str, metrics: dict[str, float],
                 logs: dict[str, Any], baseline: VideoTextModel | None) -> None:
    from .gate import BASELINE_MODEL_FILE

    final = run_dir / FINAL_DIR
    final.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(final / "model.safetensors"))
    if baseline is not None:
        # The non-distilled head, so benchmarks can compare it on other data (heads are small),
        # and the whole baseline model: publish ships it when it beats the distilled student on
        # val, and it may differ from the distilled one in more than the head.
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in baseline.head.state_dict().items()},
                  str(final / BASELINE_HEAD_FILE))
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in baseline.state_dict().items()},
                  str(final / BASELINE_MODEL_FILE))
    (final / "logs.json").write_text(json.dumps(logs))
    (final / "metrics.json").write_text(json.dumps({"frame_encoder": frame_encoder, "metrics": metrics}, indent=2))
