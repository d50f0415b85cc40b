"""Gate, publish and (optionally) re-index a finished run.

The gate (:func:`check_gate`) reads val metrics only (the config refuses ``test.*``)
and must not be fooled by them:

- **the published student** is the better on val R@1 of the distilled student and the
  non-distilled baseline trained beside it (:func:`select_student`); the gate and the
  manifest describe that one;
- **same data**: production's recorded metrics count only when its manifest's
  ``val_data_hash`` equals this run's; otherwise production is loaded from the registry
  and re-evaluated on this run's val data, and when that cannot be done the gate refuses,
  naming both hashes;
- **a margin above the noise**: the new value must beat production's by more than
  ``max(gate_min_delta, gate_se_k x SE)``, SE being the metric's bootstrap standard error
  over val queries (recorded by the worker as ``<metric>.se``);
- **re-ranking must not regress**: the re-ranked metric (``gate_rerank_metric``) may not fall
  below production's by more than its own margin.

Each refusal is a :class:`GateRefused` with one line (the CLI exits 3 with it). Publishing
is the registry's atomic publish (weights, report and plots, then the manifest); the
``production`` alias moves only after the new index is live, which :func:`reindex` does
(or directly, when there is no index to rebuild).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file

from vidsearch.config import Settings
from vidsearch.models import ModelConfig, VideoTextModel, build_model
from vidsearch.models.persist import BASE_SEED, PRODUCTION_ALIAS, load_model_version
from vidsearch.registry import ModelRegistry, RegistryError
from vidsearch.telemetry import log_event

from .errors import TrainingError
from .evaluate import evaluate_model, flatten_metrics
from .frames import open_cache
from .gate import BASELINE_MODEL_FILE, SE_SUFFIX, published_metrics, rerank_gate_metric
from .job import TrainResult
from .worker import BASELINE_HEAD_FILE, _eval_set

log = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "losses.png", "val_r1.png")
# The distilled and the baseline student are compared on this (the brief of the gate).
CHOICE_METRIC = "val.student.R@1"
BASELINE_CHOICE_METRIC = "val.baseline_student.R@1"


class GateRefused(TrainingError):
    """The new model did not beat production on the gate metric."""


@dataclass
class PublishOutcome:
    version: str
    parent: str | None
    gate: dict[str, Any]
    reindexed: bool
    note: str


@dataclass
class Candidate:
    """The student a run publishes: ``distilled`` or ``baseline``, its metrics under the plain
    names (gate.published_metrics) and the comparison that chose it."""

    which: str
    metrics: dict[str, float]
    choice: dict[str, Any]


def _registry(result: TrainResult, settings: Settings) -> tuple[ModelRegistry, str]:
    publish = result.config.publish
    return (ModelRegistry(publish.registry or settings.model.registry_root),
            publish.model_name or settings.model.model_name)


def select_student(result: TrainResult) -> Candidate:
    """The distilled student, unless the baseline trained beside it is strictly better on val R@1."""
    distilled, baseline = result.metrics.get(CHOICE_METRIC), result.metrics.get(BASELINE_CHOICE_METRIC)
    # A tie keeps the distilled student: it is the model the run was configured to make.
    which = "baseline" if distilled is not None and baseline is not None and baseline > distilled else "distilled"
    choice = {"metric": CHOICE_METRIC, "distilled": distilled, "baseline": baseline, "published": which}
    if which == "baseline":
        log_event(log, "the baseline student beats the distilled one on val; publishing the baseline",
                  distilled=round(distilled, 2), baseline=round(baseline, 2))
    return Candidate(which=which, metrics=published_metrics(result.metrics, which), choice=choice)


def candidate_weights(result: TrainResult, which: str) -> dict[str, torch.Tensor]:
    """The state dict of the chosen student. Runs from before ``baseline_model.safetensors``
    saved only the baseline's head: its full model is then the final weights with that head."""
    state = load_file(str(result.weights))
    if which != "baseline":
        return state
    final = result.weights.parent
    if (final / BASELINE_MODEL_FILE).is_file():
        return load_file(str(final / BASELINE_MODEL_FILE))
    if not (final / BASELINE_HEAD_FILE).is_file():
        raise TrainingError(f"the baseline student was chosen, but {final} has neither {BASELINE_MODEL_FILE} "
                            f"nor {BASELINE_HEAD_FILE}")
    for key, value in load_file(str(final / BASELINE_HEAD_FILE)).items():
        if f"head.{key}" not in state:
            raise TrainingError(f"{final / BASELINE_HEAD_FILE}: head.{key} is not a tensor of the final model")
        state[f"head.{key}"] = value
    return state


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none recorded"


def _encodable(model: VideoTextModel, split: dict[str, Any], feature_encoder: str) -> str | None:
    """Why ``model`` cannot be evaluated on this run's val cache, or None when it can."""
    if "feature_cache" in split:
        # Stored index features are one frame encoder's output; another tower's head cannot read them.
        if model.frame_encoder_id != feature_encoder:
            return f"its frame encoder {model.frame_encoder_id} did not make the val features ({feature_encoder})"
        return None
    if "eval_cache" not in split:
        return "this run has no val frame cache"
    frames = open_cache(split["eval_cache"]).frames  # [N,F,S,S,3]
    size = model.image_size if isinstance(model.image_size, int) else tuple(model.image_size)
    if size not in (frames.shape[2], (frames.shape[2], frames.shape[3])):
        return f"its frame encoder takes {size} px frames and the val cache holds {frames.shape[2]} px"
    if model.config.num_frames != frames.shape[1]:
        return f"it takes {model.config.num_frames} frames a video and the val cache holds {frames.shape[1]}"
    return None


def _reevaluate(result: TrainResult, registry: ModelRegistry, name: str, production: str,
                production_hash: str | None, needed: list[str], beta: float) -> dict[str, float]:
    """Production's ``needed`` val metrics, measured now on this run's val data."""
    def refuse(why: str) -> GateRefused:
        return GateRefused(f"gate refused: production {production} was measured on val data "
                           f"{_short(production_hash)}, this run on {_short(result.val_data_hash)}, and production "
                           f"cannot be re-evaluated on this run's val data ({why}); nothing was published")

    data_file = result.run_dir / "data.json"
    try:
        split = json.loads(data_file.read_text())["val"]
    except (OSError, ValueError, KeyError):
        raise refuse(f"no val split in {data_file}") from None
    try:
        model, _ = load_model_version(registry, name, production, device="cpu")
    except (RegistryError, ValueError) as exc:
        raise refuse(str(exc).strip().splitlines()[0]) from None
    why = _encodable(model, split, result.parent_frame_encoder)
    if why:
        raise refuse(why)
    rows = {m.split(".", 2)[1] for m in needed if m.count(".") >= 2}
    depths = sorted(int(r.split("@", 1)[1]) for r in rows if r.startswith("rerank@"))
    try:
        measured = flatten_metrics("val", evaluate_model(model, _eval_set(model, split, result.config.seed),
                                                         rerank_k=depths, beta=beta, teacher=rows != {"student"}))
    except (RuntimeError, ValueError) as exc:
        raise refuse(str(exc).strip().splitlines()[0]) from None
    missing = [m for m in needed if m not in measured]
    if missing:
        raise refuse(f"{missing[0]} is not a metric a re-evaluation computes")
    log_event(log, "production re-evaluated on this run's val data", production=production,
              **{m: round(measured[m], 2) for m in needed})
    return {m: float(measured[m]) for m in needed}


def _production_values(result: TrainResult, registry: ModelRegistry, name: str, production: str,
                       needed: list[str], beta: float) -> tuple[dict[str, float], str, str | None]:
    """(production's values of ``needed``, "stored" or "re-evaluated", production's val data hash)."""
    manifest = registry.get_manifest(name, production)
    production_hash = (manifest.training or {}).get("val_data_hash")
    if production_hash and production_hash == result.val_data_hash and all(m in manifest.metrics for m in needed):
        return {m: float(manifest.metrics[m]) for m in needed}, "stored", production_hash
    return _reevaluate(result, registry, name, production, production_hash, needed, beta), "re-evaluated", \
        production_hash


def _margin(metrics: dict[str, float], metric: str, min_delta: float, k: float) -> tuple[float | None, float]:
    """(the metric's bootstrap SE or None when not recorded, max(min_delta, k x SE))."""
    se = metrics.get(metric + SE_SUFFIX)
    if se is None:
        log_event(log, "no bootstrap standard error recorded for the gate metric; the margin is gate_min_delta",
                  level=logging.WARNING, metric=metric)
        return None, min_delta
    return float(se), max(min_delta, k * float(se))


def _rerank_metric(result: TrainResult, metrics: dict[str, float]) -> str | None:
    setting = result.config.publish.gate_rerank_metric
    metric = rerank_gate_metric(setting, result.config.evaluate.rerank_k)
    if metric is None or metric not in metrics:
        if setting not in (None, "auto"):
            raise TrainingError(f"publish.gate_rerank_metric {setting!r} was not computed (evaluate.rerank_k: "
                                f"{result.config.evaluate.rerank_k})")
        log_event(log, "re-ranked gate skipped: no val rerank@20 metric (evaluate.rerank_k has no 20)"
                  if setting == "auto" else "re-ranked gate off (publish.gate_rerank_metric: null)", level=logging.INFO)
        return None
    return metric


def check_gate(result: TrainResult, registry: ModelRegistry, name: str, *, candidate: Candidate | None = None,
               beta: float | None = None) -> dict[str, Any]:
    """The gate decision for the chosen student; raises GateRefused (one line) when it must not ship."""
    publish = result.config.publish
    candidate = candidate or select_student(result)
    metrics = candidate.metrics
    metric = publish.gate_metric
    if metric not in metrics:
        known = ", ".join(sorted(k for k in metrics if k.endswith("R@1")))
        raise TrainingError(f"publish.gate_metric {metric!r} was not computed (R@1 metrics: {known})")
    rerank = _rerank_metric(result, metrics)
    new = float(metrics[metric])
    se, margin = _margin(metrics, metric, publish.gate_min_delta, publish.gate_se_k)
    production = registry.get_alias(name, PRODUCTION_ALIAS)
    gate: dict[str, Any] = {
        "metric": metric, "new": new, "production": production, "production_value": None,
        "min_delta": publish.gate_min_delta, "se_k": publish.gate_se_k, "se": se, "margin": margin,
        "student": candidate.which, "val_data_hash": result.val_data_hash, "production_val_data_hash": None,
        "path": "no production", "rerank": None}
    if rerank is not None:
        rerank_se, rerank_margin = _margin(metrics, rerank, publish.gate_min_delta, publish.gate_se_k)
        gate["rerank"] = {"metric": rerank, "new": float(metrics[rerank]), "production_value": None,
                          "se": rerank_se, "margin": rerank_margin}
    if production is None:
        return gate
    if beta is None:
        beta = result.beta if result.beta is not None else Settings().serve.beta
    values, path, production_hash = _production_values(result, registry, name, production,
                                                       [metric] + ([rerank] if rerank else []), beta)
    gate.update(path=path, production_val_data_hash=production_hash, production_value=values[metric])
    where = "same val data" if path == "stored" else "production re-evaluated on this run's val data"
    old = values[metric]
    # Strict: a tie, or a win inside the margin, is not worth a new version.
    if new <= old + margin:
        raise GateRefused(f"gate refused: {metric} = {new:.2f}, {old + margin - new:.2f} points short of beating "
                          f"production {production} ({old:.2f} + margin {margin:.2f} = max(min_delta "
                          f"{publish.gate_min_delta:g}, {publish.gate_se_k:g} x SE {se or 0.0:.2f}); {where}); "
                          f"nothing was published")
    if rerank is not None:
        entry = gate["rerank"]
        entry["production_value"] = values[rerank]
        floor = values[rerank] - entry["margin"]
        if entry["new"] < floor:
            raise GateRefused(f"gate refused: {rerank} = {entry['new']:.2f}, {floor - entry['new']:.2f} points below "
                              f"production {production}'s re-ranked {values[rerank]:.2f} - margin "
                              f"{entry['margin']:.2f} (= max(min_delta {publish.gate_min_delta:g}, "
                              f"{publish.gate_se_k:g} x SE {entry['se'] or 0.0:.2f}); {where}); nothing was published")
    return gate


def publish_run(result: TrainResult, settings: Settings, *, progress: bool = True) -> PublishOutcome:
    """Gate, publish the run's better student with its report, then re-index per ``publish.reindex``."""
    registry, name = _registry(result, settings)
    candidate = select_student(result)
    gate = check_gate(result, registry, name, candidate=candidate,
                      beta=result.beta if result.beta is not None else settings.serve.beta)
    model = build_model(ModelConfig.from_dict(result.model_config), device="cpu", seed=BASE_SEED, load_weights=False)
    model.load_state_dict(candidate_weights(result, candidate.which), strict=True)
    extras = {f: (result.run_dir / f).read_bytes() for f in REPORT_FILES if (result.run_dir / f).is_file()}
    baseline = result.weights.parent / BASELINE_HEAD_FILE
    if baseline.is_file():
        extras[BASELINE_HEAD_FILE] = baseline.read_bytes()
    training = {"run_config": result.config.to_dict(), "data_hash": result.data_hash, "data_info": result.data_info,
                "val_data_hash": result.val_data_hash, "published_student": candidate.which,
                "student_choice": candidate.choice,
                "stages": {k: {"steps": v["steps"], "samples_per_s": v["samples_per_s"], "seconds": v["seconds"]}
                           for k, v in result.logs.items()},
                "gate": gate}
    parent = gate["production"]
    version = registry.publish(name, {k: v.contiguous().clone() for k, v in model.state_dict().items()}, {
        "architecture": model.config.to_dict(), "frame_encoder": result.frame_encoder, "parent": parent,
        "training": training, "metrics": candidate.metrics}, extra_files=extras)
    log_event(log, "model published", model=name, version=version, parent=parent, student=candidate.which,
              gate_metric=gate["metric"], value=round(gate["new"], 2), production_value=gate["production_value"],
              margin=round(gate["margin"], 2), path=gate["path"])
    reindexed, note = _maybe_reindex(result, settings, registry, name, version, progress)
    return PublishOutcome(version=version, parent=parent, gate=gate, reindexed=reindexed, note=note)


def _live_index(settings: Settings) -> str | None:
    """The collection the store's alias points at, or None when there is no reachable index."""
    from vidsearch.store import open_store

    try:
        with open_store(settings) as store:
            return store.resolve_alias(settings.store.alias)
    except Exception as exc:  # noqa: BLE001 - no store here is a normal case for a training box
        log_event(log, "no live index reachable; not re-indexing", level=logging.INFO, error=str(exc).splitlines()[0])
        return None


def _maybe_reindex(result: TrainResult, settings: Settings, registry: ModelRegistry, name: str, version: str,
                   progress: bool) -> tuple[bool, str]:
    mode = result.config.publish.reindex
    live = None if mode == "never" else _live_index(settings)
    if mode == "always" and live is None:
        raise TrainingError(f"published {version}, but publish.reindex=always and no live index is reachable "
                            f"(alias {settings.store.alias!r}); run `vidsearch reindex --version {version}`")
    if live is None:
        registry.set_alias(name, PRODUCTION_ALIAS, version)
        return False, "no live index: production set; new videos are indexed with it"
    from .reindex import reindex

    report = reindex(settings, version, progress=progress)
    return True, f"re-indexed: {report.summary()}"
