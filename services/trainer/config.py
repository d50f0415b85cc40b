"""The training run config: one typed YAML file, validated once at the edge.

``load_run_config(path, overrides)`` returns a :class:`RunConfig` or raises
:class:`TrainingError` with one line naming the bad field. The validated config
is written back into the run directory (``run.yaml``) and into the published
manifest, so every model version says exactly how it was made, including the
TeachCLIP choices that papers leave implicit (see :class:`DistillStage`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TrainingError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    preset: str = Field("synth-small", description="model preset name or JSON config path (the student + teacher)")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local checkpoint to start from")
    init_from: str | None = Field(None, description="start from a registry version or alias (e.g. production) instead")
    scorer: dict[str, Any] | None = Field(
        None, description="replace the model's slow scorer with this scorer config (e.g. {kind: spatial, grid: 2}); "
        "with init_from, every other weight comes from that version and the new scorer starts untrained")


class DataSection(_Section):
    kind: Literal["synth", "msrvtt", "jsonl", "csv"] = "synth"
    path: str = Field(..., description="synth manifest (or its dir), MSR-VTT root, or the JSONL/CSV file")
    val_frac: float = Field(0.1, ge=0.0, lt=1.0, description="val share for sources without a val split")
    videos_dir: str | None = Field(None, description="MSR-VTT videos folder (default <root>/videos)")
    max_videos: int | None = Field(None, ge=2, description="use at most this many train videos (quick runs)")
    train_frames_factor: int = Field(2, ge=1, le=4, description="decode this many x num_frames for temporal jitter")
    frames: Literal["decode", "index"] = Field(
        "decode", description="decode the videos, or read the live index's stored frames (frozen frame tower only)")


class AugmentSection(_Section):
    enabled: bool = True
    crop_scale: tuple[float, float] = Field((0.8, 1.0), description="random resized crop area range")
    brightness: float = Field(0.08, ge=0, le=0.5, description="max brightness shift (keeps a colour's name)")
    channel_jitter: float = Field(0.04, ge=0, le=0.3, description="max per-channel gain change")
    background_shift: float = Field(0.0, ge=0, le=0.5, description="max tone shift of the pixels near a video's dominant colour")
    noise_std: float = Field(0.03, ge=0, le=0.5, description="gaussian pixel noise (0..1 scale)")
    temporal_jitter: bool = Field(True, description="sample frames near, not at, the uniform positions")
    views: int = Field(3, ge=1, le=16, description="augmented frame-feature views cached per train video after the backbone")


class StageBase(_Section):
    enabled: bool = True
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_frac: float = Field(0.1, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    hard_negatives: int = Field(2, ge=0, le=8, description="hard negatives (twins, mined neighbours) added per anchor")
    caption_negatives: int = Field(
        0, ge=0, le=4, description="counterfactual captions per video (one attribute of one event changed, or the "
        "events reversed) added as negatives on the video->text side; needs event annotations (synthetic data)")


class BackboneStage(StageBase):
    """Symmetric InfoNCE over frame tower + head + text tower, from pixels."""

    # Re-declared fields repeat StageBase's constraints: a bare default would drop them.
    lr: float = Field(2e-3, gt=0)
    steps: int = Field(1200, ge=1)
    phrase_weight: float = Field(
        0.0, ge=0, description="weight of the event-phrase InfoNCE: each event's own frames, through the head, "
        "against a wording of its phrase; needs events with times (synthetic data)")


class TeacherStage(StageBase):
    """The slow scorer on frozen frame features: InfoNCE over in-batch + hard negatives, plus a moment loss."""

    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    moment_weight: float = Field(0.5, ge=0, description="weight of the event-window loss that trains relevance_head")


class DistillStage(StageBase):
    """TeachCLIP: in_weight*l_IN + alpha*l_CgT + gamma*l_FgT for the whole student on frozen frame
    features: the head and the text tower (the frame tower is the index's frame encoder; training it
    would mean re-decoding every video). The defaults are the reference's weights (0.2, 1, 2)."""

    lr: float = Field(5e-4, gt=0)
    in_weight: float = Field(0.2, ge=0, description="InfoNCE weight (TeachCLIP's 0.2)")
    alpha: float = Field(1.0, ge=0, description="coarse-grained (CgT) weight (TeachCLIP's 1)")
    gamma: float = Field(2.0, ge=0, description="fine-grained (FgT) weight (TeachCLIP's 2)")
    train_text: bool = Field(True, description="train the text tower too (the teacher keeps its own frozen copy)")
    text_lr_scale: float = Field(0.1, gt=0, le=1, description="the text tower's learning rate as a share of lr")
    # TeachCLIP distils the teacher's frame relevance as it is (no sharpening): 1.0.
    fgt_teacher_temperature: float = Field(1.0, gt=0, description="temperature on the teacher's relevance for FgT")
    cgt_temperature: float = Field(1.0, gt=0, description="softmax temperature of both similarity matrices for CgT")
    baseline: bool = Field(True, description="also train a non-distilled student (same steps, IN only) for comparison")


class StagesSection(_Section):
    backbone: BackboneStage = BackboneStage()
    teacher: TeacherStage = TeacherStage()
    distill: DistillStage = DistillStage()


class FaultInjection(_Section):
    """TESTS ONLY: kill one worker once, to check that a run survives it."""

    stage: Literal["backbone", "teacher", "distill", "baseline"]
    after_steps: int = Field(..., ge=0, description="SIGKILL the worker once the stage has done this many steps")
    rank: int = Field(0, ge=0, description="which worker kills itself")
    lose_checkpoints: bool = Field(
        False, description="delete <run_dir>/checkpoints first, as if the restarted workers ran on a node that "
        "cannot see them: the run must resume from Ray Train's storage")


class ScalingSection(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(2, ge=1, description="CPU threads per worker")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (no effect on the CPU)")
    max_failures: int = Field(
        3, ge=0, description="worker failures (a killed or lost worker) Ray Train recovers from by restarting the "
        "workers from the last checkpoint; 0: the first failure ends the run")
    storage_path: str | None = Field(
        None, min_length=1, description="Ray Train's checkpoint storage for this run, a folder or URI every worker "
        "sees (default <run_dir>/ray; on several nodes, shared storage)")
    keep_checkpoints: int = Field(2, ge=1, description="Ray Train checkpoints kept in storage_path (newest first)")
    fault_injection: FaultInjection | None = Field(
        None, description="TESTS ONLY: SIGKILL one worker once at a given stage step (max_failures must allow it)")


# Scaling fields that say how a run survives failures, not what it trains.
RECOVERY_FIELDS = ("max_failures", "storage_path", "keep_checkpoints", "fault_injection")


class EvaluateSection(_Section):
    splits: list[Literal["val", "test"]] = ["val", "test"]
    rerank_k: list[int] = Field([10, 20, 50], description="recall depths re-ranked by the teacher")


class PublishSection(_Section):
    enabled: bool = True
    registry: str | None = Field(None, description="registry root (default: model.registry_root of the settings)")
    model_name: str | None = Field(None, description="registry model name (default: model.model_name)")
    gate_metric: str = Field("val.student.R@1", description="val metric that must beat production's")
    gate_min_delta: float = Field(0.0, ge=0, description="the least margin over production (points)")
    gate_se_k: float = Field(
        1.0, ge=0, description="the margin is max(gate_min_delta, gate_se_k x the metric's bootstrap standard "
        "error over val queries), so a win within the noise of the val set is not a win")
    gate_rerank_metric: str | None = Field(
        "auto", description="re-ranked val metric that must not drop below production's by more than its "
        "margin; auto: val.rerank@20.R@1 when evaluate.rerank_k has 20, else skipped; null: off")
    reindex: Literal["auto", "always", "never"] = Field(
        "auto", description="build videos__<new> and flip the alias after publishing (auto: when an index is live)")

    # The gate picks a model, so it may only read val: a test.* gate would tune the release
    # to the test split, and the test numbers would no longer be held out.
    @field_validator("gate_metric", "gate_rerank_metric")
    @classmethod
    def _val_only(cls, value: str | None, info: Any) -> str | None:
        if value is None or (info.field_name == "gate_rerank_metric" and value == "auto"):
            return value
        if not value.startswith("val."):
            raise ValueError(f"{value!r} is not a val metric; the gate reads only val.* (test.* stays held out)")
        if value.endswith((".MdR", ".MnR")):
            # The gate asks for higher values; a rank would read better as it got worse.
            raise ValueError(f"{value!r} is a rank (lower is better); gate on R@k instead")
        return value


class RunConfig(_Section):
    name: str = "run"
    seed: int = Field(0, ge=0)
    run_dir: str = Field("runs/run", description="checkpoints, run.yaml, report.md, metrics.json")
    checkpoint_every: int = Field(200, ge=1, description="steps between in-stage checkpoints")
    log_every: int = Field(25, ge=1, description="steps between progress log lines")
    eval_every: int = Field(200, ge=1, description="steps between val R@1 checks (the report's curve)")
    model: ModelSection = ModelSection()
    data: DataSection
    augment: AugmentSection = AugmentSection()
    stages: StagesSection = StagesSection()
    scaling: ScalingSection = ScalingSection()
    evaluate: EvaluateSection = EvaluateSection()
    publish: PublishSection = PublishSection()

    @model_validator(mode="after")
    def _checks(self) -> "RunConfig":
        low, high = self.augment.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError("augment.crop_scale: need 0 < low <= high <= 1")
        if any(k < 1 for k in self.evaluate.rerank_k):
            raise ValueError("evaluate.rerank_k: every depth must be >= 1")
        if not any(s.enabled for s in (self.stages.backbone, self.stages.teacher, self.stages.distill)):
            raise ValueError("stages: at least one stage must be enabled")
        if self.data.frames == "index" and self.stages.backbone.enabled:
            raise ValueError("data.frames: 'index' needs a frozen frame tower (stages.backbone.enabled: false)")
        workers = self.scaling.num_workers
        for name in ("backbone", "teacher", "distill"):
            stage = getattr(self.stages, name)
            if stage.enabled and stage.batch_size < workers:
                # Every worker embeds a shard of each batch; an empty shard has nothing to embed.
                raise ValueError(f"stages.{name}.batch_size: {stage.batch_size} is fewer than "
                                 f"scaling.num_workers ({workers})")
        fault = self.scaling.fault_injection
        if fault is not None:
            stage = self.stages.distill if fault.stage == "baseline" else getattr(self.stages, fault.stage)
            if not stage.enabled or (fault.stage == "baseline" and not self.stages.distill.baseline):
                raise ValueError(f"scaling.fault_injection.stage: {fault.stage} does not run in this config")
            if fault.after_steps >= stage.steps:
                raise ValueError(f"scaling.fault_injection.after_steps: {fault.after_steps} is not below the "
                                 f"stage's {stage.steps} steps")
            if fault.rank >= workers:
                raise ValueError(f"scaling.fault_injection.rank: {fault.rank} is not below scaling.num_workers "
                                 f"({workers})")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainingError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _one_line(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}" + (f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else "")


def parse_run_config(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
    merged = json.loads(json.dumps(dict(data)))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(merged, dotted, value)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise TrainingError(f"run config: {_one_line(exc)}") from None


def load_run_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config YAML; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TrainingError(f"run config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise TrainingError(f"run config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise TrainingError(f"run config {path}: must be a mapping of sections")
    # Relative data and run paths are relative to the config file, so a config runs from any cwd.
    base = path.resolve().parent
    for section, key in (("data", "path"), ("data", "videos_dir")):
        value = (data.get(section) or {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            data[section][key] = str(base / value)
    if isinstance(data.get("run_dir"), str) and not Path(data["run_dir"]).is_absolute():
        data["run_dir"] = str(base / data["run_dir"])
    scaling = data.get("scaling")
    storage = scaling.get("storage_path") if isinstance(scaling, dict) else None
    if isinstance(storage, str) and storage and "://" not in storage and not Path(storage).is_absolute():
        scaling["storage_path"] = str(base / storage)
    return parse_run_config(data, overrides)
